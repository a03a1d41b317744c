"""How figures read to a person: bytes, counts, durations. One of each, shared by every table."""

from __future__ import annotations


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def human_count(n: float | None, unit: str = "") -> str:
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
