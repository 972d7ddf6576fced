"""What the peers share: installing Debian packages, free ports, waiting.

Non-goal: managing servers beyond one benchmark run (everything lives in a
temporary directory that is removed afterwards).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

apt_timeout_s = 900  # apt-get update + install on a slow mirror
start_timeout_s = 60.0  # a peer server must accept connections by then
_apt_updated = False

# Debian package -> a program it installs (how we tell it is there).
PACKAGES = {
    "postgresql": "initdb",
    "redis-server": "redis-server",
}


def pg_bin_dir() -> Path | None:
    """Debian keeps PostgreSQL's server programs in /usr/lib/postgresql/N/bin."""
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    return None


def have(package: str) -> bool:
    if package == "postgresql":
        return pg_bin_dir() is not None
    return shutil.which(PACKAGES[package]) is not None


def ensure_packages(packages: list[str], log=print) -> None:
    """apt-get install what is missing (apt-get update once per process)."""
    global _apt_updated
    missing = [p for p in packages if not have(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"missing {', '.join(missing)}: install them (apt-get install -y {' '.join(missing)}) or run as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        log("apt-get update")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=apt_timeout_s,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        _apt_updated = True
    log(f"apt-get install -y {' '.join(missing)}")
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True, env=env,
                   timeout=apt_timeout_s, stdout=subprocess.DEVNULL)  # fmt: skip
    still = [p for p in missing if not have(p)]
    if still:
        raise RuntimeError(f"apt-get installed {', '.join(still)} but its programs are not found")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = start_timeout_s) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")
