"""Backward kernel 1: per token block, the gradients of the rank activations and of the routing.

dG_m = s * dY_m B_m (T, E*r);  dgates[t, e] = sum_m sum_{c in block e} dG_m[t, c] h_m[t, c];
dh_m = g (x) dG_m (Hydra: summed over the expert blocks);  then back through top-k, the hybrid mix and the
softmax to dlogits (T, E), per-token task-probability and alpha contributions (summed by b_grad_kernel).
"""
import torch
import triton
import triton.language as tl

from .launch import launch
from .plan import GroupPlan
from .tiles import (
    KIND_HYBRID, KIND_NONE, KIND_TASK, gates_from_probs, mix_probs, rank_tile, token_block,
)


@triton.jit
def segment_sums(tile, segment_of_col, out_cols, num_segments):
    """out[:, s] = sum of tile[:, c] over the columns c with segment_of_col[c] == s, exact fp32 (a one-hot tl.dot
    here would replicate the tile in every warp and spill; this is a few element-wise passes instead)."""
    out = tl.zeros((tile.shape[0], out_cols.shape[0]), tl.float32)
    for s in range(num_segments):
        part = tl.sum(tl.where(segment_of_col[None, :] == s, tile, 0.0), axis=1)
        out = tl.where(out_cols[None, :] == s, part[:, None], out)
    return out


@triton.jit
def rank_grad_kernel(
    dy_ptrs, b_ptrs, d_outs, h_ptr, gates_ptr, p_tok_ptr, task_ptr, alpha_ptr,
    dgates_in_ptr, dp_tok_in_ptr, dlogits_in_ptr,
    dh_ptr, dlogits_ptr, dtask_tok_ptr, dalpha_tok_ptr,
    T, E, HR, seq_len, top_k, scaling,
    RANK: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KE_PAD: tl.constexpr, R_PAD: tl.constexpr,
    E_PAD: tl.constexpr, HYDRA: tl.constexpr, KIND: tl.constexpr, TOP_K: tl.constexpr,
    RENORM_SOFTMAX: tl.constexpr, HAS_DGATES: tl.constexpr, HAS_DP_TOK: tl.constexpr, HAS_DLOGITS: tl.constexpr,
):
    rows, row_ok, rows64 = token_block(T, BM)
    ck = tl.arange(0, KE_PAD)
    ce = tl.arange(0, E_PAD)
    rk = tl.arange(0, R_PAD)
    KE = E * RANK
    dgates = tl.zeros((BM, E_PAD), tl.float32)
    for m in tl.static_range(M):
        d_out = d_outs[m]
        acc = tl.zeros((BM, KE_PAD), tl.float32)
        for n0 in range(0, d_out, BN):
            n = n0 + tl.arange(0, BN)
            n_ok = n < d_out
            dy = tl.load(dy_ptrs[m] + rows64[:, None] * d_out + n[None, :], mask=row_ok[:, None] & n_ok[None, :],
                         other=0.0).to(tl.float32)
            b = tl.load(b_ptrs[m] + n[:, None] * KE + ck[None, :], mask=n_ok[:, None] & (ck < KE)[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.dot(dy, b)
        d_gated = acc * scaling
        if KIND != KIND_NONE:
            h = rank_tile(h_ptr, gates_ptr, rows64, row_ok, ck, M * HR, m * HR, E, KE, RANK, HYDRA, False)
            dgates += segment_sums(d_gated * h, ck // RANK, ce, E)
            g = tl.load(gates_ptr + rows64[:, None] * E + (ck // RANK)[None, :],
                        mask=row_ok[:, None] & (ck < KE)[None, :], other=0.0)
            d_gated = d_gated * g
        if HYDRA:
            dh = segment_sums(d_gated, ck % RANK, rk, RANK)
        else:
            dh = d_gated
        tl.store(dh_ptr + rows64[:, None] * (M * HR) + m * HR + rk[None, :], dh,
                 mask=row_ok[:, None] & (rk < HR)[None, :])
    if KIND != KIND_NONE:
        expert_ok = (ce < E)[None, :]
        valid = row_ok[:, None] & expert_ok
        e_offsets = rows64[:, None] * E + ce[None, :]
        if HAS_DGATES:
            dgates += tl.load(dgates_in_ptr + e_offsets, mask=valid, other=0.0).to(tl.float32)
        p_tok = tl.zeros((BM, E_PAD), tl.float32)
        if KIND != KIND_TASK:
            p_tok = tl.load(p_tok_ptr + e_offsets, mask=valid, other=0.0)
        p_task, a, p = mix_probs(p_tok, rows, ce, valid, E, seq_len, task_ptr, alpha_ptr, KIND)
        selected, gates = gates_from_probs(p, ce, expert_ok, top_k, TOP_K, RENORM_SOFTMAX)
        dp = tl.where(valid, dgates, 0.0)
        if TOP_K:
            g_dg = tl.sum(gates * dgates, axis=1)[:, None]
            if RENORM_SOFTMAX:
                dp = tl.where(selected, gates * (dgates - g_dg), 0.0)
            else:
                dp = tl.where(selected, (dgates - g_dg) / tl.sum(tl.where(selected, p, 0.0), axis=1)[:, None], 0.0)
        dp_tok = dp
        if KIND == KIND_TASK:
            tl.store(dtask_tok_ptr + e_offsets, dp, mask=valid)
        if KIND == KIND_HYBRID:
            dp_tok = (1.0 - a) * dp
            tl.store(dtask_tok_ptr + e_offsets, a * dp, mask=valid)
            tl.store(dalpha_tok_ptr + rows64, tl.sum(dp * (p_task - p_tok), axis=1) * a * (1.0 - a), mask=row_ok)
        if KIND != KIND_TASK:
            if HAS_DP_TOK:
                dp_tok += tl.load(dp_tok_in_ptr + e_offsets, mask=valid, other=0.0).to(tl.float32)
            dlogits = p_tok * (dp_tok - tl.sum(p_tok * dp_tok, axis=1)[:, None])
            if HAS_DLOGITS:
                dlogits += tl.load(dlogits_in_ptr + e_offsets, mask=valid, other=0.0).to(tl.float32)
            tl.store(dlogits_ptr + e_offsets, dlogits, mask=valid)


def run_rank_grad(plan: GroupPlan, dys, Bs, h, gates, p_tok, task_probs, alpha, dgates_in, dp_tok_in, dlogits_in):
    """Returns (dh (T, M*HR) fp32, dlogits (T, E) fp32 or None, dtask per token or None, dalpha per token or None)."""
    T, E = plan.T, plan.E
    f32 = dict(dtype=torch.float32, device=h.device)
    dh = torch.empty(T, plan.M * plan.HR, **f32)
    dlogits = torch.empty(T, E, **f32) if p_tok is not None else None
    dtask_tok = torch.empty(T, E, **f32) if plan.kind in ("task", "hybrid") else None
    dalpha_tok = torch.empty(T, **f32) if plan.kind == "hybrid" else None
    blocks = plan.tiles("rank_grad")

    def ptr(t):
        return h if t is None else t  # absent tensors are never touched (constexpr-guarded)

    args = dict(
        dy_ptrs=tuple(dys), b_ptrs=tuple(Bs), d_outs=plan.d_outs, h_ptr=h, gates_ptr=ptr(gates),
        p_tok_ptr=ptr(p_tok), task_ptr=ptr(task_probs), alpha_ptr=ptr(alpha), dgates_in_ptr=ptr(dgates_in),
        dp_tok_in_ptr=ptr(dp_tok_in), dlogits_in_ptr=ptr(dlogits_in), dh_ptr=dh, dlogits_ptr=ptr(dlogits),
        dtask_tok_ptr=ptr(dtask_tok), dalpha_tok_ptr=ptr(dalpha_tok),
        T=T, E=E, HR=plan.HR, seq_len=plan.seq_len, top_k=plan.top_k, scaling=plan.scaling,
    )
    constexprs = dict(
        RANK=plan.r, M=plan.M, BM=blocks.rows, BN=blocks.cols, KE_PAD=plan.KE_PAD, R_PAD=plan.R_PAD,
        E_PAD=plan.E_PAD, HYDRA=plan.hydra, KIND=plan.kind_code, TOP_K=plan.top_k > 0,
        RENORM_SOFTMAX=plan.renorm_softmax, HAS_DGATES=dgates_in is not None, HAS_DP_TOK=dp_tok_in is not None,
        HAS_DLOGITS=dlogits_in is not None,
    )
    launch(rank_grad_kernel, (triton.cdiv(T, blocks.rows),), args, constexprs, blocks.num_warps)
    return dh, dlogits, dtask_tok, dalpha_tok
