"""How figures read to a person: bytes, counts, durations. One of each, shared by every table.

Durations come at two scales: human_duration for wall-clock spans (3m07s), human_seconds for
measured times of one step or call (1.23 s, 45.6 ms, 789 µs).
"""

from __future__ import annotations


def human_bytes(n: float | None) -> str:
    """1.5 GiB, 12.0 MiB, 512 B ("-" for None)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def human_count(n: float | None, unit: str = "") -> str:
    """1.23 GFLOP, 4.56 M, 789 ("-" for None)."""
    if n is None:
        return "-"
    for suffix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {suffix}{unit}"
    return f"{n:,.0f} {unit}".rstrip()


def human_duration(seconds: float) -> str:
    """1.5s, 3m07s, 2h05m00s."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{seconds:.1f}s")


def human_seconds(s: float | None) -> str:
    """A measured time at its scale: 1.23 s, 45.6 ms, 789 µs."""
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:,.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:,.1f} ms"
    return f"{s * 1e6:,.0f} µs"
