"""Build the Cython kernel.

AUTHCORE_DEBUG=1 turns on annotation, line tracing, bounds checks and the
kernel's O(n) consistency checks (AUTHCORE_VERIFY); AUTHCORE_SANITIZE=1 adds
AddressSanitizer/UBSan flags.  The generated C is never committed.
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("AUTHCORE_DEBUG", "") not in ("", "0")
SANITIZE = os.environ.get("AUTHCORE_SANITIZE", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
    "linetrace": DEBUG,
}
macros = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"), ("AUTHCORE_VERIFY", "1" if DEBUG else "0")]
cflags = ["-O3", "-fno-strict-aliasing", "-Wno-address-of-packed-member"]  # struct fields are 8-aligned
ldflags = []
if DEBUG:
    macros.append(("CYTHON_TRACE_NOGIL", "1"))
    cflags = ["-O1", "-g", "-Wno-address-of-packed-member"]
if SANITIZE:
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    ldflags += ["-fsanitize=address,undefined"]

def extension(name: str) -> Extension:
    """One Cython module, every one built with the same flags."""
    return Extension(
        name,
        [name.replace(".", "/") + ".pyx"],
        include_dirs=[np.get_include()],
        define_macros=macros,
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )


extensions = [
    extension("authcore._kernel"),
    extension("authcore.protocols._json_codec"),
    extension("authcore.protocols._iso_codec"),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=DEBUG))
