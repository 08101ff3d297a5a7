"""Backward kernel 3: one pass over x for the input gradient and every down-projection gradient, plus the
(T, E) -> (E,) routing sums.

dx = sum_m drop_{m+1}'(dh_m A_m) + drop_0'(dlogits W_r);  dA_m = dh_m^T drop_{m+1}(x);  dW_r = dlogits^T drop_0(x).
Programs own a d_in column block; each walks its share of the tokens (all of them in deterministic mode,
a split with fp32 atomic adds of the weight gradients otherwise). Masks are regenerated from the seed.
One extra program sums the per-token routing gradients: d bias = sum_t dlogits, d alpha = sum_t dalpha_t,
d p_task[seq] = sum over the sequence's tokens; a fixed order, so these are deterministic in every mode.
"""
import torch
import triton
import triton.language as tl

from .launch import launch
from .plan import GroupPlan
from .tiles import FP32_DOT, accumulate, dropout_scale, member_accumulators, token_rows, token_split


@triton.jit
def _sum_rows(src_ptr, t_begin, t_end, width, BM: tl.constexpr, W_PAD: tl.constexpr):
    """Column sums of rows [t_begin, t_end) of a (T, width) fp32 matrix."""
    cw = tl.arange(0, W_PAD)
    total = tl.zeros((W_PAD,), tl.float32)
    for t0 in range(t_begin, t_end, BM):
        rows, row_ok, rows64 = token_rows(t0, t_end, BM)
        ok = row_ok[:, None] & (cw < width)[None, :]
        total += tl.sum(tl.load(src_ptr + rows64[:, None] * width + cw[None, :], mask=ok, other=0.0), 0)
    return total


@triton.jit
def routing_sums(dlogits_ptr, dtask_tok_ptr, dalpha_tok_ptr, dbias_ptr, dtask_ptr, dalpha_ptr, T, E, seq_len,
                 num_sequences, BM: tl.constexpr, E_PAD: tl.constexpr, SUM_BIAS: tl.constexpr,
                 SUM_TASK: tl.constexpr, SUM_ALPHA: tl.constexpr):
    """d bias = sum_t dlogits, d alpha = sum_t dalpha_t, d p_task[seq] = sum over the sequence's tokens."""
    ce = tl.arange(0, E_PAD)
    if SUM_BIAS:
        tl.store(dbias_ptr + ce, _sum_rows(dlogits_ptr, 0, T, E, BM, E_PAD), mask=ce < E)
    if SUM_ALPHA:
        tl.store(dalpha_ptr, tl.sum(_sum_rows(dalpha_tok_ptr, 0, T, 1, BM, 16), 0))
    if SUM_TASK:
        for s in range(num_sequences):
            total = _sum_rows(dtask_tok_ptr, s * seq_len, (s + 1) * seq_len, E, BM, E_PAD)
            tl.store(dtask_ptr + s * E + ce, total, mask=ce < E)


@triton.jit
def input_grad_kernel(
    x_ptr, a_ptrs, w_ptr, dh_ptr, dlogits_ptr, dx_ptr, da_ptrs, dw_ptr,
    dtask_tok_ptr, dalpha_tok_ptr, dbias_ptr, dtask_ptr, dalpha_ptr,
    T, D, E, HR, tokens_per_split, dropout_p, seed, seq_len, num_sequences,
    M: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
    ROUTER_GRAD: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
    SUM_BIAS: tl.constexpr, SUM_TASK: tl.constexpr, SUM_ALPHA: tl.constexpr,
):
    if tl.program_id(0) < tl.cdiv(D, BK):
        cols = tl.program_id(0) * BK + tl.arange(0, BK)
        col_ok = cols < D
        rk = tl.arange(0, R_PAD)
        ce = tl.arange(0, E_PAD)
        accs = member_accumulators(M, R_PAD, BK)
        acc_w = tl.zeros((E_PAD, BK), tl.float32)
        t_begin, t_end = token_split(T, tokens_per_split)
        for t0 in range(t_begin, t_end, BM):
            rows, row_ok, rows64 = token_rows(t0, t_end, BM)
            offsets = rows64[:, None] * D + cols[None, :]
            tile_ok = row_ok[:, None] & col_ok[None, :]
            xt = tl.load(x_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
            dx = tl.zeros((BM, BK), tl.float32)
            if ROUTER_GRAD:  # routing gradients keep fp32 accuracy
                scale = dropout_scale(offsets, seed, 0, dropout_p, DROPOUT)
                dl = tl.load(dlogits_ptr + rows64[:, None] * E + ce[None, :],
                             mask=row_ok[:, None] & (ce < E)[None, :], other=0.0)
                w = tl.load(w_ptr + ce[:, None] * D + cols[None, :], mask=(ce < E)[:, None] & col_ok[None, :],
                            other=0.0).to(tl.float32)
                acc_w += tl.dot(tl.trans(dl), xt * scale, input_precision=FP32_DOT)
                dx += tl.dot(dl, w, input_precision=FP32_DOT) * scale
            updated = ()
            for m in tl.static_range(M):
                scale = dropout_scale(offsets, seed, m + 1, dropout_p, DROPOUT)
                dh = tl.load(dh_ptr + rows64[:, None] * (M * HR) + m * HR + rk[None, :],
                             mask=row_ok[:, None] & (rk < HR)[None, :], other=0.0)
                a = tl.load(a_ptrs[m] + rk[:, None] * D + cols[None, :], mask=(rk < HR)[:, None] & col_ok[None, :],
                            other=0.0).to(tl.float32)
                updated = updated + (accs[m] + tl.dot(tl.trans(dh), xt * scale),)
                dx += tl.dot(dh, a) * scale
            accs = updated
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        for m in tl.static_range(M):
            accumulate(da_ptrs[m] + rk[:, None] * D + cols[None, :], accs[m], (rk < HR)[:, None] & col_ok[None, :],
                       ATOMIC)
        if ROUTER_GRAD:
            accumulate(dw_ptr + ce[:, None] * D + cols[None, :], acc_w, (ce < E)[:, None] & col_ok[None, :], ATOMIC)
    elif tl.program_id(1) == 0:
        routing_sums(dlogits_ptr, dtask_tok_ptr, dalpha_tok_ptr, dbias_ptr, dtask_ptr, dalpha_ptr, T, E, seq_len,
                     num_sequences, BM, E_PAD, SUM_BIAS, SUM_TASK, SUM_ALPHA)

def run_input_grad(plan: GroupPlan, x, As, router_weight, dh, dlogits, dtask_tok, dalpha_tok,
                   weight_grads):
    """Returns dx (x's dtype); writes dA_m, dW_r and the summed routing gradients (bias, task probabilities,
    alpha) into the fp32 buffers of `weight_grads` (which start zeroed unless plan.deterministic: split programs
    add into them atomically). dh (T, M*HR) holds each dh_m in columns m*HR ...; a leading slot axis is ignored."""
    blocks = plan.tiles("input_grad")
    columns = triton.cdiv(plan.d_in, blocks.cols)
    splits, per_split = plan.token_splits(columns, blocks.rows)
    dx = torch.empty_like(x)
    router_grad = dlogits is not None and router_weight is not None
    sum_bias = plan.has_bias and dlogits is not None
    sums = sum_bias or dtask_tok is not None or dalpha_tok is not None

    def ptr(t):
        return dh if t is None else t  # absent tensors are never touched (constexpr-guarded)

    args = dict(
        x_ptr=x, a_ptrs=tuple(As), w_ptr=router_weight if router_grad else x, dh_ptr=dh, dlogits_ptr=ptr(dlogits),
        dx_ptr=dx, da_ptrs=tuple(weight_grads.dA), dw_ptr=weight_grads.dW if router_grad else dh,
        dtask_tok_ptr=ptr(dtask_tok), dalpha_tok_ptr=ptr(dalpha_tok),
        dbias_ptr=weight_grads.dbias if sum_bias else dh,
        dtask_ptr=dh if dtask_tok is None else weight_grads.dtask,
        dalpha_ptr=dh if dalpha_tok is None else weight_grads.dalpha,
        T=plan.T, D=plan.d_in, E=plan.E, HR=plan.HR, tokens_per_split=per_split,
        dropout_p=plan.dropout_p, seed=plan.stream_seed, seq_len=plan.seq_len, num_sequences=plan.num_sequences,
    )
    constexprs = dict(M=plan.M, BM=blocks.rows, BK=blocks.cols, R_PAD=plan.R_PAD, E_PAD=plan.E_PAD,
                      ROUTER_GRAD=router_grad, DROPOUT=plan.dropout_p > 0, ATOMIC=splits > 1, SUM_BIAS=sum_bias,
                      SUM_TASK=dtask_tok is not None, SUM_ALPHA=dalpha_tok is not None)
    launch(input_grad_kernel, (columns + sums, splits), args, constexprs, blocks.num_warps)
    return dx
