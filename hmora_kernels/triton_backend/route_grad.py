"""Backward kernel 2: per token block, the rank gradients summed and the routing taken back to the logits.

From the slots of output_grad_kernel: dh_m (deterministic mode: summed over member m's column-block slots in a
fixed order, into slot 0) and dgates (summed over all slots); then back through top-k, the hybrid mix and the
softmax to dlogits (T, E), per-token task-probability and alpha contributions (summed by input_grad_kernel).
"""
import torch
import triton
import triton.language as tl

from .launch import launch
from .plan import GroupPlan
from .tiles import KIND_HYBRID, KIND_NONE, KIND_TASK, gates_from_probs, mix_probs, token_block


@triton.jit
def route_grad_kernel(
    dh_slots_ptr, dgates_slots_ptr, slot_starts, p_tok_ptr, task_ptr, alpha_ptr, dgates_in_ptr, dp_tok_in_ptr, dlogits_in_ptr,
    dlogits_ptr, dtask_tok_ptr, dalpha_tok_ptr,
    T, E, HR, seq_len, top_k, num_slots,
    M: tl.constexpr, BM: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr, KIND: tl.constexpr,
    TOP_K: tl.constexpr, RENORM_SOFTMAX: tl.constexpr, HAS_DGATES: tl.constexpr, HAS_DP_TOK: tl.constexpr,
    HAS_DLOGITS: tl.constexpr, SUM_SLOTS: tl.constexpr,
):
    rows, row_ok, rows64 = token_block(T, BM)
    if SUM_SLOTS:
        rk = tl.arange(0, R_PAD)
        ok = row_ok[:, None] & (rk < HR)[None, :]
        dh_rows = dh_slots_ptr + rows64[:, None] * (M * HR) + rk[None, :]
        for m in tl.static_range(M):
            dh = tl.zeros((BM, R_PAD), tl.float32)
            for s in range(slot_starts[m], slot_starts[m + 1]):
                dh += tl.load(dh_rows + s * tl.cast(T, tl.int64) * (M * HR) + m * HR, mask=ok, other=0.0)
            tl.store(dh_rows + m * HR, dh, mask=ok)
    if KIND != KIND_NONE:
        ce = tl.arange(0, E_PAD)
        expert_ok = (ce < E)[None, :]
        valid = row_ok[:, None] & expert_ok
        e_offsets = rows64[:, None] * E + ce[None, :]
        dgates = tl.zeros((BM, E_PAD), tl.float32)
        for s in range(0, num_slots):
            dgates += tl.load(dgates_slots_ptr + s * tl.cast(T, tl.int64) * E + e_offsets, mask=valid, other=0.0)
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


def run_route_grad(plan: GroupPlan, dh_slots, dgates_slots, slot_starts, p_tok, task_probs, alpha, dgates_in, dp_tok_in, dlogits_in):
    """Leaves the summed dh in slot 0 of `dh_slots`; returns (dlogits (T, E) fp32 or None, dtask per token or None,
    dalpha per token or None). Launches nothing when there is nothing to do (atomic mode, no router)."""
    T, E = plan.T, plan.E
    f32 = dict(dtype=torch.float32, device=dh_slots.device)
    dlogits = torch.empty(T, E, **f32) if p_tok is not None else None
    dtask_tok = torch.empty(T, E, **f32) if plan.kind in ("task", "hybrid") else None
    dalpha_tok = torch.empty(T, **f32) if plan.kind == "hybrid" else None
    if plan.kind == "none" and not plan.deterministic:
        return dlogits, dtask_tok, dalpha_tok
    blocks = plan.tiles("route_grad")

    def ptr(t):
        return dh_slots if t is None else t  # absent tensors are never touched (constexpr-guarded)

    args = dict(
        dh_slots_ptr=dh_slots, dgates_slots_ptr=ptr(dgates_slots), slot_starts=slot_starts, p_tok_ptr=ptr(p_tok), task_ptr=ptr(task_probs),
        alpha_ptr=ptr(alpha), dgates_in_ptr=ptr(dgates_in), dp_tok_in_ptr=ptr(dp_tok_in),
        dlogits_in_ptr=ptr(dlogits_in), dlogits_ptr=ptr(dlogits), dtask_tok_ptr=ptr(dtask_tok),
        dalpha_tok_ptr=ptr(dalpha_tok),
        T=T, E=E, HR=plan.HR, seq_len=plan.seq_len, top_k=plan.top_k, num_slots=dh_slots.shape[0],
    )
    constexprs = dict(
        M=plan.M, BM=blocks.rows, R_PAD=plan.R_PAD, E_PAD=plan.E_PAD, KIND=plan.kind_code, TOP_K=plan.top_k > 0,
        RENORM_SOFTMAX=plan.renorm_softmax, HAS_DGATES=dgates_in is not None, HAS_DP_TOK=dp_tok_in is not None,
        HAS_DLOGITS=dlogits_in is not None, SUM_SLOTS=plan.deterministic,
    )
    launch(route_grad_kernel, (triton.cdiv(T, blocks.rows),), args, constexprs, blocks.num_warps)
    return dlogits, dtask_tok, dalpha_tok
