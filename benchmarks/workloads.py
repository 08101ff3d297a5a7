"""Workloads from real models, composed from the public ops only, and the minimum bytes their shapes allow.

A routed group is q/k/v of one decoder layer (one router, three members). A decoder layer is every adapter
op of one layer: q/k/v routed group, o plain LoRA, gate/up routed group, down plain LoRA (the paper's
"Mix LoRA" placement). Frozen base GEMMs are not run: their outputs enter as `bases` (the adapters
read-modify-write them), they save no activations (their weights are frozen) and they cost the same in
every implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import hmora_kernels as hk

IMPLEMENTATIONS = ("reference", "torch", "torch.compile", "triton")
PHASES = ("forward", "backward", "both")


@dataclass(frozen=True)
class ModelShape:
    """The linear shapes of one decoder layer: q/o are hidden x hidden, k/v hidden -> kv_out."""

    name: str
    hidden: int
    intermediate: int
    kv_out: int


QWEN2_1_5B = ModelShape("qwen2-1.5b", hidden=1536, intermediate=8960, kv_out=256)  # 12 heads, 2 kv heads of 128
LLAMA3_8B = ModelShape("llama3-8b", hidden=4096, intermediate=14336, kv_out=1024)  # 32 heads, 8 kv heads of 128
MODELS = {m.name: m for m in (QWEN2_1_5B, LLAMA3_8B)}


@dataclass(frozen=True)
class Setting:
    """Adapter hyper-parameters; the defaults are the paper setting (E 8, r 8, Hydra, top-2, dropout 0.1).
    rule: a routing rule of hmora_kernels (Switch, TopP, RankWise; top_k must then be None), on one sequence per
    1024 tokens (Switch's capacity counts per sequence). dropout_rng: the ops' mask generator
    (hmora_kernels.dropout)."""

    num_experts: int = 8
    rank: int = 8
    hydra: bool = True
    top_k: int | None = 2
    dropout_p: float = 0.1
    dtype: torch.dtype = torch.float32
    rule: object = None
    dropout_rng: str = "philox"  # the ops' default (the same masks in every backend); hmora's models use "native"
    param_dtype: torch.dtype | None = None  # A, B and the router; None: dtype. hmora's models keep them in fp32

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.param_dtype or self.dtype

    @property
    def routing(self) -> str:
        if isinstance(self.rule, hk.Switch):
            return f"switch C={self.rule.capacity}"
        if isinstance(self.rule, hk.TopP):
            return f"top-p {self.rule.top_p}"
        if isinstance(self.rule, hk.RankWise):
            return f"rank-wise top-{self.rule.top_k}"
        return "soft" if self.top_k is None else f"top-{self.top_k}"

    @property
    def selected_experts(self) -> int | None:
        """Experts a token uses when that is a fixed number (top-k, Switch's 1, RankWise's k), else None."""
        if isinstance(self.rule, hk.Switch):
            return 1
        if isinstance(self.rule, hk.RankWise):
            return self.rule.top_k
        return None if self.rule is not None else self.top_k


PAPER = Setting()


@dataclass(frozen=True)
class Workload:
    model: ModelShape
    setting: Setting
    tokens: int
    scope: str  # "group" (q/k/v routed group) or "layer" (every adapter op of one decoder layer)

    def with_tokens(self, tokens: int) -> "Workload":
        return replace(self, tokens=tokens)

    def adapters(self) -> List["AdapterSpec"]:
        m = self.model
        qkv = AdapterSpec("qkv", m.hidden, (m.hidden, m.kv_out, m.kv_out), routed=True)
        if self.scope == "group":
            return [qkv]
        if self.scope == "layer":
            return [
                qkv,
                AdapterSpec("o", m.hidden, (m.hidden,), routed=False),
                AdapterSpec("gate_up", m.hidden, (m.intermediate, m.intermediate), routed=True),
                AdapterSpec("down", m.intermediate, (m.hidden,), routed=False),
            ]
        raise ValueError(f"scope: expected 'group' or 'layer', got {self.scope!r}")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter op of a layer: a routed group (members share x and one router) or a plain LoRA."""

    name: str
    d_in: int
    d_outs: Tuple[int, ...]
    routed: bool

    def a_rows(self, s: Setting) -> int:
        """Rows of one member's A: r (Hydra, plain LoRA) or E*r (one A per expert)."""
        return s.rank if (s.hydra or not self.routed) else s.num_experts * s.rank

    def rank_columns(self, s: Setting) -> int:
        """Width of what backward needs of one member's rank activation h = drop(x) A^T: r (Hydra), E*r (one A per
        expert), or k*r under top-k with one A per expert (an unselected expert's block meets a gate of 0; Switch:
        k = 1, RankWise: its k; TopP's number varies per token: E*r counted)."""
        if self.routed and not s.hydra and s.selected_experts is not None:
            return min(s.selected_experts, s.num_experts) * s.rank
        return self.a_rows(s)

    def weight_elements(self, s: Setting) -> int:
        router = s.num_experts * (self.d_in + 1) if self.routed else 0
        a_rows = self.a_rows(s)
        b_cols = s.num_experts * s.rank if self.routed else s.rank
        return router + sum(a_rows * self.d_in + d_out * b_cols for d_out in self.d_outs)


# ---------------------------------------------------------------- minimum bytes the shapes allow


def minimum_saved_bytes(w: Workload) -> int:
    """Per adapter op: x once, each member's rank activation h, the gates (T, E) in fp32 for a routed group."""
    s, b, T = w.setting, w.setting.dtype.itemsize, w.tokens
    total = 0
    for a in w.adapters():
        total += T * a.d_in * b + len(a.d_outs) * T * a.rank_columns(s) * b
        total += T * s.num_experts * 4 if a.routed else 0
    return total


def minimum_traffic_bytes(w: Workload, phase: str) -> int:
    """Bytes a fused implementation must move, per SPEC's data flow:

    forward:  read x once and the weights once, read-modify-write each member's y (base + delta) once,
              write what backward keeps (each member's h) and what the op returns (logits, p_tok, gates: (T, E) fp32);
    backward: read each dy, x, the saved h and gates once, the weights once; write dx once and each weight's grad once.
    """
    if phase == "both":
        return minimum_traffic_bytes(w, "forward") + minimum_traffic_bytes(w, "backward")
    s, b, T = w.setting, w.setting.dtype.itemsize, w.tokens
    total = 0
    for a in w.adapters():
        x = T * a.d_in * b
        ys = sum(T * d_out * b for d_out in a.d_outs)
        hs = len(a.d_outs) * T * a.rank_columns(s) * b
        weights = a.weight_elements(s) * s.weight_dtype.itemsize
        routing = T * s.num_experts * 4 if a.routed else 0
        if phase == "forward":
            total += x + weights + 2 * ys + hs + 3 * routing
        elif phase == "backward":
            total += ys + x + hs + routing + weights + x + weights
        else:
            raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")
    return total


# ---------------------------------------------------------------- tensors and the step itself


@dataclass
class Problem:
    """The tensors of one workload: inputs, weights (trainable, excluded from saved bytes), output grads."""

    workload: Workload
    inputs: Dict[str, Dict[str, object]]
    weights: List[torch.Tensor]
    leaves: List[torch.Tensor]
    output_grads: List[torch.Tensor]

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None


def build_problem(w: Workload, seed: int = 0, device: str = "cpu") -> Problem:
    """Random inputs, weights (B non-zero so every gradient path is exercised), bases and output grads."""
    s, T = w.setting, w.tokens
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, grad=True, dtype=s.dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    inputs, weights, grads = {}, [], []
    for a in w.adapters():
        x = rand(T, a.d_in)
        A = [rand(a.a_rows(s), a.d_in, scale=a.d_in ** -0.5, dtype=s.weight_dtype) for _ in a.d_outs]
        B = [rand(d_out, s.num_experts * s.rank if a.routed else s.rank, scale=0.01, dtype=s.weight_dtype)
             for d_out in a.d_outs]
        # in a model a base is a frozen Linear's output: its gradient is dy itself, consumed by that GEMM's backward;
        # a leaf base that requires grad would make autograd clone dy into .grad, a copy no model makes
        bases = [rand(T, d_out, grad=False) for d_out in a.d_outs]
        entry = {"x": x, "A": A, "B": B, "bases": bases}
        weights += A + B
        if a.routed:
            entry["router_weight"] = rand(s.num_experts, a.d_in, scale=a.d_in ** -0.5, dtype=s.weight_dtype)
            entry["router_bias"] = rand(s.num_experts, scale=0.1, dtype=s.weight_dtype)
            weights += [entry["router_weight"], entry["router_bias"]]
            entry.update(rule_inputs(s, T, device))
        inputs[a.name] = entry
        grads += [rand(T, d_out, grad=False) for d_out in a.d_outs]
    leaves = weights + [e["x"] for e in inputs.values()]
    return Problem(w, inputs, weights, leaves, grads)


def rule_inputs(s: Setting, tokens: int, device) -> Dict[str, object]:
    """The routing rule's op inputs: every token real, in sequences of up to 1024; RankWise's selection bias 0."""
    if s.rule is None:
        return {}
    seq_len = min(tokens, 1024)
    inputs = {"rule": s.rule, "token_mask": torch.ones(tokens // seq_len, seq_len, device=device)}
    if isinstance(s.rule, hk.RankWise):
        inputs["selection_bias"] = torch.zeros(s.num_experts, device=device)
    return inputs


def forward(problem: Problem, backend: str) -> List[torch.Tensor]:
    """Every adapter op of the workload through the public ops; returns every member's output, in order."""
    s = problem.workload.setting
    scaling = 2 * s.rank / math.sqrt(s.rank)  # lora_alpha = 2 r, rank-stabilised scaling
    outputs: List[torch.Tensor] = []
    for a in problem.workload.adapters():
        e = problem.inputs[a.name]
        if a.routed:
            group = hk.routed_group(
                e["x"], e["A"], e["B"], scaling, router_weight=e["router_weight"], router_bias=e["router_bias"],
                kind="token", top_k=s.top_k, dropout_p=s.dropout_p, dropout_rng=s.dropout_rng, seed=1, bases=e["bases"],
                backend=backend, rule=e.get("rule"), token_mask=e.get("token_mask"),
                selection_bias=e.get("selection_bias"),
            )
            outputs += group.outputs
        else:
            outputs.append(hk.lora(e["x"], e["A"][0], e["B"][0], scaling, dropout_p=s.dropout_p,
                                   dropout_rng=s.dropout_rng, seed=1, base=e["bases"][0], backend=backend))
    return outputs


def forward_fn(implementation: str) -> Callable[[Problem], List[torch.Tensor]]:
    """The forward of one implementation; "torch.compile" is torch.compile of the torch backend."""
    if implementation == "torch.compile":
        compiled = torch.compile(lambda problem: forward(problem, "torch"), dynamic=False)
        return compiled
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
    return lambda problem: forward(problem, implementation)


def backward(problem: Problem, outputs: Sequence[torch.Tensor]) -> None:
    torch.autograd.backward(list(outputs), problem.output_grads)
