"""The routed-group op as torch.library custom ops (forward and backward), with fake implementations so
torch.compile(fullgraph=True) traces through them, and the launch sequence of each direction.

Members are served in launch groups (consecutive members with one parameter and output dtype, at most
LAUNCH_MEMBERS: one group in the usual case). Forward: shrink_route_kernel and expand_kernel per launch group.
Backward: output_grad_kernel per launch group (each dY read once), route_grad_kernel once for a routed group,
input_grad_kernel per launch group (x read once for the common shapes); in deterministic mode also rank_grad_kernel
per launch group; plus, outside the kernels, the memsets of the buffers added into. Saved for backward: x (a
reference), h (T, M*HS) in x's dtype (HS = r for Hydra, E*r, or k*r under top-k: the selected experts' blocks only),
gates and p_tok (T, E) fp32, under top-k each token's selected experts (T,) int64, the parameters and the seed
tensor. An empty batch (T = 0) launches nothing. Under a routing rule (plan.RuleArgs, run-time kernel arguments) the
forward also counts each expert's routed and kept real tokens from the stored selections, and applies Switch's
capacity there, between the two forward launches (`apply_capacity`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from .expand import run_expand
from .input_grad import input_grad_items, run_input_grad
from .output_grad import run_output_grad
from .plan import (
    ROUTER_LOGITS, ROUTER_NONE, ROUTER_WEIGHT, RULE_CODES, GroupPlan, RuleArgs, launch_groups, output_dtype,
    param_dtype,
)
from .rank_grad import run_rank_grad
from .route_grad import run_route_grad
from .shrink_route import run_shrink_route

F32 = torch.float32


def member_dtypes(x: Tensor, As, Bs, bases):
    """(parameter dtype, output dtype) per member, as the kernels read and write them (see plan.param_dtype)."""
    params = [param_dtype(x.dtype, A.dtype) if A.dtype == B.dtype else F32 for A, B in zip(As, Bs)]
    outputs = [output_dtype(x.dtype, b.dtype) for b in bases] if bases else [x.dtype] * len(As)
    return params, outputs


def make_plan(x, As, Bs, bases, router_weight, router_bias, router_logits, task_probs, seed_tensor, scaling,
              num_experts, hydra, kind, top_k, renorm, dropout_p, seed, precision, deterministic, rule) -> GroupPlan:
    """rule: RuleArgs.as_list() (never empty: the custom op's autograd reads [] as a list of tensors); top_k is the
    kernels' k (RuleArgs.top_k)."""
    if kind in ("task", "none"):
        router = ROUTER_NONE
    else:
        router = ROUTER_LOGITS if router_logits is not None else ROUTER_WEIGHT
    params, outputs = member_dtypes(x, As, Bs, bases)
    return GroupPlan(
        T=x.shape[0], d_in=x.shape[1], d_outs=tuple(B.shape[0] for B in Bs), E=num_experts,
        r=Bs[0].shape[1] // num_experts, hydra=hydra, kind=kind, router=router,
        has_bias=router == ROUTER_WEIGHT and router_bias is not None, top_k=top_k, renorm_softmax=renorm == "softmax",
        dropout_p=dropout_p, seed=seed, seed_in_memory=seed_tensor is not None,
        num_sequences=1 if task_probs is None else task_probs.shape[0], scaling=scaling, deterministic=deterministic,
        precision=precision, groups=launch_groups(params, outputs),
        rule=RuleArgs.from_list(rule),
    )


def _empty(like: Tensor, dtype=F32) -> Tensor:
    return like.new_empty(0, dtype=dtype)


def _or_empty(t: Optional[Tensor], like: Tensor, dtype=F32) -> Tensor:
    return _empty(like, dtype) if t is None else t


def _or_none(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 else t


def _aligned(t: Tensor) -> Tensor:
    """Row-major and 16-byte aligned: the kernels index with unit column stride, and the tensors they take in tuples
    are compiled for 16-byte alignment (Triton specialises tuple elements on it)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _as(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return None if t is None else _aligned(t.to(dtype))


def _by_group(plan: GroupPlan, values):
    return [values[g.first:g.first + g.count] for g in plan.groups]


def _stand_in(like: Tensor, dtype) -> Tensor:
    """A pointer for a kernel argument the configuration never reads (its dtype fixed, so the compiled kernel is)."""
    return like.new_empty(16, dtype=dtype)


@torch.library.custom_op("hmora::routed_group_forward", mutates_args=())
def routed_group_forward(
    x: Tensor, As: List[Tensor], Bs: List[Tensor], bases: List[Tensor], router_weight: Optional[Tensor],
    router_bias: Optional[Tensor], router_logits: Optional[Tensor], task_probs: Optional[Tensor],
    alpha: Optional[Tensor], seed_tensor: Optional[Tensor], token_mask: Optional[Tensor],
    selection_bias: Optional[Tensor], scaling: float, num_experts: int, hydra: bool, kind: str, top_k: int,
    renorm: str, dropout_p: float, seed: int, precision: str, rule: List[float],
) -> List[Tensor]:
    """[y_0 .. y_{M-1}, logits, p_tok, gates, h, selected, counts]; absent routing tensors are empty; bases may be
    []; counts (2, E) int64 (routed, kept real tokens per expert) under a rule, else empty."""
    plan = make_plan(x, As, Bs, bases, router_weight, router_bias, router_logits, task_probs, seed_tensor, scaling,
                     num_experts, hydra, kind, top_k, renorm, dropout_p, seed, precision, True, rule)
    ys, logits, p_tok, gates, h, sel, counts = run_forward(plan, x, As, Bs, bases, router_weight, router_bias,
                                                           router_logits, task_probs, alpha, seed_tensor, token_mask,
                                                           selection_bias)
    return ys + [_or_empty(logits, x), _or_empty(p_tok, x), _or_empty(gates, x), h,
                 sel if plan.selective else _empty(x, torch.int64), _or_empty(counts, x, torch.int64)]


def run_forward(plan: GroupPlan, x, As, Bs, bases, router_weight, router_bias, router_logits, task_probs, alpha,
                seed_tensor, token_mask=None, selection_bias=None):
    """The forward launches: (ys, logits, p_tok, gates, h, sel, counts), absent routing tensors None."""
    T, E = plan.T, plan.E
    params, outputs = member_dtypes(x, As, Bs, bases)
    x = _aligned(x)
    As = [_as(A, p) for A, p in zip(As, params)]
    Bs = [_as(B, p) for B, p in zip(Bs, params)]
    kernel_bases = [_as(b, y) for b, y in zip(bases, outputs)] if bases else None
    stand_in = _stand_in(x, F32)
    routing = [torch.empty(T, E, dtype=F32, device=x.device) for _ in range(3)] if plan.routed else [stand_in] * 3
    h = torch.empty(T, plan.M * plan.HS, dtype=x.dtype, device=x.device)
    sel = torch.empty(T, dtype=torch.int64, device=x.device)
    ys = [torch.empty(T, d, dtype=y, device=x.device) for d, y in zip(plan.d_outs, outputs)]
    if T > 0:
        routing_in = [stand_in if t is None else _as(t, F32) for t in (router_weight, router_bias, router_logits,
                                                                      task_probs, alpha)]
        routing_in.append(sel if seed_tensor is None else seed_tensor.reshape(1))
        routing_in.append(stand_in if selection_bias is None else _as(selection_bias, F32))
        for group, group_As in zip(plan.groups, _by_group(plan, As)):
            run_shrink_route(plan, group, x, group_As, routing_in, [h, *routing, sel])
    counts = None
    if plan.routed and plan.rule.code != RULE_CODES["default"]:
        counts = apply_capacity(plan, sel, routing[2], token_mask)
    if T > 0:
        for group, group_Bs, group_bases, group_ys in zip(plan.groups, _by_group(plan, Bs),
                                                          _by_group(plan, kernel_bases or [None] * plan.M),
                                                          _by_group(plan, ys)):
            run_expand(plan, group, h, routing[2], sel, group_Bs, None if kernel_bases is None else group_bases,
                       group_ys)
    if bases:  # outputs whose base has neither x's dtype nor fp32 were computed in fp32
        ys = [y.to(b.dtype) for y, b in zip(ys, bases)]
    logits = routing[0] if plan.computes_logits else None
    p_tok = routing[1] if plan.routed and plan.kind != "task" else None
    gates = routing[2] if plan.routed else None
    return ys, logits, p_tok, gates, h, sel, counts


def apply_capacity(plan: GroupPlan, sel: Tensor, gates: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    """(2, E) int64: per expert the real tokens (token_mask) whose rule chose it, and those that kept it. Under
    Switch(capacity) drops in place, before the expand launch reads them, the selection bits and gates of the tokens
    past the first C real tokens of their sequence for their expert (padding claims nothing and is dropped).
    Deterministic by construction: a token's priority is an integer prefix sum (torch.cumsum over the one-hot of the
    selections, per sequence in position order), exact whatever order a device sums in; no atomics, nothing depends
    on how the kernels' programs were scheduled."""
    T, E = sel.shape[0], plan.E
    chosen = ((sel[:, None] >> torch.arange(E, device=sel.device)) & 1).bool()
    real = torch.ones(T, dtype=torch.bool, device=sel.device) if token_mask is None else token_mask.reshape(-1) != 0
    routed = chosen & real[:, None]
    kept = routed
    if plan.rule.capacity:
        num_sequences = token_mask.shape[0]
        priority = routed.view(num_sequences, T // num_sequences, E).cumsum(1).view(T, E)
        keep = real & ((priority * chosen).sum(1) <= plan.rule.capacity)  # one chosen expert per token (top-1)
        sel.masked_fill_(~keep, 0)
        gates.masked_fill_(~keep[:, None], 0.0)
        kept = routed & keep[:, None]
    return torch.stack([routed.sum(0), kept.sum(0)])


@routed_group_forward.register_fake
def _(x, As, Bs, bases, router_weight, router_bias, router_logits, task_probs, alpha, seed_tensor, token_mask,
      selection_bias, scaling, num_experts, hydra, kind, top_k, renorm, dropout_p, seed, precision, rule):
    T, E = x.shape[0], num_experts
    ys = [x.new_empty(T, B.shape[0], dtype=b.dtype if bases else x.dtype)
          for B, b in zip(Bs, bases or [None] * len(Bs))]
    routing = x.new_empty(T, E, dtype=F32)
    logits = routing if kind in ("token", "hybrid") and router_logits is None else _empty(x)
    p_tok = routing if kind in ("token", "hybrid") else _empty(x)
    gates = routing if kind != "none" else _empty(x)
    sel = x.new_empty(T, dtype=torch.int64) if kind != "none" and top_k > 0 else _empty(x, torch.int64)
    compact = kind != "none" and top_k > 0 and not hydra  # plan.compact
    h = x.new_empty(T, len(As) * (top_k * (Bs[0].shape[1] // E) if compact else As[0].shape[0]))
    has_rule = kind != "none" and RuleArgs.from_list(rule).code != RULE_CODES["default"]
    counts = x.new_empty(2, E, dtype=torch.int64) if has_rule else _empty(x, torch.int64)
    return ys + [logits.clone(), p_tok.clone(), gates.clone(), h, sel, counts]


@dataclass
class WeightGrads:
    """fp32 views into one flat buffer (one memset when atomics need zeros), each 16-byte aligned:
    dA_m, dB_m, dW_r, d bias, d p_task, d alpha (None where absent)."""

    dA: List[Tensor]
    dB: List[Tensor]
    dW: Optional[Tensor]
    dbias: Optional[Tensor]
    dtask: Optional[Tensor]
    dalpha: Optional[Tensor]


def weight_grad_layout(plan: GroupPlan) -> List[tuple]:
    """(field, shape or None) in buffer order; the A and B fields repeat once per member."""
    return (
        [("dA", (plan.HR, plan.d_in))] * plan.M + [("dB", (d, plan.KE)) for d in plan.d_outs] + [
            ("dW", (plan.E, plan.d_in) if plan.computes_logits else None),
            ("dbias", (plan.E,) if plan.has_bias else None),
            ("dtask", (plan.num_sequences, plan.E) if plan.kind in ("task", "hybrid") else None),
            ("dalpha", (1,) if plan.kind == "hybrid" else None),
        ]
    )


def _padded_size(shape) -> int:
    return -(-torch.Size(shape).numel() // 4) * 4  # 4 fp32: every view starts 16-byte aligned


def weight_grad_size(plan: GroupPlan) -> int:
    return sum(_padded_size(shape) for _, shape in weight_grad_layout(plan) if shape is not None)


def split_weight_grads(plan: GroupPlan, flat: Tensor) -> WeightGrads:
    fields = {"dA": [], "dB": []}
    offset = 0
    for name, shape in weight_grad_layout(plan):
        view = None
        if shape is not None:
            view = flat[offset:offset + torch.Size(shape).numel()].view(shape)
            offset += _padded_size(shape)
        if name in fields:
            fields[name].append(view)
        else:
            fields[name] = view
    return WeightGrads(**fields)


@torch.library.custom_op("hmora::routed_group_backward", mutates_args=())
def routed_group_backward(
    dys: List[Tensor], dlogits_in: Optional[Tensor], dp_tok_in: Optional[Tensor], dgates_in: Optional[Tensor],
    x: Tensor, As: List[Tensor], Bs: List[Tensor], router_weight: Optional[Tensor], router_bias: Optional[Tensor],
    router_logits: Optional[Tensor], task_probs: Optional[Tensor], alpha: Optional[Tensor],
    seed_tensor: Optional[Tensor], selection_bias: Optional[Tensor], p_tok: Optional[Tensor],
    gates: Optional[Tensor], h: Tensor, sel: Optional[Tensor], scaling: float, num_experts: int, hydra: bool,
    kind: str, top_k: int, renorm: str, dropout_p: float, seed: int, precision: str, rule: List[float],
    deterministic: bool,
) -> List[Tensor]:
    """[dx, weight gradients as one flat fp32 buffer (see weight_grad_layout), d router_logits or empty]."""
    plan = make_plan(x, As, Bs, dys, router_weight, router_bias, router_logits, task_probs, seed_tensor, scaling,
                     num_experts, hydra, kind, top_k, renorm, dropout_p, seed, precision, deterministic, rule)
    dx, flat, dlogits = run_backward(plan, dys, dlogits_in, dp_tok_in, dgates_in, x, As, Bs, router_weight,
                                     task_probs, alpha, seed_tensor, p_tok, gates, h, sel, selection_bias)
    return [dx, flat, _or_empty(dlogits if plan.router == ROUTER_LOGITS else None, x)]


def run_backward(plan: GroupPlan, dys, dlogits_in, dp_tok_in, dgates_in, x, As, Bs, router_weight, task_probs,
                 alpha, seed_tensor, p_tok, gates, h, sel, selection_bias=None):
    """The backward launches: (dx, flat fp32 weight gradients, dlogits or None). dys are in the kernels' output
    dtypes (see member_dtypes)."""
    T, E = plan.T, plan.E
    params, _ = member_dtypes(x, As, Bs, dys)
    make = torch.empty if plan.deterministic else torch.zeros
    flat = make(weight_grad_size(plan), dtype=F32, device=x.device)
    grads = split_weight_grads(plan, flat)
    dx = torch.empty_like(x)
    if T == 0:
        return dx, flat.zero_(), (x.new_zeros(0, E, dtype=F32) if plan.routed else None)
    x, dys, h = _aligned(x), [_aligned(d) for d in dys], _aligned(h)
    As = [_as(A, p) for A, p in zip(As, params)]
    Bs = [_as(B, p) for B, p in zip(Bs, params)]
    stand_in = _stand_in(x, F32)
    sel = torch.empty(1, dtype=torch.int64, device=x.device) if sel is None else _aligned(sel)
    # rank and gate gradients: added into (atomic mode), or dh written whole and dgates added into rows owned
    rank_width, gate_width = plan.M * plan.HS, E if plan.routed else 0
    scratch = make(T * rank_width + T * gate_width, dtype=F32, device=x.device)
    if plan.deterministic and plan.routed:
        scratch[T * rank_width:].zero_()
    dh = scratch[:T * rank_width].view(T, rank_width)
    dgates = scratch[T * rank_width:].view(T, gate_width) if plan.routed else stand_in
    gates = stand_in if gates is None else _aligned(gates)
    groups = list(zip(plan.groups, _by_group(plan, dys), _by_group(plan, Bs)))
    for group, group_dys, group_Bs in groups:
        run_output_grad(plan, group, group_dys, group_Bs, grads.dB[group.first:group.first + group.count], h,
                        gates, sel, dh, dgates)
    if plan.deterministic:
        for group, group_dys, group_Bs in groups:
            run_rank_grad(plan, group, group_dys, group_Bs, h, gates, sel, dh, dgates)
    dlogits = dtask_tok = dalpha_tok = None
    if plan.routed:
        dlogits = torch.empty(T, E, dtype=F32, device=x.device) if plan.kind != "task" else None
        dtask_tok = torch.empty(T, E, dtype=F32, device=x.device) if plan.kind in ("task", "hybrid") else None
        dalpha_tok = torch.empty(T, dtype=F32, device=x.device) if plan.kind == "hybrid" else None
        run_route_grad(plan, dgates, None if p_tok is None else _aligned(p_tok),
                       None if task_probs is None else _as(task_probs, F32), None if alpha is None else _as(alpha, F32),
                       *[None if t is None else _as(t, F32) for t in (dgates_in, dp_tok_in, dlogits_in,
                                                                      selection_bias)],
                       sel, [stand_in if t is None else t for t in (dlogits, dtask_tok, dalpha_tok)])
    items = sum(input_grad_items(plan, group) for group in plan.groups)
    dx_sum = dx if x.dtype == F32 else torch.empty(T, plan.d_in, dtype=F32, device=x.device) if items > 1 else stand_in
    weight = _as(router_weight, F32) if plan.computes_logits else stand_in
    routing_grads = [stand_in if t is None else t for t in (grads.dW, grads.dbias, grads.dtask, grads.dalpha)]
    seed_ptr = sel if seed_tensor is None else seed_tensor.reshape(1)
    for group, group_As in zip(plan.groups, _by_group(plan, As)):
        run_input_grad(plan, group, x, group_As, grads.dA[group.first:group.first + group.count], dh, sel, seed_ptr,
                       dx, dx_sum, (weight, dlogits, dtask_tok, dalpha_tok), routing_grads)
    return dx, flat, dlogits


@routed_group_backward.register_fake
def _(dys, dlogits_in, dp_tok_in, dgates_in, x, As, Bs, router_weight, router_bias, router_logits, task_probs,
      alpha, seed_tensor, selection_bias, p_tok, gates, h, sel, scaling, num_experts, hydra, kind, top_k, renorm,
      dropout_p, seed, precision, rule, deterministic):
    plan = make_plan(x, As, Bs, dys, router_weight, router_bias, router_logits, task_probs, seed_tensor, scaling,
                     num_experts, hydra, kind, top_k, renorm, dropout_p, seed, precision, deterministic, rule)
    d_router_logits = x.new_empty(plan.T, plan.E, dtype=F32) if plan.router == ROUTER_LOGITS else None
    return [torch.empty_like(x), x.new_empty(weight_grad_size(plan), dtype=F32), _or_empty(d_router_logits, x)]


def _setup_context(ctx, inputs, output):
    (x, As, Bs, bases, router_weight, router_bias, router_logits, task_probs, alpha, seed_tensor, token_mask,
     selection_bias, scaling, num_experts, hydra, kind, top_k, renorm, dropout_p, seed, precision, rule) = inputs
    M = len(As)
    logits, p_tok, gates, h, sel, counts = output[M:]
    ctx.mark_non_differentiable(h, sel, counts)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, router_weight, router_bias, router_logits, task_probs, alpha, seed_tensor,
                          selection_bias, _or_none(p_tok), _or_none(gates), h, _or_none(sel), *As, *Bs)
    ctx.meta = dict(scaling=scaling, num_experts=num_experts, hydra=hydra, kind=kind, top_k=top_k, renorm=renorm,
                    dropout_p=dropout_p, seed=seed, precision=precision, rule=rule)
    ctx.num_members, ctx.num_bases = M, len(bases)
    _, ctx.output_dtypes = member_dtypes(x, As, Bs, bases)
    ctx.param_dtypes = dict(x=x.dtype, As=[A.dtype for A in As], Bs=[B.dtype for B in Bs],
                            **{k: None if t is None else t.dtype for k, t in
                               dict(router_weight=router_weight, router_bias=router_bias,
                                    router_logits=router_logits, task_probs=task_probs, alpha=alpha).items()})
    ctx.alpha_shape = None if alpha is None else alpha.shape


def _backward(ctx, grads):
    M = ctx.num_members
    (x, router_weight, router_bias, router_logits, task_probs, alpha, seed_tensor, selection_bias, p_tok, gates, h,
     sel, *params) = ctx.saved_tensors
    As, Bs = params[:M], params[M:]
    dys = [torch.zeros(x.shape[0], B.shape[0], dtype=dt, device=x.device) if g is None else g.to(dt)
           for g, B, dt in zip(grads[:M], Bs, ctx.output_dtypes)]
    dlogits_in, dp_tok_in, dgates_in = (None if g is None or g.numel() == 0 else g for g in grads[M:M + 3])
    out = routed_group_backward(
        dys, dlogits_in, dp_tok_in, dgates_in, x, list(As), list(Bs), router_weight, router_bias, router_logits,
        task_probs, alpha, seed_tensor, selection_bias, p_tok, gates, h, sel,
        deterministic=torch.are_deterministic_algorithms_enabled(), **ctx.meta,
    )
    dtypes = ctx.param_dtypes
    dx, flat, dlogits = out[0], out[1], _or_none(out[2])
    weight_grads = split_weight_grads(make_plan(x, As, Bs, dys, router_weight, router_bias, router_logits, task_probs,
                                                seed_tensor, deterministic=True, **ctx.meta), flat)
    dAs = [g.to(dt) for g, dt in zip(weight_grads.dA, dtypes["As"])]
    dBs = [g.to(dt) for g, dt in zip(weight_grads.dB, dtypes["Bs"])]
    dW, dbias, dtask, dalpha = weight_grads.dW, weight_grads.dbias, weight_grads.dtask, weight_grads.dalpha
    d_bases = [g for g in grads[:M]] if ctx.num_bases else []
    cast = lambda g, name: None if g is None or dtypes[name] is None else g.to(dtypes[name])  # noqa: E731
    if dalpha is not None:
        dalpha = dalpha.view(ctx.alpha_shape)
    return (dx, dAs, dBs, d_bases, cast(dW, "router_weight"), cast(dbias, "router_bias"),
            cast(dlogits, "router_logits"), cast(dtask, "task_probs"), cast(dalpha, "alpha"),
            *[None] * 13)  # seed_tensor, token_mask, selection_bias and the non-tensor arguments


routed_group_forward.register_autograd(_backward, setup_context=_setup_context)
