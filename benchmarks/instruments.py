"""Measuring instruments: each one counts one thing and says how it counted it.

- `SavedBytes`: bytes autograd keeps for backward, from `saved_tensors_hooks`, unique storages,
  storages of the weights excluded (they are resident anyway).
- `OpTraffic`: a `TorchDispatchMode` that counts aten operators and sums the bytes of their input and
  output tensors (what an unfused implementation moves through memory, one operator at a time).
- `KernelTraffic`: wraps the Triton interpreter's load/store/atomic primitives and its grid launcher,
  counting per kernel launch the bytes of every unmasked element loaded and stored, and the unique ones.
- `L2Model`: the DRAM bytes of a launch's loads and stores under an LRU model of a GPU's L2 cache.
- `cpu_wall_time` and `gpu_time`: wall time; GPU time only where a CUDA device exists.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ---------------------------------------------------------------- saved-for-backward bytes


class SavedBytes(contextlib.AbstractContextManager):
    """Unique storages packed for backward while active, minus the storages of `exclude` (the weights).

    with SavedBytes(exclude=weights) as saved: loss = step(); then saved.bytes, saved.count.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: Dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda packed: packed)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    @property
    def count(self) -> int:
        return len(self._storages)


# ---------------------------------------------------------------- operator traffic (TorchDispatchMode)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor view covers (broadcast dimensions, stride 0, count once)."""
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            distinct *= size
    return distinct * t.element_size()


# Allocations and re-labelled views: no memory traffic and no kernel launch.
_NO_DATA_MOVED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view"}


class OpTraffic(TorchDispatchMode):
    """Aten operators run while active: their count and the bytes of their input + output tensors.

    View operators (outputs alias inputs: view, t, expand, slice, detach, ...) and bare allocations
    move no data and launch nothing, so they are not counted. `paused` (set by `KernelTraffic`) skips the
    bookkeeping ops the Triton interpreter runs around each kernel launch.
    """

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.per_op: Dict[str, int] = {}
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten":
            return self._run_inside(func, args, kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not (self.paused or func.is_view or name in _NO_DATA_MOVED):
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            moved = sum(tensor_bytes(t) for t in tensors)
            self.ops += 1
            self.bytes += moved
            self.per_op[name] = self.per_op.get(name, 0) + moved
        return out

    def _run_inside(self, func, args, kwargs):
        """A custom op (e.g. the triton backend's) is a container, not an operator: run its implementation
        with this mode active again so the aten operators (and kernels) inside it are the ones counted."""
        devices = {t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        key = torch._C.DispatchKey.CUDA if "cuda" in devices else torch._C.DispatchKey.CPU
        with self:
            return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)


# ---------------------------------------------------------------- kernel traffic (Triton interpreter)


# The A100's L2 (40 MiB): the smaller of the two targets the kernels are compiled for (sm_80; the H100 has 50 MiB).
A100_L2_BYTES = 40 * 2**20
# NVIDIA L2 moves data to and from DRAM in 32-byte sectors.
SECTOR_BYTES = 32


class L2Model:
    """DRAM bytes of one kernel launch under an LRU model of the L2 cache, `capacity` bytes of 32-byte sectors.

    - each program's accesses are first reduced to its distinct sectors (loads and stores separately; a sector
      both loaded and stored in a program counts as both), then applied to the cache in program order, the
      program's loads before its stores, each in address order;
    - a load of a sector not in the cache is a miss: 32 bytes read from DRAM, and the sector is inserted (MRU);
      a hit only refreshes it;
    - a store allocates the sector (write-back, no DRAM read for the store) and marks it dirty; a dirty sector
      costs 32 bytes of DRAM write when evicted or when the launch ends (`flush`);
    - eviction is LRU by sector as soon as the resident bytes exceed the capacity;
    - the cache starts cold at each launch (conservative: data a previous kernel left in L2 is not credited).
    """

    def __init__(self, capacity: int = A100_L2_BYTES):
        if capacity < SECTOR_BYTES:
            raise ValueError(f"an L2 of {capacity} bytes holds no {SECTOR_BYTES}-byte sector")
        self.dram_loaded = 0
        self.dram_stored = 0
        self._max_sectors = capacity // SECTOR_BYTES
        self._resident: "OrderedDict[int, bool]" = OrderedDict()  # sector -> dirty, least recently used first

    def run_program(self, loaded: np.ndarray, stored: np.ndarray) -> None:
        """Apply one program's distinct loaded and stored byte addresses (elements are naturally aligned and
        at most 32 bytes wide, so an element lies in the sector of its first byte)."""
        resident, max_sectors = self._resident, self._max_sectors
        misses = evicted_dirty = 0
        for sector in _distinct(loaded // SECTOR_BYTES).tolist():
            if sector in resident:
                resident.move_to_end(sector)
                continue
            resident[sector] = False
            misses += 1
            if len(resident) > max_sectors:
                evicted_dirty += resident.popitem(last=False)[1]
        for sector in _distinct(stored // SECTOR_BYTES).tolist():
            resident[sector] = True
            resident.move_to_end(sector)  # assigning an existing key keeps its place in the order
            if len(resident) > max_sectors:
                evicted_dirty += resident.popitem(last=False)[1]
        self.dram_loaded += SECTOR_BYTES * misses
        self.dram_stored += SECTOR_BYTES * evicted_dirty

    def flush(self) -> None:
        """End of the launch: write back every dirty sector and empty the cache."""
        self.dram_stored += SECTOR_BYTES * sum(self._resident.values())
        self._resident.clear()


@dataclass
class KernelLaunch:
    """One kernel launch under the interpreter: bytes of unmasked elements loaded/stored, counted four ways.

    loaded/stored:                 every element of every load/store instruction (as issued);
    program_loaded/program_stored: each byte address once per program (repeats inside a program hit L1/registers);
    unique_loaded/unique_stored:   each byte address once per launch (every re-read across programs hits cache);
    dram_loaded/dram_stored:       DRAM bytes read/written under `l2`, an LRU model of the L2 cache (see `L2Model`).
    """

    kernel: str
    programs: int = 0
    loaded: int = 0
    stored: int = 0
    program_loaded: int = 0
    program_stored: int = 0
    unique_loaded: int = 0
    unique_stored: int = 0
    dram_loaded: int = 0
    dram_stored: int = 0
    l2: L2Model = field(default_factory=L2Model, repr=False)
    # addresses of the running program, and the per-program unique addresses of the finished ones: {itemsize: [..]}
    _program: Dict[str, Dict[int, List[np.ndarray]]] = field(
        default_factory=lambda: {"load": {}, "store": {}}, repr=False)
    _launch: Dict[str, Dict[int, List[np.ndarray]]] = field(
        default_factory=lambda: {"load": {}, "store": {}}, repr=False)

    @property
    def traffic(self) -> int:
        return self.loaded + self.stored

    @property
    def program_traffic(self) -> int:
        return self.program_loaded + self.program_stored

    @property
    def unique_traffic(self) -> int:
        return self.unique_loaded + self.unique_stored

    @property
    def dram_traffic(self) -> int:
        return self.dram_loaded + self.dram_stored

    def record(self, kind: str, ptrs: np.ndarray, mask: np.ndarray, itemsize: int) -> None:
        """Keep the addresses of the unmasked elements of one load ("load") or store ("store")."""
        shape = np.broadcast_shapes(ptrs.shape, mask.shape)
        touched = np.broadcast_to(ptrs, shape)[np.broadcast_to(mask, shape)]
        self._program[kind].setdefault(itemsize, []).append(touched.astype(np.uint64))
        if kind == "load":
            self.loaded += touched.size * itemsize
        else:
            self.stored += touched.size * itemsize

    def end_program(self) -> None:
        program_addresses = {}
        for kind in ("load", "store"):
            per_itemsize = [np.empty(0, dtype=np.uint64)]
            for itemsize, chunks in self._program[kind].items():
                distinct = _distinct(np.concatenate(chunks))
                self._launch[kind].setdefault(itemsize, []).append(distinct)
                per_itemsize.append(distinct)
                if kind == "load":
                    self.program_loaded += distinct.size * itemsize
                else:
                    self.program_stored += distinct.size * itemsize
            program_addresses[kind] = np.concatenate(per_itemsize)
            self._program[kind] = {}
        self.l2.run_program(program_addresses["load"], program_addresses["store"])

    def close(self, programs: int) -> None:
        self.end_program()
        self.programs = programs
        self.unique_loaded = _unique_bytes(self._launch["load"])
        self.unique_stored = _unique_bytes(self._launch["store"])
        self._launch = {"load": {}, "store": {}}
        self.l2.flush()
        self.dram_loaded, self.dram_stored = self.l2.dram_loaded, self.l2.dram_stored


def _distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values: np.unique's result, by a sort and a neighbour compare (numpy 2.4's np.unique
    is 10-70x slower on these address arrays)."""
    ordered = np.sort(values)
    first = np.ones(ordered.size, dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return ordered[first]


def _unique_bytes(addrs: Dict[int, List[np.ndarray]]) -> int:
    return sum(int(_distinct(np.concatenate(chunks)).size) * itemsize for itemsize, chunks in addrs.items())


def _itemsize(ptrs) -> int:
    from triton.runtime.interpreter import _get_np_dtype

    return np.dtype(_get_np_dtype(ptrs.get_element_ty())).itemsize


class KernelTraffic(contextlib.AbstractContextManager):
    """Counts, per Triton kernel launch run by the interpreter (TRITON_INTERPRET=1), the bytes of every
    unmasked element loaded and stored (atomics count as one load and one store).

    `loaded`/`stored` are what the kernel issues (a weight re-read by every program counts every time);
    `program_*` count each byte address once per program (what a GPU fetches when nothing is shared between
    programs); `unique_*` once per launch (what DRAM would see if every re-read across programs hit cache);
    `dram_*` what DRAM sees under an LRU model of an L2 cache of `l2_bytes` (see `L2Model`).
    Pass an `OpTraffic` to pause its operator counting while a kernel runs (the interpreter copies arguments
    with aten ops that a GPU launch does not run).
    """

    def __init__(self, op_traffic: Optional[OpTraffic] = None, l2_bytes: int = A100_L2_BYTES):
        self.l2_bytes = l2_bytes
        self.launches: List[KernelLaunch] = []
        self._current: Optional[KernelLaunch] = None
        self._op_traffic = op_traffic
        self._saved = []

    def __enter__(self):
        from triton.runtime import interpreter

        builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
        counter = self
        originals = {
            (builder, "create_masked_load"): builder.create_masked_load,
            (builder, "create_masked_store"): builder.create_masked_store,
            (builder, "create_atomic_rmw"): builder.create_atomic_rmw,
            (builder, "create_atomic_cas"): builder.create_atomic_cas,
            (executor, "__call__"): executor.__call__,
            (builder, "set_grid_idx"): builder.set_grid_idx,
        }

        def set_grid_idx(self, x, y, z):  # the interpreter starts the next program
            counter._require_launch().end_program()
            return originals[(builder, "set_grid_idx")](self, x, y, z)

        def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
            counter._load(ptrs, mask.data)
            return originals[(builder, "create_masked_load")](self, ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(self, ptrs, value, mask, cache_policy):
            counter._store(ptrs, mask.data)
            return originals[(builder, "create_masked_store")](self, ptrs, value, mask, cache_policy)

        def atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
            counter._load(ptr, mask.data)
            counter._store(ptr, mask.data)
            return originals[(builder, "create_atomic_rmw")](self, rmw_op, ptr, val, mask, sem, scope)

        def atomic_cas(self, ptr, cmp, val, sem, scope):
            everything = np.ones(ptr.data.shape, dtype=bool)
            counter._load(ptr, everything)
            counter._store(ptr, everything)
            return originals[(builder, "create_atomic_cas")](self, ptr, cmp, val, sem, scope)

        def launch(self, *args, **kwargs):
            counter._begin(KernelLaunch(getattr(self.fn, "__name__", "kernel"), l2=L2Model(counter.l2_bytes)))
            try:
                return originals[(executor, "__call__")](self, *args, **kwargs)
            finally:
                counter._end()

        replacements = {
            (builder, "create_masked_load"): masked_load,
            (builder, "create_masked_store"): masked_store,
            (builder, "create_atomic_rmw"): atomic_rmw,
            (builder, "create_atomic_cas"): atomic_cas,
            (executor, "__call__"): launch,
            (builder, "set_grid_idx"): set_grid_idx,
        }
        for (owner, name), replacement in replacements.items():
            setattr(owner, name, replacement)
        self._saved = list(originals.items())
        return self

    def __exit__(self, *exc):
        for (owner, name), original in self._saved:
            setattr(owner, name, original)
        self._saved = []
        return None

    def _begin(self, launch: KernelLaunch) -> None:
        if self._current is not None:
            raise RuntimeError(f"nested kernel launch {launch.kernel} inside {self._current.kernel}")
        self._current = launch
        if self._op_traffic is not None:
            self._op_traffic.paused = True

    def _end(self) -> None:
        from triton.runtime.interpreter import interpreter_builder

        self._current.close(programs=int(np.prod(interpreter_builder.grid_dim)))
        self.launches.append(self._current)
        self._current = None
        if self._op_traffic is not None:
            self._op_traffic.paused = False

    def _load(self, ptrs, mask: np.ndarray) -> None:
        self._require_launch().record("load", ptrs.data, mask, _itemsize(ptrs))

    def _store(self, ptrs, mask: np.ndarray) -> None:
        self._require_launch().record("store", ptrs.data, mask, _itemsize(ptrs))

    def _require_launch(self) -> KernelLaunch:
        if self._current is None:
            raise RuntimeError("a Triton load/store ran outside a kernel launch; is TRITON_INTERPRET=1 set?")
        return self._current

    def total(self, attribute: str) -> int:
        return sum(getattr(launch, attribute) for launch in self.launches)


# ---------------------------------------------------------------- CUDA peak memory


class CudaPeakMemory(contextlib.AbstractContextManager):
    """Peak bytes allocated on the CUDA device above the level at entry, read at each `mark(name)`.

    Without a CUDA device it records nothing (`marks` stays empty).
    """

    def __init__(self):
        self.marks: Dict[str, int] = {}
        self._start = 0

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        return None

    def mark(self, name: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.marks[name] = torch.cuda.max_memory_allocated() - self._start


# ---------------------------------------------------------------- time


def no_setup() -> None:
    return None


def cpu_wall_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                  setup: Callable[[], object] = no_setup) -> float:
    """Fastest wall-clock seconds of fn() over `repeats` runs after `warmup` runs; setup() runs untimed before each.

    The minimum, not the mean: on a shared machine the noise only ever adds time.
    """
    samples = []
    for i in range(warmup + repeats):
        setup()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return min(samples)


def gpu_time(fn: Callable[[], object], repeats: int = 20, setup: Callable[[], object] = no_setup) -> Optional[float]:
    """Median GPU seconds of fn() between two CUDA events, setup() untimed before each; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    samples = []
    for i in range(repeats + 2):  # two warm-up runs
        setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def gpu_peak_bandwidth() -> Optional[float]:
    """Theoretical DRAM bandwidth of CUDA device 0 in bytes/s (2 x memory clock x bus width), None without one."""
    if not torch.cuda.is_available():
        return None
    from triton.runtime import driver

    props = driver.active.utils.get_device_properties(torch.cuda.current_device())
    return 2 * props["mem_clock_rate"] * 1e3 * props["mem_bus_width"] / 8
