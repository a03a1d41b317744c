"""Peak memory of a piece of work, and how much memory the device has free.

CUDA: the allocator's max_memory_allocated over what was allocated before (exact).
CPU on Linux: the growth of the process's peak resident set (VmHWM) over the resident set
before, after resetting the peak through /proc/self/clear_refs and handing freed heap pages
back to the OS (malloc_trim), so memory freed by earlier work is not silently reused and every
byte the work touches is counted. This runs in-process and costs microseconds, where a child
process per measurement would cost an interpreter and a torch import each. Library code paged
in on first use also counts, so callers warm up first. Elsewhere (macOS) the fallback is
ru_maxrss growth, which only sees work that goes past the process's earlier peak: a lower bound.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from pathlib import Path

import torch

from tformer_cli.device import sync

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes (getrusage: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024
    )


def peak_memory_bytes(device: torch.device) -> int:
    """The peak memory of the process so far: CUDA's allocator peak on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


class PeakMemory:
    """Context manager: .peak is the most memory the block used beyond what was in use before it.

    .method names how: "cuda_max_allocated", "rss_hwm", "ru_maxrss" (a lower bound) or None
    (no way to measure on this device; .peak stays None).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None
        self.method: str | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        # no gc.collect(): it costs ~0.1 s with torch loaded, and the workloads free their
        # tensors by reference counting (they hold no cycles)
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()  # so free-memory checks see what earlier workloads left cached
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_allocated"
        elif self.device.type == "cpu":
            _malloc_trim()
            if _reset_peak_rss():
                self._base = _status_bytes("VmRSS") or 0
                self.method = "rss_hwm"
            else:
                self._base = peak_rss_bytes()
                self.method = "ru_maxrss"
        return self

    def restart(self) -> None:
        """Forget the peak so far (e.g. a warm-up's one-off allocations), keeping the baseline."""
        if self.method == "cuda_max_allocated":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "rss_hwm":
            _malloc_trim()
            _reset_peak_rss()

    def __exit__(self, *exc) -> None:
        if self.method == "cuda_max_allocated":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.method == "rss_hwm":
            self.peak = max(0, (_status_bytes("VmHWM") or 0) - self._base)
        elif self.method == "ru_maxrss":
            self.peak = max(0, peak_rss_bytes() - self._base)


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give out: CUDA's free memory, the OS's MemAvailable for a CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def device_name(device: torch.device) -> str:
    """A human name for the device: the GPU's, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        import platform

        return platform.processor() or "cpu"
    return device.type
