"""How much memory this process may still use: the real limit, not only free RAM.

Read in order and the smallest wins: the cgroup limit (v2 `memory.max`, v1 `memory.limit_in_bytes`, minus
what the group already uses), the address-space ulimit (RLIMIT_AS, minus this process's size), then
MemAvailable. Stages estimate what they need and fail with a one-line DataError naming the fix instead of
dying with MemoryError (or being killed) halfway.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from edgec.core.errors import DataError

_UNLIMITED = 2 ** 60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _cgroup_dirs() -> list[Path]:
    """This process's cgroup folder and its parents (a limit anywhere above applies too)."""
    root = Path("/sys/fs/cgroup")
    dirs = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if controllers in ("", "memory") or "memory" in controllers.split(","):
                base = root if controllers == "" else root / "memory"
                here = base / rel.lstrip("/")
                while True:
                    dirs.append(here)
                    if here == base:
                        break
                    here = here.parent
    except (OSError, ValueError):
        pass
    return dirs or [root, root / "memory"]


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_mb() -> tuple[float, str]:
    """(MB this process can still allocate, where the figure comes from)."""
    found: list[tuple[float, str]] = []
    for d in _cgroup_dirs():
        for limit_file, usage_file in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit = _read_int(d / limit_file)
            if limit is not None:
                used = _read_int(d / usage_file) or 0
                found.append(((limit - used) / 2 ** 20, f"cgroup {d / limit_file} = {limit / 2 ** 20:.0f} MB"))
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft not in (resource.RLIM_INFINITY, -1) and soft < _UNLIMITED:
            size = (_status_kb("VmSize") or 0) * 1024
            found.append(((soft - size) / 2 ** 20, f"ulimit -v (RLIMIT_AS) = {soft / 2 ** 20:.0f} MB"))
    except (ImportError, ValueError, OSError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) / 1024, "MemAvailable"))
    except (OSError, ValueError):
        pass
    if os.environ.get("EDGEC_MEMORY_MB"):   # an explicit budget (CI machines shared by many jobs)
        found.append((float(os.environ["EDGEC_MEMORY_MB"]) - rss_mb(), "EDGEC_MEMORY_MB"))
    return min(found) if found else (math.inf, "unknown")


def check_fits(need_mb: float, what: str, fix: str) -> None:
    """DataError (one line: what, how much, the limit and where it comes from, the fix) when `need_mb` more
    would exceed 90% of what is available."""
    avail, source = available_mb()
    if need_mb > 0.9 * avail:
        raise DataError(f"{what} needs about {need_mb:.0f} MB and only {max(avail, 0):.0f} MB are available "
                        f"({source}); {fix}")
