"""Configuration: a TOML file (SPEC §9) mapped onto frozen dataclasses.

Goals: every key has a default (``authcore serve`` runs with none), unknown
keys are an error naming the key with its dotted path, and types are
checked at load time rather than deep inside the server.  The decision
settings (``hold_ttl_seconds`` and ``[fraud]``) are what replay needs to
reproduce decisions; ``decision_dict()`` gives exactly those.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from . import constants as C


class ConfigError(ValueError):
    """A configuration file or dict that cannot be used; names the key."""


@dataclass(frozen=True)
class Velocity:
    window_seconds: int = 60
    attempts: int = 10
    points: int = 40


@dataclass(frozen=True)
class CardTesting:
    window_seconds: int = 600
    attempts: int = 5
    max_amount: int = 200
    points: int = 60


@dataclass(frozen=True)
class AmountSpike:
    min_approved: int = 5
    min_amount: int = 50_000
    factor: int = 10
    points: int = 50


@dataclass(frozen=True)
class ImpossibleTravel:
    window_seconds: int = 3600
    points: int = 50


@dataclass(frozen=True)
class NewAccount:
    age_seconds: int = 86_400
    min_amount: int = 100_000
    points: int = 30


@dataclass(frozen=True)
class RiskyMcc:
    mccs: tuple[int, ...] = (7995, 4829, 6051, 6211)
    points: int = 20


@dataclass(frozen=True)
class MerchantBurst:
    window_seconds: int = 600
    last_attempts: int = 20
    declines: int = 10
    points: int = 30


@dataclass(frozen=True)
class Fraud:
    enabled: bool = True
    decline_score: int = 80
    review_score: int = 50
    velocity: Velocity = field(default_factory=Velocity)
    card_testing: CardTesting = field(default_factory=CardTesting)
    amount_spike: AmountSpike = field(default_factory=AmountSpike)
    impossible_travel: ImpossibleTravel = field(default_factory=ImpossibleTravel)
    new_account: NewAccount = field(default_factory=NewAccount)
    risky_mcc: RiskyMcc = field(default_factory=RiskyMcc)
    merchant_burst: MerchantBurst = field(default_factory=MerchantBurst)


@dataclass(frozen=True)
class Durability:
    sync: str = "always"  # "none" is not durable: benchmarks only
    segment_bytes: int = 64 << 20  # log segment size (preallocated)
    # Requests logged between snapshots (0 = never): replay cost, and so
    # recovery time, grows with requests, not with how they were batched.
    snapshot_interval_requests: int = 5_000_000
    snapshots_kept: int = 2
    log_retention: str = "all"  # "all" keeps every segment (replay needs them); "covered" deletes segments a snapshot covers


@dataclass(frozen=True)
class Server:
    batch_max: int = C.batch_count_default  # requests per kernel batch
    frame_bytes_max: int = 8 << 20  # binary frame: 131072 records of 64 bytes
    line_bytes_max: int = 64 << 10  # JSON line; a request is < 1 KiB
    connections_max: int = 10_000
    inflight_max: int = 65_536  # unanswered requests per connection before pause_reading
    write_buffer_high_bytes: int = 4 << 20  # transport buffer high-water mark
    idle_timeout_seconds: float = 300.0  # close a connection idle this long
    read_timeout_seconds: float = 30.0  # a started frame/line must complete within this


@dataclass(frozen=True)
class Engine:
    idempotency_ids_max: int = C.idempotency_ids_max_default
    holds_retained_max: int = C.holds_retained_max_default
    pan_key_file: str = ""  # "" = <data dir>/pan.key, generated if missing
    # Sizes allocated at start (rounded up to powers of two); 0 = automatic:
    # small for an embedded engine, the server's sizes below for `serve`.
    # Past them the tables still grow, but each doubling stops decisions to
    # copy and rehash (measured ~0.6 s at 4M ids): size production hosts here.
    accounts_initial: int = 0
    holds_initial: int = 0
    ids_initial: int = 0
    # Touch every table page at start (RSS = the full presized tables, ~2 GB
    # for `serve`'s sizes) so the first pass over fresh memory does not pay
    # page faults inside decisions.  Off by default: a laptop runs `serve` too.
    prefault: bool = False


@dataclass(frozen=True)
class Tls:
    """TLS on every listener (docs/security.md); "" cert_file = plain TCP."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""  # verify client certificates against this CA
    require_client_cert: bool = False  # mutual TLS: no trusted certificate, no connection
    handshake_timeout_seconds: float = 10.0  # also bounds the wait for an API key


@dataclass(frozen=True)
class AuthClient:
    name: str = ""
    role: str = "gateway"  # "gateway" or "admin" (security.ROLES)
    ops: tuple[str, ...] = ()  # when given, exactly these operations (overrides role)
    subject: str = ""  # certificate subject pairs that must all match, "CN=gw1,O=Acme"
    rate_per_second: float = 0.0  # 0 = limits.rate_per_second
    burst: int = 0  # 0 = limits.burst


@dataclass(frozen=True)
class Auth:
    api_keys_file: str = ""  # "name key" per line; outside the repository
    audit_file: str = ""  # JSON lines of refusals; "" = the authcore.audit logger only
    clients: tuple[AuthClient, ...] = ()  # none = open local mode


@dataclass(frozen=True)
class Limits:
    rate_per_second: float = 0.0  # requests per second per client (per connection without identities); 0 = unlimited
    burst: int = 0  # bucket size; 0 = one second's worth


@dataclass(frozen=True)
class Config:
    hold_ttl_seconds: int = 604_800
    fraud: Fraud = field(default_factory=Fraud)
    durability: Durability = field(default_factory=Durability)
    server: Server = field(default_factory=Server)
    engine: Engine = field(default_factory=Engine)
    tls: Tls = field(default_factory=Tls)
    auth: Auth = field(default_factory=Auth)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def default(cls) -> "Config":
        return cls()

    @classmethod
    def from_toml(cls, path: str | Path) -> "Config":
        p = Path(path)
        try:
            with p.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: {e}") from None
        except OSError as e:
            raise ConfigError(f"{p}: {e.strerror}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        cfg = _build(cls, data, "")
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def decision_dict(self) -> dict[str, Any]:
        """The settings that decide answers; replay must use exactly these."""
        return {"hold_ttl_seconds": self.hold_ttl_seconds, "fraud": _to_dict(self.fraud)}

    @classmethod
    def from_decision_dict(cls, base: "Config", d: dict[str, Any]) -> "Config":
        merged = base.to_dict()
        merged["hold_ttl_seconds"] = d["hold_ttl_seconds"]
        merged["fraud"] = d["fraud"]
        return cls.from_dict(merged)

    def validate(self) -> None:
        """Relations between values that types alone do not catch."""
        f = self.fraud
        if self.hold_ttl_seconds <= 0:
            raise ConfigError("hold_ttl_seconds: must be > 0")
        if self.durability.sync not in ("always", "none"):
            raise ConfigError('durability.sync: must be "always" or "none"')
        if self.durability.log_retention not in ("all", "covered"):
            raise ConfigError('durability.log_retention: must be "all" or "covered"')
        if self.durability.snapshot_interval_requests < 0:
            raise ConfigError("durability.snapshot_interval_requests: must be >= 0 (0 = never)")
        for name in ("velocity", "card_testing", "impossible_travel", "merchant_burst"):
            if getattr(f, name).window_seconds <= 0:
                raise ConfigError(f"fraud.{name}.window_seconds: must be > 0")
        for name, n in (
            ("velocity.attempts", f.velocity.attempts),
            ("card_testing.attempts", f.card_testing.attempts),
            ("merchant_burst.last_attempts", f.merchant_burst.last_attempts),
        ):
            if not 1 <= n <= C.ring_size_max:
                raise ConfigError(f"fraud.{name}: must be 1..{C.ring_size_max}")
        if len(f.risky_mcc.mccs) > C.risky_mcc_max:
            raise ConfigError(f"fraud.risky_mcc.mccs: at most {C.risky_mcc_max} codes")
        for m in f.risky_mcc.mccs:
            if not 0 <= m <= C.mcc_max:
                raise ConfigError(f"fraud.risky_mcc.mccs: {m} is not a 4-digit MCC")
        if self.server.batch_max < 1 or self.server.batch_max > C.batch_count_max:
            raise ConfigError(f"server.batch_max: must be 1..{C.batch_count_max}")
        if self.engine.idempotency_ids_max < 1024:
            raise ConfigError("engine.idempotency_ids_max: must be >= 1024")
        self._validate_security()

    def _validate_security(self) -> None:
        t, a = self.tls, self.auth
        if bool(t.cert_file) != bool(t.key_file):
            raise ConfigError("tls.cert_file and tls.key_file: give both or neither")
        if t.client_ca_file and not t.cert_file:
            raise ConfigError("tls.client_ca_file: needs tls.cert_file (client certificates need TLS)")
        if t.require_client_cert and not t.client_ca_file:
            raise ConfigError("tls.require_client_cert: needs tls.client_ca_file")
        if t.handshake_timeout_seconds <= 0:
            raise ConfigError("tls.handshake_timeout_seconds: must be > 0")
        names = set()
        for i, c in enumerate(a.clients):
            where = f"auth.clients[{i}]"
            if not c.name or c.name in names:
                raise ConfigError(f"{where}.name: must be non-empty and unique")
            names.add(c.name)
            if c.role not in ("gateway", "admin"):
                raise ConfigError(f'{where}.role: must be "gateway" or "admin"')
            for op in c.ops:
                if op not in C.Op.__members__:
                    raise ConfigError(f"{where}.ops: {op!r} is not an operation")
            if c.subject and not all("=" in p for p in c.subject.split(",") if p.strip()):
                raise ConfigError(f"{where}.subject: expected NAME=value pairs, e.g. CN=gateway-1,O=Acme")
        if a.api_keys_file and not a.clients:
            raise ConfigError("auth.api_keys_file: needs [[auth.clients]] to map keys to")


# Keys that were renamed, with what to write instead (an old config file
# gets told, not just "unknown key").
RENAMED_KEYS = {
    "durability.snapshot_interval_records": "durability.snapshot_interval_requests, which counts logged requests "
                                            "(the old key counted log records, one per batch)",
}


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a table")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            if f"{path}{key}" in RENAMED_KEYS:
                raise ConfigError(f"configuration key {path}{key} was renamed: use {RENAMED_KEYS[path + key]}")
            raise ConfigError(f"unknown configuration key: {path}{key}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{path}{f.name}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    if is_dataclass(tp):
        return _build(tp, value, path + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer")
        if value < 0:
            raise ConfigError(f"{path}: must be >= 0")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string")
        return value
    if getattr(tp, "__origin__", None) is tuple and tp.__args__[0] is str:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: expected a list of strings")
        return tuple(value)
    if getattr(tp, "__origin__", None) is tuple and is_dataclass(tp.__args__[0]):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected an array of tables")
        return tuple(_build(tp.__args__[0], v, f"{path}[{i}].") for i, v in enumerate(value))
    if getattr(tp, "__origin__", None) is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{path}: expected a list of integers")
        return tuple(value)
    raise ConfigError(f"{path}: unsupported type {tp!r}")  # pragma: no cover


def _to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_dict(v) for v in obj]
    return obj
