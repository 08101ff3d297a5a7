"""Backward kernel 1: one pass over each dY_m (per chunk) gives the up-projection gradients and the rank and gate
gradients.

dB_m = s * dY_m^T (g (x) h_m)  (d_out_m, E*r), at fp32 accuracy (3xTF32): the operand carries the gates.
dG_m = s * dY_m B_m            (T, E*r), reduced at once to what backward needs of it:
dh_m = g (x) dG_m (Hydra: summed over the expert blocks) and dgates[t, e] = sum_m sum_j dG_m[t, e, j] h_m[t, e, j].

Programs own a block of d_out columns of one member, one chunk of EC experts x RCH ranks and a share of the
tokens; their B chunk stays in registers while they walk the tokens. dB sums over the tokens (fp32 atomic adds
across token splits, or one split and plain stores when deterministic). dh and dgates sum over the column blocks
by fp32 atomic adds into zeroed buffers; in deterministic mode this kernel computes dB alone and rank_grad_kernel
computes dh and dgates without atomics. Under top-k, chunks no token of a block selected are skipped and only
selected experts' rank gradients are written.
"""
import triton
import triton.language as tl

from .expand import member_block_starts
from .launch import launch, member_sizes, member_tuple
from .plan import GroupPlan, LaunchGroup
from .tiles import (
    FP32_DOT, accumulate, any_expert_selected, b_chunk_columns, chunk_experts_ranks, chunk_rank_and_gates, dot,
    dot_operand, expert_bits, fused_jit, gated_operand, member_columns, member_value, selection_bits, token_rows,
    token_split,
)


@triton.jit
def rank_grad_parts(d_gated, h3, g, bits, row_ok, e, e_ok, selective, HYDRA: tl.constexpr):
    """From dG (BM, EC, RCH) of one member and chunk: (dh, dgates (BM, EC), where dgates is needed). dh = g (x) dG
    (BM, EC, RCH) at h3's columns, or for Hydra the chunk's experts' sum (BM, RCH); dgates = sum_j dG h. Under
    top-k only the selected experts' dgates are needed."""
    e_sel = row_ok[:, None] & e_ok[None, :]
    if selective:
        e_sel = e_sel & expert_bits(bits, e)
    if HYDRA:
        dh = tl.sum(d_gated * g[:, :, None], axis=1)
    else:
        dh = d_gated * g[:, :, None]
    return dh, tl.sum(d_gated * h3, axis=2), e_sel


@fused_jit
def output_grad_kernel(
    dy_ptrs, b_ptrs, db_ptrs, d_outs, block_starts, h_ptr, gates_ptr, sel_ptr, dh_ptr, dgates_ptr,
    T, E, r, HS, h_stride, member0, scaling, tokens_per_split, rank_blocks, gated, selective, atomic_db,
    computes_rank_grads,
    BM: tl.constexpr, BN: tl.constexpr, EC: tl.constexpr, RCH: tl.constexpr, HYDRA: tl.constexpr,
    DOT: tl.constexpr,
):
    t_begin, t_end = token_split(T, tokens_per_split)
    m, d_out, n, n_ok, h_col0 = member_columns(block_starts, d_outs, member0, HS, BN)
    dy_ptr = member_value(dy_ptrs, m)
    KE = E * r
    e0, e, j, e_ok, j_ok = chunk_experts_ranks(tl.program_id(2), rank_blocks, E, r, EC, RCH)
    b_col, b_ok = b_chunk_columns(e, j, e_ok, j_ok, r, EC, RCH)
    b = dot_operand(tl.load(member_value(b_ptrs, m) + n.to(tl.int64)[:, None] * KE + b_col[None, :],
                            mask=n_ok[:, None] & b_ok[None, :], other=0.0).to(tl.float32), DOT)
    acc_db = tl.zeros((BN, EC * RCH), tl.float32)
    for t0 in range(t_begin, t_end, BM):
        rows, row_ok, rows64 = token_rows(t0, t_end, BM)
        bits, union = selection_bits(sel_ptr, rows64, row_ok, selective)
        if any_expert_selected(union, e0, EC):
            dy = tl.load(dy_ptr + rows64[:, None] * d_out + n[None, :], mask=row_ok[:, None] & n_ok[None, :],
                         other=0.0).to(tl.float32)
            h3, g, h_cols, h_ok = chunk_rank_and_gates(h_ptr, gates_ptr, bits, rows64, row_ok, h_stride, h_col0, e, j,
                                                       e_ok, j_ok, r, E, gated, selective, HYDRA)
            acc_db += tl.dot(tl.trans(dy), gated_operand(h3, g, EC, RCH), input_precision=FP32_DOT)
            if computes_rank_grads:
                d_gated = tl.reshape(dot(dot_operand(dy, DOT), b, DOT) * scaling, (BM, EC, RCH))
                dh, dgates, dgates_ok = rank_grad_parts(d_gated, h3, g, bits, row_ok, e, e_ok, selective, HYDRA)
                dh_rows = dh_ptr + rows64 * h_stride + h_col0
                if HYDRA:
                    tl.atomic_add(dh_rows[:, None] + j[None, :], dh, mask=row_ok[:, None] & j_ok[None, :])
                else:
                    tl.atomic_add(dh_rows[:, None, None] + h_cols, dh, mask=h_ok)
                if gated:
                    tl.atomic_add(dgates_ptr + rows64[:, None] * E + e[None, :], dgates, mask=dgates_ok)
    accumulate(member_value(db_ptrs, m) + n.to(tl.int64)[:, None] * KE + b_col[None, :], acc_db * scaling,
               n_ok[:, None] & b_ok[None, :], atomic_db)


def run_output_grad(plan: GroupPlan, group: LaunchGroup, dys, Bs, dBs, h, gates, sel, dh, dgates) -> None:
    """Writes dB_m into dBs (fp32, zeroed unless plan.deterministic) and, unless deterministic, adds dh (T, M*HS)
    and dgates (T, E) into their zeroed fp32 buffers."""
    config = plan.configs(group)["output_grad"]
    c = config.as_dict()
    d_outs = plan.d_outs[group.first:group.first + group.count]
    starts, block_starts = member_block_starts(d_outs, c["BN"])
    columns = starts[-1] * plan.operand_chunks
    splits, per_split = plan.token_splits(columns, c["BM"])
    args = dict(
        dy_ptrs=member_tuple(dys), b_ptrs=member_tuple(Bs), db_ptrs=member_tuple(dBs), d_outs=member_sizes(d_outs),
        block_starts=block_starts, h_ptr=h, gates_ptr=gates, sel_ptr=sel, dh_ptr=dh, dgates_ptr=dgates,
        T=plan.T, E=plan.E, r=plan.r, HS=plan.HS, h_stride=plan.M * plan.HS, member0=group.first,
        scaling=plan.scaling, tokens_per_split=per_split, rank_blocks=plan.rank_blocks, gated=plan.routed,
        selective=plan.selective, atomic_db=splits > 1, computes_rank_grads=not plan.deterministic,
    )
    launch(output_grad_kernel, (starts[-1], splits, plan.operand_chunks), args, c, config.num_warps)
