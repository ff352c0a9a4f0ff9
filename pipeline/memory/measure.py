"""What a block of work held at its peak: this process's resident memory, the device memory torch allocated and
reserved on each GPU, and the peaks that processes of a launched training job reported.

    with measure() as peak:
        ...                       # a stage's work
    peak.metrics()                # {"perf/peak_rss_gb": ..., "perf/peak_cuda_allocated_gb": ..., ...}

Resident memory: on Linux the kernel keeps the process's high-water mark (VmHWM in /proc/self/status); writing "5"
to /proc/self/clear_refs resets it to the current RSS, so the mark read at the end is the block's own peak. Where the
reset is refused (an old kernel, a locked-down /proc), a thread samples VmRSS every `SAMPLE_S` seconds instead (it
can miss a spike shorter than that). Measurements nest: before a nested block resets the mark, every enclosing
block folds the mark so far into its own peak.

Device memory: torch's peak counters per CUDA device, reset at the start of the block (only when torch is already
imported and CUDA initialised: measuring never initialises a device).

Launched jobs: the processes of a torchrun job are other processes, so their memory is not in this RSS. Each
process measures itself (`measure` around its work) and the stage's side hands their peaks to `report_child`, which
adds them to every open measurement: RSS summed over the job's processes (they run at the same time on one node:
the sum bounds what the node held), device peaks by device (each process has its own GPU).

Figures are in GB (1e9 bytes).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["GB", "SAMPLE_S", "Peak", "measure", "report_child", "current_rss_gb", "return_large_frees"]

GB = 1e9
SAMPLE_S = 0.02
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass
class Peak:
    """The peaks of one measured block, in GB. `cuda_allocated`/`cuda_reserved`: by device index (empty without
    CUDA); `child_rss`: the sum of a launched job's processes' peaks (None when no job ran in child processes)."""

    rss: float = 0.0
    cuda_allocated: dict[int, float] = field(default_factory=dict)
    cuda_reserved: dict[int, float] = field(default_factory=dict)
    child_rss: float | None = None
    method: str = "hwm"  # "hwm": the kernel's high-water mark; "sampled": a sampling thread

    def metrics(self) -> dict[str, float]:
        """The manifest/MLflow metrics: perf/peak_rss_gb always; the device peaks (the largest device, and each
        device by index when there are several) on GPU; perf/peak_child_rss_gb when a job ran in children."""
        out = {"perf/peak_rss_gb": self.rss}
        for name, peaks in (("allocated", self.cuda_allocated), ("reserved", self.cuda_reserved)):
            if peaks:
                out[f"perf/peak_cuda_{name}_gb"] = max(peaks.values())
                if len(peaks) > 1:
                    out.update({f"perf/peak_cuda_{name}_gb/cuda{i}": v for i, v in sorted(peaks.items())})
        if self.child_rss is not None:
            out["perf/peak_child_rss_gb"] = self.child_rss
        return out

    def add_child(self, child: Peak) -> None:
        """Fold in a child process's peak: its RSS added to the children's sum, its device peaks max-merged."""
        self.child_rss = (self.child_rss or 0.0) + child.rss
        for mine, theirs in ((self.cuda_allocated, child.cuda_allocated), (self.cuda_reserved, child.cuda_reserved)):
            for device, value in theirs.items():
                mine[device] = max(mine.get(device, 0.0), value)


_open: list[_Block] = []  # the measurements in progress in this process, outermost first
_lock = threading.Lock()


def _status_kb(name: str) -> float | None:
    """A `kB` field of /proc/self/status (VmHWM, VmRSS), or None where there is no such file."""
    try:
        with open(_STATUS) as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_gb() -> float:
    """This process's resident memory now, in GB (0 where /proc is missing and `resource` gives nothing)."""
    kb = _status_kb("VmRSS")
    return 0.0 if kb is None else kb * 1024 / GB


def _hwm_gb() -> float | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024 / GB


def _reset_hwm() -> bool:
    """Reset the kernel's high-water mark to the current RSS; False where that is refused."""
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Samples VmRSS every `SAMPLE_S` seconds until stopped; `peak` is the largest sample."""

    def __init__(self) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.peak = current_rss_gb()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_S):
            self.peak = max(self.peak, current_rss_gb())

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, current_rss_gb())


@dataclass
class _Block:
    peak: Peak
    seen: float = 0.0  # the high-water mark folded in before a nested block reset it
    sampler: _Sampler | None = None


def _cuda_devices() -> list[int]:
    """CUDA devices to measure: none unless torch is imported and CUDA already initialised in this process."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


def _cuda_peaks(devices: list[int]) -> tuple[dict[int, float], dict[int, float]]:
    if not devices:
        return {}, {}
    cuda = sys.modules["torch"].cuda
    return ({d: cuda.max_memory_allocated(d) / GB for d in devices},
            {d: cuda.max_memory_reserved(d) / GB for d in devices})


def _start_rss(block: _Block) -> None:
    """Fold the mark so far into every open block, then reset it for this one (or start a sampler)."""
    hwm = _hwm_gb()
    for outer in _open:
        outer.seen = max(outer.seen, hwm or 0.0)
        if outer.sampler is not None:
            outer.seen = max(outer.seen, outer.sampler.peak)
    if hwm is not None and _reset_hwm():
        return
    block.sampler = _Sampler()
    block.peak.method = "sampled"
    block.sampler.start()


@contextmanager
def measure() -> Iterator[Peak]:
    """Measure the block's peak RSS (and device memory on CUDA); the yielded `Peak` is filled when it ends, also
    when it raises. Device peaks are reset at the start, so an enclosing block's device peak covers only what
    happened after this one began (its RSS is exact: see the module's docstring)."""
    block = _Block(Peak())
    with _lock:
        _start_rss(block)
        _open.append(block)
    devices = _cuda_devices()
    for device in devices:
        sys.modules["torch"].cuda.reset_peak_memory_stats(device)
    try:
        yield block.peak
    finally:
        with _lock:
            _open.remove(block)
        last = block.sampler.stop() if block.sampler is not None else (_hwm_gb() or 0.0)
        block.peak.rss = max(block.seen, last)
        allocated, reserved = _cuda_peaks(sorted(set(devices) | set(_cuda_devices())))
        for mine, theirs in ((block.peak.cuda_allocated, allocated), (block.peak.cuda_reserved, reserved)):
            for device, value in theirs.items():
                mine[device] = max(mine.get(device, 0.0), value)


def report_child(child: Peak) -> None:
    """A peak measured in another process (one process of a launched job): added to every open measurement."""
    with _lock:
        for block in _open:
            block.peak.add_child(child)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def return_large_frees(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation of `threshold` bytes or more from its own mapping, returned to the system
    the moment it is freed. By default glibc raises that threshold to the size of the last large block freed (up to
    32 MiB), so after a few steps a training process's freed activations stay in its heap: about 2 GB of the 8.7 GB
    peak of SmolLM2-135M's GFT round (docs/memory.md). The cost is a page-in of each new large block (a SmolLM2
    train step measured about 5% slower). Fixing the threshold also turns glibc's adjustment off. Allocation changes
    no number a stage computes. Process-wide; True when set (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(_M_MMAP_THRESHOLD, threshold))
