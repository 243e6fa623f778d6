"""CPU time and memory of a process tree, read straight from /proc (Linux only, no psutil).

A tree is a pid plus all its live descendants, so a server that forks workers is measured
whole. CPU time is utime + stime; memory is VmRSS, and the peak is VmHWM (both summed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


@dataclass(frozen=True)
class Sample:
    """One reading of a process tree."""

    cpu_s: float
    rss_bytes: int
    peak_rss_bytes: int
    processes: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    children = _children_map()
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 10_000:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in keys:
            found[name] = int(value.split()[0])
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0.0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the comm field: state=0, ppid=1, ..., utime=11, stime=12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def sample(pid: int) -> Sample:
    """CPU seconds, RSS and peak RSS summed over `pid` and its descendants."""
    pids = tree(pid)
    cpu, rss, peak = 0.0, 0, 0
    for p in pids:
        cpu += cpu_seconds(p)
        mem = _status_kib(p, ("VmRSS", "VmHWM"))
        rss += mem.get("VmRSS", 0) * 1024
        peak += mem.get("VmHWM", 0) * 1024
    return Sample(cpu, rss, peak, len(pids))


def self_cpu_seconds() -> float:
    """CPU seconds used by this process so far (all threads)."""
    times = os.times()
    return times.user + times.system
