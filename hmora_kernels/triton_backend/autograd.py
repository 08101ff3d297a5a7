"""The routed-group op as a torch.library custom op (forward and backward), with fake implementations so
torch.compile(fullgraph=True) traces through it, and the launch sequence of each direction.

Forward: shrink_route_kernel + expand_kernel (2 launches). Backward: output_grad_kernel (each dY read once),
route_grad_kernel (none for plain LoRA unless deterministic) and input_grad_kernel (x read once), plus, when not
deterministic, two memsets: the fp32 weight-gradient buffer and the slot of rank/gate partials, both added into.
Saved for backward: x (a reference), h (T, M*HR) in x's dtype, gates and p_tok (T, E) fp32, and the parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from .expand import run_expand
from .input_grad import run_input_grad
from .output_grad import run_output_grad
from .plan import ROUTER_LOGITS, ROUTER_NONE, ROUTER_WEIGHT, GroupPlan
from .route_grad import run_route_grad
from .shrink_route import run_shrink_route


def make_plan(x, Bs, router_weight, router_bias, router_logits, task_probs, scaling, num_experts, hydra, kind,
              top_k, renorm, dropout_p, seed, deterministic) -> GroupPlan:
    if kind in ("task", "none"):
        router = ROUTER_NONE
    else:
        router = ROUTER_LOGITS if router_logits is not None else ROUTER_WEIGHT
    return GroupPlan(
        T=x.shape[0], d_in=x.shape[1], d_outs=tuple(B.shape[0] for B in Bs), E=num_experts,
        r=Bs[0].shape[1] // num_experts, hydra=hydra, kind=kind, router=router,
        has_bias=router == ROUTER_WEIGHT and router_bias is not None, top_k=top_k, renorm_softmax=renorm == "softmax",
        dropout_p=dropout_p, seed=seed, num_sequences=1 if task_probs is None else task_probs.shape[0],
        scaling=scaling, deterministic=deterministic,
    )


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return _empty(like) if t is None else t


def _or_none(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 else t


@torch.library.custom_op("hmora::routed_group_forward", mutates_args=())
def routed_group_forward(
    x: Tensor, As: List[Tensor], Bs: List[Tensor], bases: List[Tensor], router_weight: Optional[Tensor],
    router_bias: Optional[Tensor], router_logits: Optional[Tensor], task_probs: Optional[Tensor],
    alpha: Optional[Tensor], scaling: float, num_experts: int, hydra: bool, kind: str, top_k: int, renorm: str,
    dropout_p: float, seed: int,
) -> List[Tensor]:
    """[y_0 .. y_{M-1}, logits, p_tok, gates, h]; absent routing tensors are empty; bases may be []."""
    plan = make_plan(x, Bs, router_weight, router_bias, router_logits, task_probs, scaling, num_experts, hydra,
                     kind, top_k, renorm, dropout_p, seed, deterministic=True)
    ys, logits, p_tok, gates, h = run_forward(plan, x, As, Bs, bases, router_weight, router_bias, router_logits,
                                              task_probs, alpha)
    return ys + [_or_empty(logits, x), _or_empty(p_tok, x), _or_empty(gates, x), h]


def run_forward(plan: GroupPlan, x, As, Bs, bases, router_weight, router_bias, router_logits, task_probs, alpha):
    """The forward launches: (ys, logits, p_tok, gates, h), absent routing tensors None."""
    x, As, Bs, bases = _dense(x), _dense(As), _dense(Bs), _dense(bases)
    h, logits, p_tok, gates = run_shrink_route(plan, x, As, *_dense([router_weight, router_bias, router_logits,
                                                                      task_probs, alpha]))
    out_dtype = bases[0].dtype if bases else x.dtype
    ys = run_expand(plan, h, gates, Bs, bases or None, out_dtype)
    return ys, logits, p_tok, gates, h


@routed_group_forward.register_fake
def _(x, As, Bs, bases, router_weight, router_bias, router_logits, task_probs, alpha, scaling, num_experts, hydra,
      kind, top_k, renorm, dropout_p, seed):
    T, E = x.shape[0], num_experts
    out_dtype = bases[0].dtype if bases else x.dtype
    ys = [x.new_empty(T, B.shape[0], dtype=out_dtype) for B in Bs]
    routing = x.new_empty(T, E, dtype=torch.float32)
    logits = routing if kind in ("token", "hybrid") and router_logits is None else _empty(x)
    p_tok = routing if kind in ("token", "hybrid") else _empty(x)
    gates = routing if kind != "none" else _empty(x)
    h = x.new_empty(T, len(As) * As[0].shape[0])
    return ys + [logits.clone(), p_tok.clone(), gates.clone(), h]


@dataclass
class WeightGrads:
    """fp32 views into one flat buffer (one memset when atomics need zeros):
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


def weight_grad_size(plan: GroupPlan) -> int:
    return sum(torch.Size(shape).numel() for _, shape in weight_grad_layout(plan) if shape is not None)


def split_weight_grads(plan: GroupPlan, flat: Tensor) -> WeightGrads:
    layout = weight_grad_layout(plan)
    pieces = iter(flat.split([torch.Size(s).numel() for _, s in layout if s is not None]))
    fields = {"dA": [], "dB": []}
    for name, shape in layout:
        view = None if shape is None else next(pieces).view(shape)
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
    p_tok: Optional[Tensor], gates: Optional[Tensor], h: Tensor, scaling: float, num_experts: int, hydra: bool,
    kind: str, top_k: int, renorm: str, dropout_p: float, seed: int, deterministic: bool,
) -> List[Tensor]:
    """[dx, weight gradients as one flat fp32 buffer (see weight_grad_layout), d router_logits or empty]."""
    plan = make_plan(x, Bs, router_weight, router_bias, router_logits, task_probs, scaling, num_experts, hydra,
                     kind, top_k, renorm, dropout_p, seed, deterministic)
    dx, flat, dlogits = run_backward(plan, dys, dlogits_in, dp_tok_in, dgates_in, x, As, Bs, router_weight,
                                     task_probs, alpha, p_tok, gates, h)
    return [dx, flat, _or_empty(dlogits if plan.router == ROUTER_LOGITS else None, x)]


def run_backward(plan: GroupPlan, dys, dlogits_in, dp_tok_in, dgates_in, x, As, Bs, router_weight, task_probs,
                 alpha, p_tok, gates, h):
    """The backward launches: (dx, flat fp32 weight gradients, dlogits or None)."""
    x, As, Bs, dys = _dense(x), _dense(As), _dense(Bs), _dense(dys)
    router_weight, task_probs, alpha = _dense([router_weight, task_probs, alpha])
    make = torch.empty if plan.deterministic else torch.zeros
    flat = make(weight_grad_size(plan), dtype=torch.float32, device=x.device)
    grads = split_weight_grads(plan, flat)
    dh_slots, dgates_slots, slot_starts = run_output_grad(plan, dys, Bs, h, gates, grads)
    dlogits, dtask_tok, dalpha_tok = run_route_grad(plan, dh_slots, dgates_slots, slot_starts, p_tok, task_probs,
                                                    alpha, *_dense([dgates_in, dp_tok_in, dlogits_in]))
    dx = run_input_grad(plan, x, As, router_weight if plan.computes_logits else None, dh_slots, dlogits, dtask_tok,
                        dalpha_tok, grads)
    return dx, flat, dlogits


def _dense(t):
    """Row-major copies where needed (the kernels index with unit column stride); lists elementwise; None stays."""
    if isinstance(t, (list, tuple)):
        return [_dense(u) for u in t]
    return None if t is None else t.contiguous()


@routed_group_backward.register_fake
def _(dys, dlogits_in, dp_tok_in, dgates_in, x, As, Bs, router_weight, router_bias, router_logits, task_probs,
      alpha, p_tok, gates, h, scaling, num_experts, hydra, kind, top_k, renorm, dropout_p, seed, deterministic):
    plan = make_plan(x, Bs, router_weight, router_bias, router_logits, task_probs, scaling, num_experts, hydra,
                     kind, top_k, renorm, dropout_p, seed, deterministic)
    d_router_logits = x.new_empty(plan.T, plan.E, dtype=torch.float32) if plan.router == ROUTER_LOGITS else None
    return [torch.empty_like(x), x.new_empty(weight_grad_size(plan), dtype=torch.float32),
            _or_empty(d_router_logits, x)]


def _setup_context(ctx, inputs, output):
    (x, As, Bs, bases, router_weight, router_bias, router_logits, task_probs, alpha, scaling, num_experts, hydra,
     kind, top_k, renorm, dropout_p, seed) = inputs
    M = len(As)
    logits, p_tok, gates, h = output[M:]
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, router_weight, router_bias, router_logits, task_probs, alpha, _or_none(p_tok),
                          _or_none(gates), h, *As, *Bs)
    ctx.meta = dict(scaling=scaling, num_experts=num_experts, hydra=hydra, kind=kind, top_k=top_k, renorm=renorm,
                    dropout_p=dropout_p, seed=seed)
    ctx.num_members, ctx.num_bases = M, len(bases)
    ctx.param_dtypes = dict(x=x.dtype, As=[A.dtype for A in As], Bs=[B.dtype for B in Bs],
                            **{k: None if t is None else t.dtype for k, t in
                               dict(router_weight=router_weight, router_bias=router_bias,
                                    router_logits=router_logits, task_probs=task_probs, alpha=alpha).items()})
    ctx.alpha_shape = None if alpha is None else alpha.shape


def _backward(ctx, grads):
    M = ctx.num_members
    x, router_weight, router_bias, router_logits, task_probs, alpha, p_tok, gates, h, *params = ctx.saved_tensors
    As, Bs = params[:M], params[M:]
    dys = [torch.zeros(x.shape[0], B.shape[0], dtype=h.dtype, device=x.device) if g is None else g
           for g, B in zip(grads[:M], Bs)]
    dlogits_in, dp_tok_in, dgates_in = (None if g is None or g.numel() == 0 else g for g in grads[M:M + 3])
    out = routed_group_backward(
        dys, dlogits_in, dp_tok_in, dgates_in, x, list(As), list(Bs), router_weight, router_bias, router_logits,
        task_probs, alpha, p_tok, gates, h, deterministic=torch.are_deterministic_algorithms_enabled(), **ctx.meta,
    )
    dtypes = ctx.param_dtypes
    dx, flat, dlogits = out[0], out[1], _or_none(out[2])
    weight_grads = split_weight_grads(make_plan(x, Bs, router_weight, router_bias, router_logits, task_probs,
                                                deterministic=True, **ctx.meta), flat)
    dAs = [g.to(dt) for g, dt in zip(weight_grads.dA, dtypes["As"])]
    dBs = [g.to(dt) for g, dt in zip(weight_grads.dB, dtypes["Bs"])]
    dW, dbias, dtask, dalpha = weight_grads.dW, weight_grads.dbias, weight_grads.dtask, weight_grads.dalpha
    d_bases = [g for g in grads[:M]] if ctx.num_bases else []
    cast = lambda g, name: None if g is None or dtypes[name] is None else g.to(dtypes[name])  # noqa: E731
    if dalpha is not None:
        dalpha = dalpha.view(ctx.alpha_shape)
    return (dx, dAs, dBs, d_bases, cast(dW, "router_weight"), cast(dbias, "router_bias"),
            cast(dlogits, "router_logits"), cast(dtask, "task_probs"), cast(dalpha, "alpha"),
            None, None, None, None, None, None, None, None)


routed_group_forward.register_autograd(_backward, setup_context=_setup_context)
