"""One measurement = one workload x one implementation -> rows (one per phase), each metric labelled by its instrument.

Memory metrics come from one instrumented forward and one instrumented backward; wall time from separate,
uninstrumented runs. Numbers that cannot be measured here are None with a note saying why, never guessed.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from hmora_kernels.dispatch import interpreter_enabled, module_for

from . import instruments as ins
from .workloads import PHASES, Problem, Workload, backward, build_problem, forward_fn, minimum_saved_bytes
from .workloads import minimum_traffic_bytes

# What measured each column; printed with the table and written into the JSON.
METRIC_SOURCES = {
    "saved_bytes": "torch.autograd.graph.saved_tensors_hooks, unique storages, weights excluded (forward rows)",
    "saved_min": "x once per adapter op + each member's rank activation + fp32 gates (T, E) per routed group",
    "gpu_peak_bytes": "torch.cuda.max_memory_allocated above what was allocated before the step; only on a CUDA device",
    "launches": "triton: kernel launches counted in the Triton interpreter's grid launcher (+ aten ops around them); "
                "torch paths: aten operators seen by a TorchDispatchMode (views and bare allocations excluded)",
    "aten_bytes": "TorchDispatchMode: sum of input + output tensor bytes of every aten operator",
    "kernel_bytes": "Triton interpreter load/store/atomic instrumented: bytes of unmasked elements, as issued",
    "kernel_program_bytes": "same, each byte address counted once per program (a GPU's fetches when programs share "
                            "nothing: repeats inside a program hit L1/registers)",
    "kernel_unique_bytes": "same, each byte address counted once per launch (DRAM traffic if every re-read hit cache)",
    "kernel_dram_bytes": "same loads/stores, DRAM bytes under an LRU model of the L2 (--l2-mib, default 40 MiB as an "
                         "A100) over 32-byte sectors: each program's distinct sectors applied in launch order, a "
                         "load miss reads 32 B, a store allocates without a read and dirty sectors write 32 B when "
                         "evicted or at the launch's end; the cache starts cold at each launch",
    "kernel_breakdown": "per kernel: launches, MB issued / per-program unique / launch unique / L2 model",
    "traffic_bytes": "kernel_bytes + aten_bytes: everything the implementation moves",
    "traffic_min": "x read once, weights read once, y read-modify-written once, h/gates/outputs written once (fwd); "
                   "dy, x, h, gates, weights read once, dx and weight grads written once (bwd)",
    "cpu_s": "time.perf_counter, fastest of --repeats runs after a warm-up, this CPU (torch paths only; never asserted)",
    "gpu_s": "CUDA events around each run, median of 20 after 2 warm-ups; only on a CUDA device",
    "gpu_gbps": "traffic_min / gpu_s: the bandwidth the minimum bytes would need at the measured time",
    "roofline_s": "traffic_min / the device's peak DRAM bandwidth (2 x memory clock x bus width)",
}


@dataclass
class Row:
    model: str
    scope: str
    tokens: int
    experts: int
    rank: int
    hydra: bool
    routing: str
    dropout: float
    dtype: str
    implementation: str
    phase: str
    dropout_rng: Optional[str] = None  # the mask generator, when there is dropout
    param_dtype: Optional[str] = None  # A, B and the router's dtype, when it is not the activations'
    saved_bytes: Optional[int] = None
    saved_min: Optional[int] = None
    gpu_peak_bytes: Optional[int] = None
    launches: Optional[int] = None
    kernel_launches: Optional[int] = None
    aten_ops: Optional[int] = None
    aten_bytes: Optional[int] = None
    kernel_bytes: Optional[int] = None
    kernel_program_bytes: Optional[int] = None
    kernel_unique_bytes: Optional[int] = None
    kernel_dram_bytes: Optional[int] = None
    kernel_breakdown: str = ""
    traffic_bytes: Optional[int] = None
    traffic_min: Optional[int] = None
    cpu_s: Optional[float] = None
    gpu_s: Optional[float] = None
    gpu_gbps: Optional[float] = None
    gpu_peak_fraction: Optional[float] = None
    roofline_s: Optional[float] = None
    note: str = ""

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def _base_row(w: Workload, implementation: str, phase: str) -> Row:
    s = w.setting
    return Row(w.model.name, w.scope, w.tokens, s.num_experts, s.rank, s.hydra, s.routing, s.dropout_p,
               str(s.dtype).replace("torch.", ""), implementation, phase,
               dropout_rng=s.dropout_rng if s.dropout_p > 0 else None,
               param_dtype=None if s.weight_dtype == s.dtype else str(s.weight_dtype).replace("torch.", ""))


def unavailable_reason(implementation: str) -> Optional[str]:
    """Why an implementation cannot run on this machine, or None when it can."""
    if implementation != "triton":
        return None
    if not torch.cuda.is_available() and not interpreter_enabled():
        return "not available: no CUDA device and TRITON_INTERPRET is not set"
    try:
        module_for("triton")
    except (ImportError, NotImplementedError, RuntimeError) as err:
        return f"not available: {err}"
    return None


def _instrumented(implementation: str, ops: ins.OpTraffic, l2_bytes: int):
    """KernelTraffic for triton under the interpreter (where loads/stores are visible), else nothing."""
    if implementation == "triton" and interpreter_enabled():
        return ins.KernelTraffic(ops, l2_bytes)
    return contextlib.nullcontext()


def kernel_breakdown(launches: List[ins.KernelLaunch]) -> str:
    """'kernel xN: issued/per-program/unique/L2-model MB' per kernel name, in launch order."""
    counts = ("traffic", "program_traffic", "unique_traffic", "dram_traffic")
    totals: Dict[str, List[int]] = {}
    for launch in launches:
        entry = totals.setdefault(launch.kernel, [0] * (1 + len(counts)))
        entry[0] += 1
        for i, count in enumerate(counts, start=1):
            entry[i] += getattr(launch, count)
    return "; ".join(f"{name} x{n}: " + "/".join(f"{b / 1e6:.1f}" for b in counted) + " MB"
                     for name, (n, *counted) in totals.items())


def measure_memory(w: Workload, implementation: str, problem: Problem,
                   l2_bytes: int = ins.A100_L2_BYTES) -> Dict[str, Row]:
    """Saved bytes, launches and traffic for forward, backward and both, from one instrumented step
    (kernel DRAM bytes with an L2 of `l2_bytes`)."""
    forward = forward_fn(implementation)
    counted = {}
    peak = ins.CudaPeakMemory()
    with peak:
        for phase in ("forward", "backward"):
            ops = ins.OpTraffic()
            kernels = _instrumented(implementation, ops, l2_bytes)
            saved = ins.SavedBytes(exclude=problem.weights)
            if phase == "forward":
                with saved, ops, kernels:
                    outputs = forward(problem)
                peak.mark("forward")
            else:
                with ops, kernels:
                    backward(problem, outputs)
                peak.mark("both")
            counted[phase] = (ops, kernels if isinstance(kernels, ins.KernelTraffic) else None, saved)
    problem.clear_grads()

    rows = {}
    for phase in PHASES:
        row = _base_row(w, implementation, phase)
        parts = ["forward", "backward"] if phase == "both" else [phase]
        row.aten_ops = sum(counted[p][0].ops for p in parts)
        row.aten_bytes = sum(counted[p][0].bytes for p in parts)
        row.traffic_min = minimum_traffic_bytes(w, phase)
        kernel_counters = [counted[p][1] for p in parts]
        if all(k is not None for k in kernel_counters):
            row.kernel_launches = sum(len(k.launches) for k in kernel_counters)
            row.kernel_bytes = sum(k.total("traffic") for k in kernel_counters)
            row.kernel_program_bytes = sum(k.total("program_traffic") for k in kernel_counters)
            row.kernel_unique_bytes = sum(k.total("unique_traffic") for k in kernel_counters)
            row.kernel_dram_bytes = sum(k.total("dram_traffic") for k in kernel_counters)
            row.launches = row.kernel_launches + row.aten_ops
            row.traffic_bytes = row.kernel_bytes + row.aten_bytes
            row.kernel_breakdown = kernel_breakdown([launch for k in kernel_counters for launch in k.launches])
        elif implementation == "triton":
            row.note = "kernel traffic needs TRITON_INTERPRET=1"
        else:
            row.launches = row.aten_ops
            row.traffic_bytes = row.aten_bytes
        if phase == "forward":
            row.saved_bytes = counted["forward"][2].bytes
            row.saved_min = minimum_saved_bytes(w)
        row.gpu_peak_bytes = peak.marks.get(phase)
        rows[phase] = row
    return rows


def _timed_step(problem: Problem, implementation: str, phase: str):
    """(step, setup): backward alone times a backward whose forward ran untimed in setup."""
    forward = forward_fn(implementation)
    if phase == "forward":
        return (lambda: forward(problem)), ins.no_setup
    if phase == "both":
        return (lambda: backward(problem, forward(problem))), ins.no_setup
    pending = []

    def setup():
        problem.clear_grads()
        pending.append(forward(problem))

    return (lambda: backward(problem, pending.pop())), setup


def measure_time(w: Workload, implementation: str, problem: Problem, repeats: int) -> Dict[str, Row]:
    """CPU wall time of the torch paths (the interpreter's time means nothing); GPU time on a CUDA device."""
    on_gpu = problem.output_grads[0].is_cuda
    rows = {}
    for phase in PHASES:
        row = _base_row(w, implementation, phase)
        step, setup = _timed_step(problem, implementation, phase)
        if on_gpu:
            row.gpu_s = ins.gpu_time(step, setup=setup)
            row.roofline_s = minimum_traffic_bytes(w, phase) / ins.gpu_peak_bandwidth()
            row.gpu_gbps = minimum_traffic_bytes(w, phase) / row.gpu_s / 1e9
            row.gpu_peak_fraction = row.roofline_s / row.gpu_s
        elif implementation != "triton":
            row.cpu_s = ins.cpu_wall_time(step, repeats=repeats, setup=setup)
        else:
            row.note = "no CUDA device: GPU time, GB/s and roofline cannot be measured here"
        problem.clear_grads()
        rows[phase] = row
    return rows


def merge(memory: Dict[str, Row], timing: Dict[str, Row]) -> List[Row]:
    """One row per phase holding both the memory and the time columns."""
    merged = []
    for phase in PHASES:
        row = memory.get(phase) or timing[phase]
        if phase in memory and phase in timing:
            t = timing[phase]
            row.cpu_s, row.gpu_s, row.gpu_gbps = t.cpu_s, t.gpu_s, t.gpu_gbps
            row.gpu_peak_fraction, row.roofline_s = t.gpu_peak_fraction, t.roofline_s
            row.note = "; ".join(n for n in (row.note, t.note) if n)
        merged.append(row)
    return merged


def measure(w: Workload, implementation: str, memory: bool, timing: bool, repeats: int = 3,
            l2_bytes: int = ins.A100_L2_BYTES) -> List[Row]:
    """Rows for forward, backward and both; an implementation that cannot run gives rows saying why.
    `l2_bytes` sizes the L2 model behind the kernels' DRAM bytes."""
    reason = unavailable_reason(implementation)
    if reason is not None:
        rows = [_base_row(w, implementation, phase) for phase in PHASES]
        for row in rows:
            row.note = reason
        return rows
    # the interpreter runs kernels on CPU tensors; otherwise a CUDA device is where the kernels and timings are
    device = "cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu"
    problem = build_problem(w, device=device)
    try:
        mem = measure_memory(w, implementation, problem, l2_bytes) if memory else {}
        tim = measure_time(w, implementation, problem, repeats) if timing else {}
    except Exception as err:
        # the triton kernels refuse shapes beyond their limits with a ValueError; torch.compile may fail on a
        # machine's toolchain: both are results to report, the sweep goes on. Anything else is a bug: raise.
        if not (implementation == "torch.compile" or (implementation == "triton" and isinstance(err, ValueError))):
            raise
        rows = [_base_row(w, implementation, phase) for phase in PHASES]
        for row in rows:
            row.note = f"not run: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        return rows
    return merge(mem, tim)
