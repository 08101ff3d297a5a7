"""Ahead-of-time compile check: every kernel, in every configuration the dispatcher can choose, compiled to
cubin for real GPU targets on a machine without a GPU, with its register / shared-memory / spill figures.

The launches are not described by hand: the real forward and backward run on meta tensors while
`observe_launches(record_only=True)` records each launch's arguments, which become the ASTSource signature.
Must run in a process where TRITON_INTERPRET is unset (else the kernels are interpreter objects).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .autograd import make_plan, run_backward, run_forward
from .launch import observe_launches
from .plan import MAX_EXPERTS, MAX_MEMBERS, MAX_RANK_WIDTH

# Hardware limits per target: registers per thread, registers per SM, shared memory per block (bytes).
LIMITS = {80: dict(reg=255, reg_file=65536, shared=163 * 1024), 90: dict(reg=255, reg_file=65536, shared=227 * 1024)}
ARCHS = (80, 90)

_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
               torch.int32: "i32"}


@dataclass(frozen=True)
class Scenario:
    """One group configuration; together the scenarios reach every block tier and every kernel specialisation."""

    why: str
    d_outs: Tuple[int, ...]
    E: int
    r: int
    hydra: bool = False
    kind: str = "hybrid"
    top_k: int = 2
    renorm: str = "softmax"
    dropout_p: float = 0.1
    dtype: torch.dtype = torch.bfloat16
    param_dtype: torch.dtype = torch.float32
    logits_in: bool = False
    deterministic: bool = False


SCENARIOS = [
    Scenario("paper q/k/v: Hydra E=8 r=8, hybrid top-2, dropout (narrow tier)", (1536, 256, 256), 8, 8, hydra=True),
    Scenario("narrow tier, most experts: E = 16 (the limit), r = 1, 4 members", (256,) * MAX_MEMBERS, MAX_EXPERTS,
             1, hydra=True),
    Scenario("wide tier at its limit: 2 members x E*r = 128", (256, 256), 16, MAX_RANK_WIDTH // 16),
    Scenario("fp16 activations, fp16 parameters, sum renorm", (1536, 256, 256), 8, 8, hydra=True, renorm="sum",
             dtype=torch.float16, param_dtype=torch.float16),
    Scenario("narrow tier at its edge (2 members x E*r = 64), fp32, token-only soft routing, no dropout",
             (512, 512), 8, 8, kind="token", top_k=0, dropout_p=0.0, dtype=torch.float32),
    Scenario("task-only layer", (512,), 8, 8, hydra=True, kind="task"),
    Scenario("router logits from a deeper router, deterministic", (512,), 8, 8, logits_in=True, kind="token",
             deterministic=True),
    Scenario("plain LoRA (o_proj / down_proj): one member, no router", (1536,), 1, 8, kind="none", top_k=0),
]


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def recorded_launches(s: Scenario, T: int = 4096, d_in: int = 1536):
    """(kernel name, kernel, args, constexprs, num_warps) of the forward and backward launches of one scenario."""
    M = len(s.d_outs)
    rows_A = s.r if s.hydra else s.E * s.r
    routed = s.kind != "none"
    x = _meta(T, d_in, dtype=s.dtype)
    As = [_meta(rows_A, d_in, dtype=s.param_dtype) for _ in range(M)]
    Bs = [_meta(d, s.E * s.r, dtype=s.param_dtype) for d in s.d_outs]
    bases = [_meta(T, d, dtype=s.dtype) for d in s.d_outs]
    router = routed and s.kind != "task" and not s.logits_in
    weight = _meta(s.E, d_in, dtype=torch.float32) if router else None
    bias = _meta(s.E, dtype=torch.float32) if router else None
    logits_in = _meta(T, s.E, dtype=torch.float32) if s.logits_in else None
    task = _meta(8, s.E, dtype=torch.float32) if s.kind in ("task", "hybrid") else None
    alpha = _meta(1, dtype=torch.float32) if s.kind == "hybrid" else None
    plan = make_plan(x, Bs, weight, bias, logits_in, task, 2.0, s.E, s.hydra, s.kind, s.top_k, s.renorm,
                     s.dropout_p, 1234, s.deterministic)
    with observe_launches(record_only=True) as seen:
        ys, logits, p_tok, gates, h = run_forward(plan, x, As, Bs, bases, weight, bias, logits_in, task, alpha)
        routing_grad = None if gates is None else _meta(T, s.E, dtype=torch.float32)
        run_backward(plan, ys, logits_in, None if p_tok is None else routing_grad, routing_grad, x, As, Bs,
                     weight, task, alpha, p_tok, gates, h)
    return [(name, kernel, args, constexprs, warps) for name, kernel, _, args, constexprs, warps in seen]


def _type_of(value):
    if isinstance(value, tuple):
        return tuple(_type_of(v) for v in value)
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def compile_launch(kernel, args: dict, constexprs: dict, num_warps: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: _type_of(v) for name, v in args.items()}
    signature.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


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


def compile_jobs(scenarios=SCENARIOS, archs=ARCHS) -> List[Tuple[int, int, int]]:
    """(scenario index, launch index, arch) of every distinct (kernel, signature, constexprs, warps) and arch."""
    jobs, seen = [], set()
    for si, s in enumerate(scenarios):
        for li, (name, _, args, constexprs, warps) in enumerate(recorded_launches(s)):
            key = (name, repr({k: _type_of(v) for k, v in args.items()}), repr(sorted(constexprs.items())), warps)
            if key not in seen:
                seen.add(key)
                jobs.extend((si, li, arch) for arch in archs)
    return jobs


def run_job(job: Tuple[int, int, int], scenarios=SCENARIOS) -> dict:
    """Compile one recorded launch for one arch; the row of the report."""
    si, li, arch = job
    name, kernel, args, constexprs, warps = recorded_launches(scenarios[si])[li]
    compiled = compile_launch(kernel, args, constexprs, warps, arch)
    usage = resource_usage(compiled.asm["cubin"])
    return dict(kernel=name, scenario=scenarios[si].why, arch=f"sm_{arch}", num_warps=warps,
                tiles={k: v for k, v in constexprs.items() if k in ("BM", "BK", "BN")},
                pads={k: v for k, v in constexprs.items() if k in ("R_PAD", "E_SLOTS", "R_SLOTS", "E_PAD", "M", "RANK")},
                reg=usage["REG"], shared=max(usage["SHARED"], compiled.metadata.shared), local=usage["LOCAL"],
                stack=usage["STACK"], limits=LIMITS[arch], wgmma="wgmma" in compiled.asm["ptx"])


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
