"""Backward kernel 1: one pass over each dY_m gives the up-projection gradients and the rank and gate gradients.

dB_m = s * dY_m^T (g (x) h_m)  (d_out_m, E*r), at fp32 accuracy (3xTF32): the operand carries the gates.
dG_m = s * dY_m B_m            (T, E*r), reduced at once to what backward needs of it:
dh_m = g (x) dG_m (Hydra: summed over the expert blocks) and dgates[t, e] = sum_m sum_j dG_m[t, e, j] h_m[t, e, j].

Programs own a block of d_out columns of one member and walk a share of the tokens with the B tile in registers,
so each dY element is read once. dB sums over the tokens (fp32 atomic adds across token splits, or one split and
plain stores when deterministic). dh and dgates sum over the column blocks: atomic adds into one zeroed slot, or,
when deterministic, one slot per column block, summed in a fixed order by route_grad_kernel.
"""
import torch
import triton
import triton.language as tl

from .expand import member_block_starts
from .launch import launch
from .plan import GroupPlan
from .tiles import FP32_DOT, accumulate, b_columns, gated_operand, rank_and_gates, token_rows, token_split


@triton.jit
def output_grad_kernel(
    dy_ptrs, b_ptrs, db_ptrs, d_outs, block_starts, h_ptr, gates_ptr, dh_slots_ptr, dgates_slots_ptr,
    T, E, HR, scaling, tokens_per_split,
    RANK: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, E_SLOTS: tl.constexpr,
    R_SLOTS: tl.constexpr, HYDRA: tl.constexpr, GATED: tl.constexpr, ATOMIC_DB: tl.constexpr,
    SLOT_PER_BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t_begin, t_end = token_split(T, tokens_per_split)
    b_col, b_ok = b_columns(E, RANK, E_SLOTS, R_SLOTS)
    e = tl.arange(0, E_SLOTS)
    j = tl.arange(0, R_SLOTS)
    KE = E * RANK
    dh_slot = dh_slots_ptr
    dgates_slot = dgates_slots_ptr
    if SLOT_PER_BLOCK:
        dh_slot += pid_n.to(tl.int64) * T * (M * HR)
        dgates_slot += pid_n.to(tl.int64) * T * E
    for m in tl.static_range(M):
        if (pid_n >= block_starts[m]) & (pid_n < block_starts[m + 1]):
            d_out = d_outs[m]
            n = (pid_n - block_starts[m]) * BN + tl.arange(0, BN)
            n_ok = n < d_out
            b = tl.load(b_ptrs[m] + n[:, None] * KE + b_col[None, :], mask=n_ok[:, None] & b_ok[None, :],
                        other=0.0).to(tl.float32)
            acc_db = tl.zeros((BN, E_SLOTS * R_SLOTS), tl.float32)
            for t0 in range(t_begin, t_end, BM):
                rows, row_ok, rows64 = token_rows(t0, t_end, BM)
                dy = tl.load(dy_ptrs[m] + rows64[:, None] * d_out + n[None, :],
                             mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                h3, g = rank_and_gates(h_ptr, gates_ptr, rows64, row_ok, M * HR, m * HR, E, RANK, E_SLOTS, R_SLOTS,
                                       HYDRA, GATED)
                acc_db += tl.dot(tl.trans(dy), gated_operand(h3, g, E_SLOTS, R_SLOTS), input_precision=FP32_DOT)
                d_gated = tl.reshape(tl.dot(dy, b) * scaling, (BM, E_SLOTS, R_SLOTS))
                dh_rows = dh_slot + rows64 * (M * HR) + m * HR
                if HYDRA:
                    dh = tl.sum(d_gated * g[:, :, None], axis=1)
                    accumulate(dh_rows[:, None] + j[None, :], dh,
                               row_ok[:, None] & (j < RANK)[None, :], not SLOT_PER_BLOCK)
                else:
                    dh = d_gated * g[:, :, None]
                    cols = e[:, None] * RANK + j[None, :]
                    ok = (e < E)[:, None] & (j < RANK)[None, :]
                    accumulate(dh_rows[:, None, None] + cols[None, :, :], dh,
                               row_ok[:, None, None] & ok[None, :, :], not SLOT_PER_BLOCK)
                if GATED:
                    dgates = tl.sum(d_gated * h3, axis=2)
                    accumulate(dgates_slot + rows64[:, None] * E + e[None, :], dgates,
                               row_ok[:, None] & (e < E)[None, :], not SLOT_PER_BLOCK)
            accumulate(db_ptrs[m] + n[:, None] * KE + b_col[None, :], acc_db * scaling,
                       n_ok[:, None] & b_ok[None, :], ATOMIC_DB)


def run_output_grad(plan: GroupPlan, dys, Bs, h, gates, weight_grads):
    """Writes dB_m into `weight_grads` (zeroed unless plan.deterministic). Returns (dh_slots, dgates_slots,
    block_starts): fp32 partials, dh_slots (num_slots, T, M*HR) of each dh_m (columns m*HR ...) and dgates_slots
    (num_slots, T, E) or None when not routed; one slot, or when deterministic slot b for column block b, member
    m's blocks being [block_starts[m], block_starts[m+1])."""
    blocks = plan.tiles("output_grad")
    starts = member_block_starts(plan.d_outs, blocks.cols)
    splits, per_split = plan.token_splits(starts[-1], blocks.rows)
    num_slots = starts[-1] if plan.deterministic else 1
    # deterministic: each slot's columns are written whole by one program before anything reads them
    make = torch.empty if plan.deterministic else torch.zeros
    routed = gates is not None
    dh_width, dgates_width = plan.M * plan.HR, plan.E if routed else 0
    slots = make(num_slots * plan.T * (dh_width + dgates_width), dtype=torch.float32, device=h.device)
    dh_slots = slots[:num_slots * plan.T * dh_width].view(num_slots, plan.T, dh_width)
    dgates_slots = slots[num_slots * plan.T * dh_width:].view(num_slots, plan.T, dgates_width) if routed else None
    args = dict(
        dy_ptrs=tuple(dys), b_ptrs=tuple(Bs), db_ptrs=tuple(weight_grads.dB), d_outs=plan.d_outs,
        block_starts=starts, h_ptr=h, gates_ptr=gates if routed else h, dh_slots_ptr=dh_slots,
        dgates_slots_ptr=dgates_slots if routed else dh_slots,
        T=plan.T, E=plan.E, HR=plan.HR, scaling=plan.scaling, tokens_per_split=per_split,
    )
    constexprs = dict(
        RANK=plan.r, M=plan.M, BM=blocks.rows, BN=blocks.cols, E_SLOTS=plan.E_SLOTS, R_SLOTS=plan.R_SLOTS,
        HYDRA=plan.hydra, GATED=routed, ATOMIC_DB=splits > 1, SLOT_PER_BLOCK=plan.deterministic,
    )
    launch(output_grad_kernel, (starts[-1], splits), args, constexprs, blocks.num_warps)
    return dh_slots, dgates_slots, starts
