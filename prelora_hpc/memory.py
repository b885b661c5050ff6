"""Peak memory of this process, resettable, on a GPU and on the CPU.

The one probe the trainer (each stage's peak in its log) and the bench
(each configuration's peak) read. On a GPU it is CUDA's max allocated; on
the CPU the kernel's resident high-water mark (``VmHWM``), which Linux >= 4.0
resets when ``5`` is written to ``/proc/self/clear_refs``. Where neither
exists, ``ru_maxrss``: the lifetime peak, never reset (``peak_resettable``
says which one a process gets).

Imports only torch and the standard library.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
from typing import Optional

import torch


def _hwm_bytes() -> Optional[int]:
    """``VmHWM`` of /proc/self/status in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _clear_hwm() -> bool:
    """Set the RSS high-water mark to the current RSS; False where the kernel cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    """Resident set size of this process now, bytes (Linux ``statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process since the last ``reset_peak_memory``, bytes:
    CUDA max allocated on a GPU, peak RSS on the CPU (``ru_maxrss``, the
    lifetime peak, where the kernel has no ``VmHWM``)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _hwm_bytes()
    if hwm is not None:
        return hwm
    # ru_maxrss is KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory measurement (at each stage's engine build), so
    a stage's figure is its own and not the largest stage's before it.

    Returns False where the peak cannot be reset (no ``clear_refs``): the
    figure then stays the process's lifetime peak.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return _clear_hwm()


def peak_resettable(device: torch.device) -> bool:
    """True when ``reset_peak_memory`` really resets on ``device`` (it does so once)."""
    if device.type == "cuda":
        return True
    return _hwm_bytes() is not None and reset_peak_memory(device)


def release_free_memory() -> None:
    """Give freed heap back to the OS (glibc), so one stage's garbage does not
    sit in the next stage's RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may keep freed pages; run the smallest stage first


class PeakMemory:
    """Peak memory of one measured stretch (a bench configuration) over a baseline.

    On a GPU: CUDA max allocated (baseline 0). On the CPU: the peak RSS above
    the RSS when this object was made, the high-water mark reset at every
    ``reset``; where it cannot be reset, ``ru_maxrss`` above its value then,
    which only grows (``method`` says which).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        if device.type == "cuda":
            self.method = "cuda.max_memory_allocated"
        elif peak_resettable(device):
            self.baseline = rss_bytes()
            self.method = "VmHWM - RSS before the stages (high-water mark reset per stage)"
        else:
            self.baseline = peak_memory_bytes(device)
            self.method = "ru_maxrss - ru_maxrss before the stages (never reset)"

    def reset(self) -> None:
        """Start this stretch: free what earlier ones left, reset the peak."""
        if self.device.type != "cuda":
            release_free_memory()
        reset_peak_memory(self.device)

    def peak(self) -> int:
        """Bytes: the peak since ``reset`` above the baseline (never negative)."""
        return max(0, peak_memory_bytes(self.device) - self.baseline)
