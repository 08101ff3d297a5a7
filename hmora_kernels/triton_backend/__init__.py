"""Fused Triton backend of the routed-group op and of plain LoRA (same signatures as `hmora_kernels.reference`).

Forward per routed group: 2 launches (shrink_route_kernel: x read once for the router and every member,
routing in registers; expand_kernel: y_m = base_m + s (g (x) h_m) B_m^T for all members). Backward: 3 launches
(output_grad_kernel: each dY read once for dB and the rank/gate gradients; route_grad_kernel: routing back to the
logits; input_grad_kernel: x read once for dx, dA and the router's gradients) plus two memsets when gradients
may use atomics, i.e. unless torch.use_deterministic_algorithms(True) is on (then rank_grad_kernel computes the rank
and gate gradients without atomics, reading dY again). Groups of more than 8 members, or of members with different
parameter or output dtypes, take these launches once per launch group. Runs on CUDA tensors, or on CPU tensors when
TRITON_INTERPRET=1 was set before triton was imported.
"""
from __future__ import annotations

import torch
import triton

from .. import torch_backend
from ..types import GroupOutput, RankWise
from .autograd import routed_group_forward
from .plan import RuleArgs, check_limits, dot_precision
from .shrink_route import shrink_route_kernel

__all__ = ["lora", "route", "routed_group"]


def _interpreted() -> bool:
    """Whether the kernels were decorated under TRITON_INTERPRET=1 (the env var is read at decoration time)."""
    return not isinstance(shrink_route_kernel, triton.runtime.JITFunction)


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or set TRITON_INTERPRET=1 before importing triton; "
            f"got tensors on {x.device} (use backend='torch' on CPU)"
        )


def route(logits, *, task_probs=None, alpha=None, kind="token", top_k=None, renorm="softmax", num_tokens=None,
          rule=None, token_mask=None, selection_bias=None):
    """Delegates to `hmora_kernels.torch_backend.route`: standalone routing of a (T, E) tensor is a few tiny
    element-wise ops; the fused path does routing in registers inside `routed_group`."""
    return torch_backend.route(logits, task_probs=task_probs, alpha=alpha, kind=kind, top_k=top_k, renorm=renorm,
                               num_tokens=num_tokens, rule=rule, token_mask=token_mask, selection_bias=selection_bias)


def _seed_args(seed, x: torch.Tensor):
    """(Python seed, seed tensor or None): a 1-element int64 tensor on x's device is read by the kernels themselves,
    so drawing the seed on the device needs no host sync."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
            raise ValueError(f"seed: expected a Python int or a 1-element int64 tensor on {x.device}, got a tensor "
                             f"of shape {tuple(seed.shape)}, {seed.dtype}, on {seed.device}")
        return 0, seed
    return int(seed), None


def routed_group(
    x, members_A, members_B, scaling, *, shape, router_weight=None, router_bias=None, router_logits=None,
    task_probs=None, alpha=None, kind="token", top_k=None, renorm="softmax", dropout_p=0.0, seed=0,
    dropout_rng="philox", bases=None, reuse_bases=False, rule=None, token_mask=None, selection_bias=None,
) -> GroupOutput:
    """y_m = base_m + s * sum_e g_e (drop_m(x) A_{m,e}^T) B_{m,e}^T with g from the group's router, fused.

    Both dropout_rng modes draw the Philox stream of `seed` in registers (it is this backend's native generator);
    `seed` may be a Python int or a 1-element int64 tensor on x's device, which the kernels read themselves;
    the outputs are new tensors (reuse_bases permits, never obliges, writing into the bases).
    Routing rules (hmora_kernels.types) run in the same kernels (run-time arguments, see plan.RuleArgs): Switch as
    top-1 with the unrenormalised gate and its capacity applied between the two forward launches, TopP's selection
    and entropy in registers, RankWise as top-k of sigmoid scores plus the selection bias, k-scaled sum gates."""
    _check_device(x)
    check_limits(shape.num_experts, shape.rank, x.dtype, tuple(B.shape[0] for B in members_B))
    if kind == "task":
        router_weight = router_bias = router_logits = None
    seed, seed_tensor = _seed_args(seed, x)
    rule_args = RuleArgs.of(rule, shape.num_experts)
    if isinstance(rule, RankWise):
        top_k, renorm = rule.top_k, "sum"
    out = routed_group_forward(
        x, list(members_A), list(members_B), list(bases or []), router_weight, router_bias, router_logits,
        task_probs, alpha, seed_tensor, token_mask, selection_bias, float(scaling), shape.num_experts, shape.hydra,
        kind, rule_args.top_k(top_k or 0), renorm, float(dropout_p), seed, dot_precision(x.dtype),
        rule_args.as_list(),
    )
    M = len(members_A)
    logits, p_tok, gates = out[M:M + 3]
    if kind == "task":
        logits = p_tok = None
    elif router_logits is not None:
        logits = router_logits  # as the reference: the given logits are returned as they are
    counts = out[M + 5] if rule is not None else None
    return GroupOutput(list(out[:M]), logits, p_tok, gates, *(() if counts is None else (counts[0], counts[1])))


def lora(x, A, B, scaling, *, dropout_p=0.0, seed=0, dropout_rng="philox", base=None, reuse_base=False):
    """y = base + s * (drop(x) A^T) B^T: the routed group with one member, one expert and no router."""
    _check_device(x)
    check_limits(1, A.shape[0], x.dtype, (B.shape[0],))
    seed, seed_tensor = _seed_args(seed, x)
    out = routed_group_forward(
        x, [A], [B], [] if base is None else [base], None, None, None, None, None, seed_tensor, None, None,
        float(scaling), 1, False, "none", 0, "softmax", float(dropout_p), seed, dot_precision(x.dtype),
        RuleArgs().as_list(),
    )
    return out[0]
