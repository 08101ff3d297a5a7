"""Forward kernel 1 of a routed group: one pass over x gives the router logits, the routing and every h_m.

logits = drop_0(x) W_r^T + b_r;  p_tok = softmax(logits);  gates = topk/renorm(mix(p_tok, p_task, alpha));
h_m = drop_{m+1}(x) A_m^T.   Each x tile is loaded once; every dropout mask is regenerated in registers.
"""
import torch
import triton
import triton.language as tl

from .launch import launch
from .plan import GroupPlan
from .tiles import (
    FP32_DOT, KIND_NONE, KIND_TASK, ROUTER_LOGITS, ROUTER_WEIGHT, dropout_scale, gates_from_probs, mix_probs,
    member_accumulators, softmax_rows, token_block,
)


@triton.jit
def shrink_route_kernel(
    x_ptr, a_ptrs, w_ptr, bias_ptr, logits_in_ptr, task_ptr, alpha_ptr,
    h_ptr, logits_ptr, p_tok_ptr, gates_ptr,
    T, D, E, HR, seq_len, top_k, dropout_p, seed,
    M: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
    KIND: tl.constexpr, ROUTER: tl.constexpr, HAS_BIAS: tl.constexpr, TOP_K: tl.constexpr,
    RENORM_SOFTMAX: tl.constexpr, DROPOUT: tl.constexpr,
):
    rows, row_ok, rows64 = token_block(T, BM)
    ks = tl.arange(0, BK)
    rk = tl.arange(0, R_PAD)
    ce = tl.arange(0, E_PAD)
    accs = member_accumulators(M, BM, R_PAD)
    logits = tl.zeros((BM, E_PAD), tl.float32)
    for k0 in range(0, D, BK):
        cols = k0 + ks
        col_ok = cols < D
        offsets = rows64[:, None] * D + cols[None, :]
        xt = tl.load(x_ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if ROUTER == ROUTER_WEIGHT:  # routing keeps fp32 accuracy end to end
            w_t = tl.load(w_ptr + ce[None, :] * D + cols[:, None], mask=(ce < E)[None, :] & col_ok[:, None],
                          other=0.0).to(tl.float32)
            xr = xt * dropout_scale(offsets, seed, 0, dropout_p, DROPOUT)
            logits += tl.dot(xr, w_t, input_precision=FP32_DOT)
        updated = ()
        for m in tl.static_range(M):
            a_t = tl.load(a_ptrs[m] + rk[None, :] * D + cols[:, None], mask=(rk < HR)[None, :] & col_ok[:, None],
                          other=0.0).to(tl.float32)
            xm = xt * dropout_scale(offsets, seed, m + 1, dropout_p, DROPOUT)
            updated = updated + (accs[m] + tl.dot(xm, a_t),)
        accs = updated
    h_stride = M * HR
    for m in tl.static_range(M):
        tl.store(h_ptr + rows64[:, None] * h_stride + m * HR + rk[None, :], accs[m].to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (rk < HR)[None, :])
    if KIND != KIND_NONE:
        expert_ok = (ce < E)[None, :]  # the math masks columns only: rows past T stay finite, their stores are masked
        valid = row_ok[:, None] & expert_ok
        e_offsets = rows64[:, None] * E + ce[None, :]
        p_tok = tl.zeros((BM, E_PAD), tl.float32)
        if KIND != KIND_TASK:
            if ROUTER == ROUTER_LOGITS:  # a deeper router computed them
                logits = tl.load(logits_in_ptr + e_offsets, mask=valid, other=0.0).to(tl.float32)
            else:
                if HAS_BIAS:
                    logits += tl.load(bias_ptr + ce, mask=ce < E, other=0.0).to(tl.float32)[None, :]
                tl.store(logits_ptr + e_offsets, logits, mask=valid)
            p_tok = softmax_rows(logits, expert_ok)
            tl.store(p_tok_ptr + e_offsets, p_tok, mask=valid)
        p_task, a, p = mix_probs(p_tok, rows, ce, valid, E, seq_len, task_ptr, alpha_ptr, KIND)
        selected, gates = gates_from_probs(p, ce, expert_ok, top_k, TOP_K, RENORM_SOFTMAX)
        tl.store(gates_ptr + e_offsets, gates, mask=valid)


def run_shrink_route(plan: GroupPlan, x, As, router_weight, router_bias, router_logits, task_probs, alpha):
    """Returns (h (T, M*HR) in x's dtype, logits, p_tok, gates) with (T, E) fp32 routing tensors or None."""
    T, E = plan.T, plan.E
    routed = plan.kind != "none"
    h = torch.empty(T, plan.M * plan.HR, dtype=x.dtype, device=x.device)
    logits = torch.empty(T, E, dtype=torch.float32, device=x.device) if plan.computes_logits else None
    p_tok = torch.empty(T, E, dtype=torch.float32, device=x.device) if routed and plan.kind != "task" else None
    gates = torch.empty(T, E, dtype=torch.float32, device=x.device) if routed else None
    blocks = plan.tiles("shrink_route")

    def ptr(t):
        return x if t is None else t  # absent inputs: never read (constexpr-guarded), any pointer will do

    args = dict(
        x_ptr=x, a_ptrs=tuple(As), w_ptr=ptr(router_weight), bias_ptr=ptr(router_bias),
        logits_in_ptr=ptr(router_logits), task_ptr=ptr(task_probs), alpha_ptr=ptr(alpha),
        h_ptr=h, logits_ptr=ptr(logits), p_tok_ptr=ptr(p_tok), gates_ptr=ptr(gates),
        T=T, D=plan.d_in, E=E, HR=plan.HR, seq_len=plan.seq_len, top_k=plan.top_k, dropout_p=plan.dropout_p,
        seed=plan.stream_seed,
    )
    constexprs = dict(
        M=plan.M, BM=blocks.rows, BK=blocks.cols, R_PAD=plan.R_PAD, E_PAD=plan.E_PAD, KIND=plan.kind_code,
        ROUTER=plan.router, HAS_BIAS=plan.has_bias, TOP_K=plan.top_k > 0, RENORM_SOFTMAX=plan.renorm_softmax,
        DROPOUT=plan.dropout_p > 0,
    )
    launch(shrink_route_kernel, (triton.cdiv(T, blocks.rows),), args, constexprs, blocks.num_warps)
    return h, logits, p_tok, gates
