"""The machine and the build as cybn sees them: cache sizes and show_config()."""
import os
import platform
import re
import sys
from typing import IO, Any

import numpy as np

__all__ = ["cache_sizes", "show_config"]

# Used where neither the environment, sysconf nor sysfs say: a server core's
# L2 and one core complex's share of L3, sizes common to current x86 CPUs.
FALLBACK_CACHES = {"L2": 1 << 20, "L3": 32 << 20}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _bytes(text: str, where: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, re.I)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"{where}: expected a positive size such as 1M or 262144, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _from_environment() -> dict[str, int] | None:
    text = os.environ.get("CYBN_CACHE_SIZES", "").strip()
    if not text:
        return None
    sizes = {}
    for item in text.split(","):
        level, _, size = item.partition("=")
        level = level.strip().upper()
        if level not in FALLBACK_CACHES:
            raise ValueError(f"CYBN_CACHE_SIZES: expected L2=SIZE,L3=SIZE, got {text!r}")
        sizes[level] = _bytes(size, "CYBN_CACHE_SIZES")
    return sizes


def _from_sysconf() -> dict[str, int]:
    sizes: dict[str, int] = {}
    for level in FALLBACK_CACHES:
        name = f"SC_LEVEL{level[1]}_CACHE_SIZE"
        if name in os.sysconf_names:
            try:
                value = os.sysconf(name)
            except (OSError, ValueError):
                continue
            if value > 0:
                sizes[level] = value
    return sizes


def _from_sysfs(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    sizes: dict[str, int] = {}
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return sizes
    for entry in entries:
        try:
            with open(os.path.join(root, entry, "level")) as f:
                level = f"L{f.read().strip()}"
            with open(os.path.join(root, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, entry, "size")) as f:
                size = _bytes(f.read(), os.path.join(root, entry, "size"))
        except (OSError, ValueError):
            continue
        if level in FALLBACK_CACHES and kind in ("Unified", "Data"):
            sizes[level] = size
    return sizes


def cache_sizes() -> dict[str, Any]:
    """The L2 and L3 cache sizes in bytes of the CPU this process runs on, and
    where each came from: {"L2": bytes, "L3": bytes, "source": {...}}.

    In order: the environment variable CYBN_CACHE_SIZES (for experiments,
    e.g. "L2=1M,L3=256M"), os.sysconf, Linux's /sys/devices/system/cpu/cpu0,
    then FALLBACK_CACHES.  A virtual machine may report its host's sizes.
    """
    found: dict[str, int | None] = {"L2": None, "L3": None}
    source: dict[str, str] = {}
    for name, sizes in (("CYBN_CACHE_SIZES", _from_environment()), ("sysconf", _from_sysconf()),
                        ("sysfs", _from_sysfs())):
        for level, size in (sizes or {}).items():
            if found[level] is None:
                found[level], source[level] = size, name
    for level, size in FALLBACK_CACHES.items():
        if found[level] is None:
            found[level], source[level] = size, "fallback"
    return {**found, "source": source}


def _size_text(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10} KiB"


def show_config(file: IO[str] | None = None) -> None:
    """Print cybn's version and build, the CPU features its kernels use, the
    thread count and the cache sizes, like numpy.show_config()."""
    from . import __version__, _kernels

    info = _kernels.machine_and_build()
    caches = cache_sizes()
    yes = {True: "yes", False: "no"}
    features = [name for name in ("avx2", "fma", "avx512f") if info[name]]
    lines = [
        f"cybn {__version__}",
        f"  python       {platform.python_version()} ({sys.executable})",
        f"  numpy        {np.__version__}",
        f"  machine      {platform.machine()}, {os.cpu_count()} logical CPUs",
        f"  build        OpenMP: {yes[info['openmp']]}, run-time clones "
        f"(x86-64, x86-64-v3, x86-64-v4): {yes[info['runtime_clones']]}, "
        f"-march=native: {yes[info['native']]}",
        f"  CPU features {', '.join(features) or 'none of avx2, fma, avx512f'}; "
        f"fused multiply-add in the float32 passes: {yes[info['fused_float32_passes']]}",
        f"  threads      {_kernels.max_threads()} (OpenMP's default; OMP_NUM_THREADS or "
        "threadpoolctl limit it)",
        *(f"  {level} cache     {_size_text(caches[level])} (from {caches['source'][level]})"
          for level in ("L2", "L3")),
    ]
    print("\n".join(lines), file=file)
