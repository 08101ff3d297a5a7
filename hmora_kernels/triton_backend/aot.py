"""Ahead-of-time compile check: every kernel configuration the planner can choose, compiled to cubin for real GPU
targets on a machine without a GPU, exactly as Triton's JIT would compile it, with its register / shared-memory /
spill figures.

Nothing here is a hand list. `plan.configuration_space()` walks the accepted space (every E and r inside the
limits, Hydra or not, 1..LAUNCH_MEMBERS members per launch, both dot precisions, deterministic or not, routed group
or plain LoRA) and yields each kernel's configuration; every distinct configuration meets every dtype signature the
planner admits (`DTYPES`). The arguments come from recording the real forward and backward of a representative
group on meta tensors (`observe_launches(record_only=True)`), and the signature, constexprs and alignment
attributes from Triton's own argument binder, so the compiled kernel is the one the launch code would run.
Must run in a process where TRITON_INTERPRET is unset (else the kernels are interpreter objects).
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .autograd import make_plan, member_dtypes, run_backward, run_forward
from .launch import MAX_REGISTERS, observe_launches
from ..types import RankWise, Switch, TopP
from .plan import KERNEL_DTYPES, KernelConfig, RuleArgs, Shape, configuration_space

# Hardware limits per target: registers per thread, registers per SM, shared memory per block (bytes).
LIMITS = {80: dict(reg=255, reg_file=65536, shared=163 * 1024), 90: dict(reg=255, reg_file=65536, shared=227 * 1024)}
ARCHS = (80, 90)
F32 = torch.float32


def dtype_signatures(precision: str) -> List[Tuple[torch.dtype, torch.dtype, torch.dtype]]:
    """(x, parameters, outputs) dtypes the planner admits at a dot precision: parameters and outputs in x's dtype or
    fp32 (plan.param_dtype / plan.output_dtype); "ieee" only with fp32 activations (plan.dot_precision)."""
    xs = (F32,) if precision == "ieee" else KERNEL_DTYPES
    return [(x, p, y) for x in xs for p in sorted({x, F32}, key=str) for y in sorted({x, F32}, key=str)]


@dataclass(frozen=True)
class GroupSpec:
    """A routed group (or plain LoRA) to record the launches of: shapes, dtypes, routing and mode."""

    E: int
    r: int
    hydra: bool
    x: torch.dtype
    params: Tuple[torch.dtype, ...]          # per member (A and B)
    bases: Optional[Tuple[torch.dtype, ...]]  # per member, or None: no bases
    kind: str = "hybrid"
    top_k: int = 2
    logits_in: bool = False                   # router logits given (a deeper router) instead of a router weight
    deterministic: bool = False
    precision: str = "tf32"
    T: int = 64
    d_in: int = 64
    rule: Optional[object] = None             # a routing rule of hmora_kernels.types (run-time kernel arguments)

    def __str__(self) -> str:
        def names(dtypes):
            return "/".join(str(d).replace("torch.", "") for d in dtypes)

        return (f"E={self.E} r={self.r} {'Hydra' if self.hydra else 'per-expert A'} members={len(self.params)} "
                f"{self.kind} top_k={self.top_k}{' logits in' if self.logits_in else ''} {self.precision}"
                f"{' deterministic' if self.deterministic else ''} x={names([self.x])} params={names(self.params)} "
                f"bases={names(self.bases) if self.bases else None}{f' rule={self.rule}' if self.rule else ''}")


def representative(shape: Shape, deterministic: bool, routed: bool, dtypes) -> GroupSpec:
    """One group whose launches include the configurations of `shape` (dtypes: x, parameters, outputs)."""
    x, param, out = dtypes
    return GroupSpec(shape.E, shape.r, shape.hydra, x, (param,) * shape.members, (out,) * shape.members,
                     "hybrid" if routed else "none", min(2, shape.E) if routed else 0, False, deterministic,
                     shape.precision)


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


@functools.lru_cache(maxsize=None)
def recorded_launches(spec: GroupSpec):
    """(kernel name, kernel, args, constexprs, num_warps) of the forward and backward launches of `spec`, recorded
    from the real launch code on meta tensors."""
    T, E, M = spec.T, spec.E, len(spec.params)
    d_outs = [48 + 16 * m for m in range(M)]
    x = _meta(T, spec.d_in, dtype=spec.x)
    As = [_meta(spec.r if spec.hydra else E * spec.r, spec.d_in, dtype=p) for p in spec.params]
    Bs = [_meta(d, E * spec.r, dtype=p) for d, p in zip(d_outs, spec.params)]
    bases = [_meta(T, d, dtype=b) for d, b in zip(d_outs, spec.bases)] if spec.bases else []
    routed, uses_router = spec.kind != "none", spec.kind in ("token", "hybrid")
    weight = _meta(E, spec.d_in, dtype=F32) if uses_router and not spec.logits_in else None
    bias = _meta(E, dtype=F32) if weight is not None else None
    logits_in = _meta(T, E, dtype=F32) if uses_router and spec.logits_in else None
    task = _meta(4, E, dtype=F32) if spec.kind in ("task", "hybrid") else None
    alpha = _meta(1, dtype=F32) if spec.kind == "hybrid" else None
    rule = RuleArgs.of(spec.rule, E)
    top_k, renorm = (spec.rule.top_k, "sum") if isinstance(spec.rule, RankWise) else (spec.top_k, "softmax")
    plan = make_plan(x, As, Bs, bases, weight, bias, logits_in, task, None, 2.0, E, spec.hydra, spec.kind,
                     rule.top_k(top_k), renorm, 0.1, 1234, spec.precision, spec.deterministic,
                     rule.as_list())
    token_mask = _meta(4, T // 4, dtype=torch.int64) if spec.rule is not None else None
    selection_bias = _meta(E, dtype=F32) if isinstance(spec.rule, RankWise) else None
    with observe_launches(record_only=True) as seen:
        ys, logits, p_tok, gates, h, sel, _ = run_forward(plan, x, As, Bs, bases, weight, bias, logits_in, task,
                                                          alpha, None, token_mask, selection_bias)
        dys = [_meta(T, d, dtype=dt) for d, dt in zip(d_outs, member_dtypes(x, As, Bs, bases)[1])]
        grad = _meta(T, E, dtype=F32) if routed else None
        run_backward(plan, dys, logits_in, grad if p_tok is not None else None, grad, x, As, Bs, weight, task, alpha,
                     None, p_tok, gates, h, sel if plan.selective else None, selection_bias)
    return tuple((name, kernel, args, constexprs, warps) for name, kernel, _, args, constexprs, warps in seen)


def jit_compile_inputs(kernel, args: dict, constexprs: dict, num_warps: int, arch: int):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT derives them from these arguments."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    options = dict(num_warps=num_warps, maxnreg=MAX_REGISTERS)  # what launch() passes
    bound, specialization, _ = binder(**args, **constexprs, **options)
    return kernel._pack_args(backend, options, bound, specialization, options)


def specialization_key(name: str, kernel, args: dict, constexprs: dict, num_warps: int) -> str:
    """What makes two launches one compiled kernel (the same on both targets)."""
    options, signature, constants, attrs = jit_compile_inputs(kernel, args, constexprs, num_warps, ARCHS[0])
    return repr((name, signature, sorted(constants.items()), sorted(attrs.items()), num_warps))


def representatives() -> Dict[KernelConfig, List[GroupSpec]]:
    """For every configuration the planner can choose, one representative group per admitted dtype signature."""
    first_seen: Dict[KernelConfig, Tuple[Shape, bool, bool]] = {}
    for config, shape, deterministic, routed in configuration_space():
        first_seen.setdefault(config, (shape, deterministic, routed))
    return {config: [representative(shape, deterministic, routed, dtypes)
                     for dtypes in dtype_signatures(shape.precision)]
            for config, (shape, deterministic, routed) in first_seen.items()}


@dataclass(frozen=True)
class Job:
    """One kernel launch of one representative: compiled once per target."""

    rep: GroupSpec
    launch_index: int
    kernel: str
    config: KernelConfig


@functools.lru_cache(maxsize=1)
def all_jobs() -> Tuple[Job, ...]:
    """Every distinct compiled kernel (by the JIT's specialisation key) the planner can launch."""
    jobs, seen = [], set()
    for config, reps in representatives().items():
        for rep in reps:
            for index, (name, kernel, args, constexprs, warps) in enumerate(recorded_launches(rep)):
                if name != config.kernel + "_kernel" or constexprs != config.as_dict():
                    continue
                key = specialization_key(name, kernel, args, constexprs, warps)
                if key not in seen:
                    seen.add(key)
                    jobs.append(Job(rep, index, name, config))
    return tuple(jobs)


def job_keys() -> set:
    return {specialization_key(*recorded_launches(job.rep)[job.launch_index]) for job in all_jobs()}


def sampled_groups(count: int, seed: int = 0) -> List[GroupSpec]:
    """Random groups inside the limits, wider than the enumeration's representatives: up to 12 members (two launch
    groups), members of different parameter dtypes, bases of any dtype or none, every routing kind, router logits
    given, any top-k, either mode and precision, and every routing rule (run-time arguments: the same kernels)."""
    import dataclasses
    import random

    from .plan import KERNEL_DTYPES, MAX_RANK, MAX_RANK_WIDTH

    rng = random.Random(seed)
    specs = []
    while len(specs) < count:
        E = rng.choice([1, 2, 3, 5, 8, 13, 16, 17, 31, 48, 64])
        r = rng.randint(1, min(MAX_RANK, MAX_RANK_WIDTH // E))
        x = rng.choice(KERNEL_DTYPES)
        kind = rng.choice(["token", "task", "hybrid", "none"]) if E > 1 else rng.choice(["token", "none"])
        members = 1 if kind == "none" else rng.randint(1, 12)
        bases = rng.choice([None, tuple(rng.choice(KERNEL_DTYPES) for _ in range(members))])
        specs.append(GroupSpec(
            E=1 if kind == "none" else E, r=r, hydra=kind != "none" and E > 1 and rng.random() < 0.5, x=x,
            params=tuple(rng.choice(KERNEL_DTYPES) for _ in range(members)), bases=bases, kind=kind,
            top_k=0 if kind == "none" else rng.randint(0, E), logits_in=kind in ("token", "hybrid") and rng.random() < 0.3,
            deterministic=rng.random() < 0.3, precision=rng.choice(["ieee", "tf32"]) if x == F32 else "tf32",
            T=rng.randint(1, 100), d_in=rng.randint(1, 100)))
        spec = specs[-1]
        if kind != "none" and E > 1 and rng.random() < 0.5:
            rules = [Switch(rng.randint(1, 8)), Switch(), TopP(0.1 + 0.9 * rng.random(), rng.randint(1, E))]
            if kind == "token" and not spec.hydra:
                rules.append(RankWise(rng.randint(1, E)))
            specs[-1] = dataclasses.replace(spec, rule=rng.choice(rules), T=4 * (spec.T // 4 + 1))  # 4 sequences
    return specs


def rule_groups() -> List[GroupSpec]:
    """The routing rules at the paper setting (E 8, r 8, q/k/v members; fp32 and bf16) and SMoRA's (64 rank-1
    experts, 8 active), forward and backward, atomic and deterministic: what `compile_report --rules` compiles. The
    rules are run-time kernel arguments, so these launches are kernels of the enumeration (see uncovered_launches)."""
    F, B = F32, torch.bfloat16
    M = 3  # q/k/v
    return [
        GroupSpec(8, 8, True, F, (F,) * M, (F,) * M, "hybrid", rule=Switch(64)),
        GroupSpec(8, 8, False, B, (B,) * M, (B,) * M, "token", rule=Switch(64), deterministic=True),
        GroupSpec(8, 8, True, B, (B,) * M, (B,) * M, "hybrid", rule=TopP()),
        GroupSpec(8, 8, False, F, (F,) * M, None, "token", rule=TopP(), deterministic=True),
        GroupSpec(64, 1, False, B, (B,) * M, (B,) * M, "token", rule=RankWise(8)),
        GroupSpec(64, 1, False, F, (F,) * M, None, "token", rule=RankWise(8), deterministic=True),
    ]


def launch_jobs(specs) -> Tuple[Job, ...]:
    """One job per distinct compiled kernel (the JIT's specialisation key) among these groups' launches."""
    jobs, seen = [], set()
    for spec in specs:
        for index, (name, kernel, args, constexprs, warps) in enumerate(recorded_launches(spec)):
            key = specialization_key(name, kernel, args, constexprs, warps)
            if key not in seen:
                seen.add(key)
                config = KernelConfig(name.removesuffix("_kernel"), tuple(sorted(constexprs.items())), warps)
                jobs.append(Job(spec, index, name, config))
    return tuple(jobs)


def uncovered_launches(specs) -> List[str]:
    """Launches of these groups whose compiled kernel (the JIT's specialisation key) the enumeration lacks."""
    keys = job_keys()
    missing = []
    for spec in specs:
        for name, kernel, args, constexprs, warps in recorded_launches(spec):
            if specialization_key(name, kernel, args, constexprs, warps) not in keys:
                missing.append(f"{name} {constexprs} for {spec}")
    return missing


def register_pressure(job: Job):
    """Ordering by likely register demand: the largest tiles and fp32 everywhere first."""
    c = job.config.as_dict()
    width = c.get("HC", 0) * c.get("MG", 0) + c.get("EC", 0) * c.get("RCH", 0)
    rep = job.rep
    return (width, c.get("E_PAD", 0), not c.get("HYDRA", False), sum(d == F32 for d in (rep.x, *rep.params)))


def tier_jobs(jobs: List[Job]) -> List[Job]:
    """One job per tier (kernel, block sizes, dot precision, warps): the one with the most register demand."""
    best: Dict[tuple, Job] = {}
    for job in jobs:
        tier = job.config.tier
        if tier not in best or register_pressure(job) > register_pressure(best[tier]):
            best[tier] = job
    return list(best.values())


def compile_launch(kernel, args: dict, constexprs: dict, num_warps: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options, signature, constants, attrs = jit_compile_inputs(kernel, args, constexprs, num_warps, arch)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG, SHARED, LOCAL (spill bytes), STACK of the cubin's one function, from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", text)}
    missing = {"REG", "SHARED", "LOCAL", "STACK"} - usage.keys()
    if missing:
        raise RuntimeError(f"cuobjdump output lacks {sorted(missing)}:\n{text}")
    return usage


def run_job(job: Job, arch: int) -> dict:
    """Compile one job for one target; the row of the report."""
    name, kernel, args, constexprs, warps = recorded_launches(job.rep)[job.launch_index]
    compiled = compile_launch(kernel, args, constexprs, warps, arch)
    usage = resource_usage(compiled.asm["cubin"])
    return dict(kernel=name, config=str(job.rep), arch=f"sm_{arch}", num_warps=warps, constexprs=constexprs,
                tier=repr(job.config.tier), reg=usage["REG"], shared=max(usage["SHARED"], compiled.metadata.shared),
                local=usage["LOCAL"], stack=usage["STACK"], limits=LIMITS[arch],
                wgmma="wgmma" in compiled.asm["ptx"])


def violations(row: dict) -> Optional[str]:
    lim = row["limits"]
    problems = []
    if row["local"] or row["stack"]:
        problems.append(f"spills: LOCAL {row['local']} STACK {row['stack']}")
    if row["reg"] > lim["reg"] or row["reg"] * 32 * row["num_warps"] > lim["reg_file"]:
        problems.append(f"{row['reg']} registers x {32 * row['num_warps']} threads exceed the register file")
    if row["shared"] > lim["shared"]:
        problems.append(f"shared {row['shared']} B > {lim['shared']} B")
    return "; ".join(problems) or None
