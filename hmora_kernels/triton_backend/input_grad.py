"""Backward kernel 2: one pass over x for the input gradient and every down-projection gradient.

dx = sum_m drop_{m+1}'(dh_m A_m) + drop_0'(dlogits W_r);  dA_m = dh_m^T drop_{m+1}(x);  dW_r = dlogits^T drop_0(x).
Programs own a d_in column block; each walks its share of the tokens (all of them in deterministic mode,
a split with fp32 atomic adds of the weight gradients otherwise). Masks are regenerated from the seed.
"""
import torch
import triton
import triton.language as tl

from .launch import launch
from .plan import GroupPlan
from .tiles import FP32_DOT, dropout_scale, member_accumulators


@triton.jit
def input_grad_kernel(
    x_ptr, a_ptrs, w_ptr, dh_ptr, dlogits_ptr, dx_ptr, da_ptrs, dw_ptr,
    T, D, E, HR, tokens_per_split, dropout_p, seed,
    M: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
    ROUTER_GRAD: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
):
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    col_ok = cols < D
    rk = tl.arange(0, R_PAD)
    ce = tl.arange(0, E_PAD)
    accs = member_accumulators(M, R_PAD, BK)
    acc_w = tl.zeros((E_PAD, BK), tl.float32)
    t_begin = tl.program_id(1) * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, T)
    for t0 in range(t_begin, t_end, BM):
        rows = t0 + tl.arange(0, BM)
        row_ok = rows < t_end
        rows64 = rows.to(tl.int64)
        offsets = rows64[:, None] * D + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        xt = tl.load(x_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
        dx = tl.zeros((BM, BK), tl.float32)
        if ROUTER_GRAD:  # routing gradients keep fp32 accuracy
            scale = dropout_scale(offsets, seed, 0, dropout_p, DROPOUT)
            dl = tl.load(dlogits_ptr + rows64[:, None] * E + ce[None, :], mask=row_ok[:, None] & (ce < E)[None, :],
                         other=0.0)
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
        out = da_ptrs[m] + rk[:, None] * D + cols[None, :]
        ok = (rk < HR)[:, None] & col_ok[None, :]
        if ATOMIC:
            tl.atomic_add(out, accs[m], mask=ok)
        else:
            tl.store(out, accs[m], mask=ok)
    if ROUTER_GRAD:
        out = dw_ptr + ce[:, None] * D + cols[None, :]
        ok = (ce < E)[:, None] & col_ok[None, :]
        if ATOMIC:
            tl.atomic_add(out, acc_w, mask=ok)
        else:
            tl.store(out, acc_w, mask=ok)


def run_input_grad(plan: GroupPlan, x, As, router_weight, dh, dlogits, weight_grads):
    """Returns dx (x's dtype); writes dA_m and dW_r into the fp32 buffers of `weight_grads`
    (which start zeroed unless plan.deterministic: split programs add into them atomically)."""
    blocks = plan.tiles("input_grad")
    columns = triton.cdiv(plan.d_in, blocks.cols)
    splits, per_split = plan.token_splits(columns, blocks.rows)
    dx = torch.empty_like(x)
    router_grad = dlogits is not None and router_weight is not None
    args = dict(
        x_ptr=x, a_ptrs=tuple(As), w_ptr=router_weight if router_grad else x, dh_ptr=dh,
        dlogits_ptr=dlogits if router_grad else dh, dx_ptr=dx, da_ptrs=tuple(weight_grads.dA),
        dw_ptr=weight_grads.dW if router_grad else dh,
        T=plan.T, D=plan.d_in, E=plan.E, HR=plan.HR, tokens_per_split=per_split, dropout_p=plan.dropout_p,
        seed=plan.stream_seed,
    )
    constexprs = dict(M=plan.M, BM=blocks.rows, BK=blocks.cols, R_PAD=plan.R_PAD, E_PAD=plan.E_PAD,
                      ROUTER_GRAD=router_grad, DROPOUT=plan.dropout_p > 0, ATOMIC=splits > 1)
    launch(input_grad_kernel, (columns, splits), args, constexprs, blocks.num_warps)
    return dx
