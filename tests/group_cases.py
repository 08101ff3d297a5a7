"""Random routed-group problems and a helper that runs one on a backend and collects values and gradients."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

import hmora_kernels as hk

from tolerances import assert_close


@dataclass(frozen=True)
class GroupCase:
    """One routed-group problem; `why` says what the case exists to catch."""

    why: str
    T: int
    d_in: int
    d_outs: Sequence[int]
    E: int
    r: int
    hydra: bool = False
    kind: str = "token"
    top_k: Optional[int] = None
    renorm: str = "softmax"
    n_seq: int = 1
    dtype: torch.dtype = torch.float32
    param_dtype: Optional[torch.dtype] = None  # None: parameters in the activation dtype
    dropout_p: float = 0.0
    with_bases: bool = True
    rule: object = None     # a routing rule of hmora_kernels (Switch, TopP, RankWise) or None
    padded: bool = False    # token_mask with left padding: sequence i starts with min(i, seq_len - 1) pads

    def __str__(self) -> str:
        return self.why


@dataclass
class GroupProblem:
    x: torch.Tensor
    members_A: list
    members_B: list
    router_weight: Optional[torch.Tensor]
    router_bias: Optional[torch.Tensor]
    task_probs: Optional[torch.Tensor]
    alpha: Optional[torch.Tensor]
    bases: Optional[list]
    token_mask: Optional[torch.Tensor] = None
    selection_bias: Optional[torch.Tensor] = None
    scaling: float = 2.0
    grad_weights: dict = field(default_factory=dict)

    def leaves(self) -> dict:
        named = {"x": self.x, "router_weight": self.router_weight, "router_bias": self.router_bias,
                 "task_probs": self.task_probs, "alpha": self.alpha}
        named.update({f"A{m}": A for m, A in enumerate(self.members_A)})
        named.update({f"B{m}": B for m, B in enumerate(self.members_B)})
        return {k: v for k, v in named.items() if v is not None}


def make_problem(case: GroupCase, seed: int = 0) -> GroupProblem:
    """Inputs drawn in float64 and rounded to the case's dtypes (so the float64 reference sees the same values)."""
    g = torch.Generator().manual_seed(seed)
    pdt = case.param_dtype or case.dtype

    def rand(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    rows_A = case.r if case.hydra else case.E * case.r
    router = case.kind != "task"
    task = case.kind != "token"
    p_task = torch.softmax(rand(case.n_seq, case.E, dtype=torch.float64, scale=2.0), -1).float() if task else None
    problem = GroupProblem(
        x=rand(case.T, case.d_in, dtype=case.dtype),
        members_A=[rand(rows_A, case.d_in, dtype=pdt, scale=case.d_in ** -0.5) for _ in case.d_outs],
        members_B=[rand(d, case.E * case.r, dtype=pdt, scale=0.5) for d in case.d_outs],
        router_weight=rand(case.E, case.d_in, dtype=torch.float32, scale=2 * case.d_in ** -0.5) if router else None,
        router_bias=rand(case.E, dtype=torch.float32, scale=0.1) if router else None,
        task_probs=p_task,
        alpha=torch.tensor(0.3) if case.kind == "hybrid" else None,
        bases=[rand(case.T, d, dtype=case.dtype) for d in case.d_outs] if case.with_bases else None,
    )
    if case.rule is not None:
        seq_len = case.T // case.n_seq
        positions = torch.arange(seq_len)
        problem.token_mask = torch.stack([positions >= min(i, seq_len - 1) if case.padded else positions >= 0
                                          for i in range(case.n_seq)])
    if isinstance(case.rule, hk.RankWise):
        problem.selection_bias = rand(case.E, dtype=torch.float32, scale=0.02)
    # fixed random weights turn every output into a scalar loss whose gradient reaches every input
    problem.grad_weights = {
        "outputs": [rand(case.T, d, dtype=torch.float64) for d in case.d_outs],
        "p_tok": rand(case.T, case.E, dtype=torch.float64),
        "gates": rand(case.T, case.E, dtype=torch.float64),
    }
    return problem


def _forward(case: GroupCase, problem: GroupProblem, backend: str, as_float64: bool, seed: int,
             reuse_bases: bool = False):
    """(leaves that require grad, GroupOutput) of one backend's forward on the problem.
    The bases are fresh copies, so reuse_bases may write into them."""
    def prep(t):
        if t is None:
            return None
        t = t.detach().double() if as_float64 else t.detach().clone()
        return t.requires_grad_(True)

    leaves = {k: prep(v) for k, v in problem.leaves().items()}
    bases = None
    if problem.bases is not None:
        bases = [b.detach().double() if as_float64 else b.detach().clone() for b in problem.bases]
    n = len(problem.members_A)
    out = hk.routed_group(
        leaves["x"], [leaves[f"A{m}"] for m in range(n)], [leaves[f"B{m}"] for m in range(n)], problem.scaling,
        router_weight=leaves.get("router_weight"), router_bias=leaves.get("router_bias"),
        task_probs=leaves.get("task_probs"), alpha=leaves.get("alpha"), kind=case.kind, top_k=case.top_k,
        renorm=case.renorm, dropout_p=case.dropout_p, seed=seed, bases=bases, reuse_bases=reuse_bases,
        rule=case.rule, token_mask=problem.token_mask, selection_bias=problem.selection_bias, backend=backend,
    )
    return leaves, out


def _token_losses(out, grad_weights: dict) -> torch.Tensor:
    """(T,) float64: each token's share of the scalar loss (every output, gate and p_tok is per token)."""
    per_token = sum((y.double() * wy).sum(-1) for y, wy in zip(out.outputs, grad_weights["outputs"]))
    per_token = per_token + (out.gates.double() * grad_weights["gates"]).sum(-1)
    if out.p_tok is not None:
        per_token = per_token + (out.p_tok.double() * grad_weights["p_tok"]).sum(-1)
    return per_token


def run_group(case: GroupCase, problem: GroupProblem, backend: str, *, as_float64: bool = False, seed: int = 7,
              reuse_bases: bool = False):
    """Forward and backward of one backend; returns ({name: value}, {name: grad}) detached.

    as_float64 runs on float64 copies of the same inputs: that is how the reference gives the exact answer.
    Under a routing rule the values also hold the int64 routed_counts and kept_counts.
    """
    leaves, out = _forward(case, problem, backend, as_float64, seed, reuse_bases)
    _token_losses(out, problem.grad_weights).sum().backward()
    values = {f"y{m}": y.detach() for m, y in enumerate(out.outputs)}
    values["gates"] = out.gates.detach()
    if out.p_tok is not None:
        values["p_tok"] = out.p_tok.detach()
        values["logits"] = out.logits.detach()
    if out.kept_counts is not None:
        values["routed_counts"], values["kept_counts"] = out.routed_counts, out.kept_counts
    grads = {k: v.grad for k, v in leaves.items()}
    return values, grads


def gradient_summand_scales(case: GroupCase, problem: GroupProblem, seed: int = 7) -> dict:
    """{leaf: sum_t |d loss_t / d leaf|}, in float64 on the reference: the scale of the terms that each gradient
    sums over tokens (see tests/tolerances.py). One batched backward over the T per-token losses."""
    leaves, out = _forward(case, problem, "reference", True, seed)
    per_token = _token_losses(out, problem.grad_weights)
    names = list(leaves)
    jacobians = torch.autograd.grad(per_token, [leaves[k] for k in names],
                                    grad_outputs=torch.eye(case.T, dtype=torch.float64), is_grads_batched=True,
                                    allow_unused=True, materialize_grads=True)
    return {name: jac.abs().sum(0) for name, jac in zip(names, jacobians)}


def check_lora_against_reference(backend: str, dtype: torch.dtype, T: int, d_in: int, d_out: int, r: int) -> None:
    """Plain LoRA with dropout: value and the gradients of x, A, B equal the float64 reference."""
    g = torch.Generator().manual_seed(1)
    x, A, B = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(T, d_in), (r, d_in), (d_out, r)])
    base = torch.randn(T, d_out, generator=g, dtype=torch.float64)
    w = torch.randn(T, d_out, generator=g, dtype=torch.float64)

    def run(name, dt):
        leaves = [t.to(dtype).to(dt).requires_grad_(True) for t in (x, A, B)]
        y = hk.lora(*leaves, 1.5, dropout_p=0.1, seed=3, base=base.to(dtype).to(dt), backend=name)
        (y.double() * w).sum().backward()
        return y, [t.grad for t in leaves]

    y_ref, g_ref = run("reference", torch.float64)
    y, grads = run(backend, dtype)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "lora value")
    for name, gr, ge in zip("xAB", grads, g_ref):
        assert_close(gr, ge, dtype, f"lora grad {name}")
