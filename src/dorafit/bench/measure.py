"""Measurement primitives: interleaved median timing, bytes saved for backward, peak memory.

Saved for backward (deterministic, independent of the allocator): every tensor that autograd saves during
the forward pass goes through ``torch.autograd.graph.saved_tensors_hooks``; we sum the sizes of the
DISTINCT storages behind those still held at the end of the forward pass (a view and its base count once,
a tensor saved by two operations counts once, a graph branch dropped during the forward counts nothing),
leaving out storages that belong to a model parameter or buffer (frozen weights, adapter tensors). What
remains is what the forward pass keeps alive for backward: activations, dropout masks, attention outputs,
small derived tensors such as ``s * B`` or the DoRA norm.

Live tensor bytes (deterministic, also under activation checkpointing, whose recomputation keeps the block
inputs through Python references that ``saved_tensors_hooks`` never see): a ``TorchDispatchMode`` notes the
storage of every tensor an operation creates and sums the sizes of those still alive, at any moment and at
their peak (:class:`LiveTensorBytes`).

Peak memory: ``max_memory_allocated`` on CUDA; on CPU the process's peak resident set (VmHWM), read in a
fresh process per variant (:mod:`dorafit.bench.peak`) because one process's allocator keeps memory that
other variants freed.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
import weakref
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.multiprocessing.reductions import StorageWeakRef


# ---- saved for backward ----------------------------------------------------------------------------------
def model_storages(*models: nn.Module) -> set[int]:
    """Data pointers of the storages of every parameter and buffer of ``models``."""
    return {t.untyped_storage().data_ptr() for m in models for t in [*m.parameters(), *m.buffers()]}


class SavedTensorCounter:
    """Context manager: distinct storages autograd saves inside it and still holds at its end, except ``exclude``.

    After the block: ``nbytes`` (sum of storage sizes) and ``count`` (number of distinct storages), and
    ``storages`` ({data pointer: bytes}). A tensor saved by a graph branch that was dropped before the end of
    the block (e.g. a throw-away computation done with grad enabled) is not counted, and its memory, if reused
    by a later saved tensor, is not mistaken for that tensor.
    """

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = exclude
        self._seen: dict[int, tuple[int, list]] = {}  # data pointer -> (bytes, weak references to saved tensors)
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or storage.nbytes() == 0:
            return t
        # the graph keeps a detached alias (same storage and version counter, no grad_fn): a saved output would
        # otherwise point back at its own graph node, a cycle through C++ that outlives a dropped branch
        alias = t.detach()
        entry = self._seen.get(ptr)
        if entry is None or not any(ref() is not None for ref in entry[1]):  # new, or a dead storage's address
            entry = self._seen[ptr] = (storage.nbytes(), [])
        entry[1].append(weakref.ref(alias))
        return alias

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.storages = {
            ptr: nbytes for ptr, (nbytes, refs) in self._seen.items() if any(ref() is not None for ref in refs)
        }
        self._seen.clear()

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    @property
    def count(self) -> int:
        return len(self.storages)


class LiveTensorBytes(TorchDispatchMode):
    """Context manager: bytes of the tensor storages created inside it that are still alive.

    Every operation's outputs are looked at (views and in-place results share a storage of an input and are
    not new); a storage counts from its creation until it is freed, which a weak reference tells. ``current``
    is the sum now, ``peak`` the largest sum seen right after any operation (frees happen between operations,
    so this is the peak of tensor memory, leaving out the allocator's slack and kernels' private scratch
    space). Storages that exist before the block (weights, inputs, optimizer state of earlier steps) count
    nothing. Operations that run outside the dispatcher (a compiled graph's generated kernels) are not seen,
    so this is for eager code.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self._prune()
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in inputs and storage._cdata not in self._live:
                    self._live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def _prune(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.current -= self._live.pop(key)[1]

    def alive_bytes(self) -> int:
        """Bytes alive now (frees since the last operation included)."""
        self._prune()
        return self.current


# ---- timing -------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def interleaved_times(fns: dict[str, Callable[[], object]], warmup: int, repeats: int, device: str) -> dict[str, list]:
    """Seconds per call of every function, measured round-robin.

    Each round calls every function once, in an order rotated by one every round (no variant always runs
    right after the same other one); the first ``warmup`` rounds are discarded. Python's garbage collector
    runs between calls, never inside one.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_ in range(warmup + repeats):
            k = round_ % len(names)
            for name in names[k:] + names[:k]:
                gc.collect()
                synchronize(device)
                start = time.perf_counter()
                fns[name]()
                synchronize(device)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


# ---- memory -------------------------------------------------------------------------------------------------
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS at once.

    Without this, every large tensor is a fresh ``mmap`` whose pages fault in on first touch, which on a
    CPU makes step times depend on what ran before (the first steps of a variant measured 2-6x slower
    than later ones here). This is what a caching allocator (jemalloc, tcmalloc, PyTorch's CUDA allocator)
    does anyway. Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h; the value is a C int
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; peak RSS is measured on Linux only")


def rss_bytes() -> int:
    """The process's resident set now."""
    return 1024 * _proc_status_kib("VmRSS")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Peak resident set since the process started or since :func:`reset_peak_rss`."""
    return 1024 * _proc_status_kib("VmHWM")


def cuda_peak_bytes(fn: Callable[[], object], device: str) -> tuple[int, int]:
    """(peak allocated during ``fn``, peak minus what was allocated before it), in bytes, on a CUDA device."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - before
