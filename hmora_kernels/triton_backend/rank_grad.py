"""Backward kernel for deterministic mode: the rank and gate gradients without atomics.

Per block of tokens, for each member and chunk of EC experts x RCH ranks: dG = s * dY_m B_m (summed over all of
d_out in order), then dh_m = g (x) dG (Hydra: summed over the expert blocks, in order, in registers) and
dgates += sum_j dG h_m into rows this program owns. It reads each dY a second time (output_grad_kernel computes dB
from the first read): the price of a fixed summation order without a partial-sum buffer per column block.
"""
import triton
import triton.language as tl

from .launch import launch, member_sizes, member_tuple
from .output_grad import rank_grad_parts
from .plan import GroupPlan, LaunchGroup
from .tiles import (
    any_expert_selected, b_chunk_columns, chunk_experts_ranks, chunk_rank_and_gates, dot, dot_operand, fused_jit,
    member_int, member_value, selection_bits, token_block,
)


@fused_jit
def rank_grad_kernel(
    dy_ptrs, b_ptrs, d_outs, h_ptr, gates_ptr, sel_ptr, dh_ptr, dgates_ptr,
    T, E, r, HS, h_stride, member0, M, scaling, rank_blocks, expert_blocks, gated, selective,
    BM: tl.constexpr, BN: tl.constexpr, EC: tl.constexpr, RCH: tl.constexpr, HYDRA: tl.constexpr,
    DOT: tl.constexpr,
):
    rows, row_ok, rows64 = token_block(T, BM)
    bits, union = selection_bits(sel_ptr, rows64, row_ok, selective)
    KE = E * r
    cn = tl.arange(0, BN)
    for m in range(M):
        d_out = member_int(d_outs, m)
        dy_ptr = member_value(dy_ptrs, m)
        b_ptr = member_value(b_ptrs, m)
        dh_rows = dh_ptr + rows64 * h_stride + (member0 + m) * HS
        for rb in range(rank_blocks):
            dh_hydra = tl.zeros((BM, RCH), tl.float32)  # Hydra: the rank block's dh, summed over the expert blocks
            for eb in range(expert_blocks):
                e0, e, j, e_ok, j_ok = chunk_experts_ranks(eb * rank_blocks + rb, rank_blocks, E, r, EC, RCH)
                if any_expert_selected(union, e0, EC):
                    b_col, b_ok = b_chunk_columns(e, j, e_ok, j_ok, r, EC, RCH)
                    d_g = tl.zeros((BM, EC * RCH), tl.float32)
                    for n0 in range(0, d_out, BN):
                        n = n0 + cn
                        n_ok = n < d_out
                        dy = tl.load(dy_ptr + rows64[:, None] * d_out + n[None, :],
                                     mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                        b = tl.load(b_ptr + n.to(tl.int64)[:, None] * KE + b_col[None, :], mask=n_ok[:, None] & b_ok[None, :],
                                    other=0.0).to(tl.float32)
                        d_g += dot(dot_operand(dy, DOT), dot_operand(b, DOT), DOT)
                    h3, g, h_cols, h_ok = chunk_rank_and_gates(h_ptr, gates_ptr, bits, rows64, row_ok, h_stride,
                                                               (member0 + m) * HS, e, j, e_ok, j_ok, r, E, gated,
                                                               selective, HYDRA)
                    dh, dgates, dgates_ok = rank_grad_parts(tl.reshape(d_g * scaling, (BM, EC, RCH)), h3, g, bits,
                                                            row_ok, e, e_ok, selective, HYDRA)
                    if HYDRA:
                        dh_hydra += dh
                    else:
                        tl.store(dh_rows[:, None, None] + h_cols, dh, mask=h_ok)
                    if gated:  # rows this program owns
                        gate_ptrs = dgates_ptr + rows64[:, None] * E + e[None, :]
                        tl.store(gate_ptrs, tl.load(gate_ptrs, mask=dgates_ok, other=0.0) + dgates, mask=dgates_ok)
                        tl.debug_barrier()  # the next chunk or member reads these rows back
            if HYDRA:
                j = rb * RCH + tl.arange(0, RCH)
                tl.store(dh_rows[:, None] + j[None, :], dh_hydra, mask=row_ok[:, None] & (j < r)[None, :])


def run_rank_grad(plan: GroupPlan, group: LaunchGroup, dys, Bs, h, gates, sel, dh, dgates) -> None:
    """Deterministic mode: writes dh (T, M*HS) and adds dgates (T, E) (zeroed) for launch group `group`."""
    config = plan.configs(group)["rank_grad"]
    c = config.as_dict()
    args = dict(
        dy_ptrs=member_tuple(dys), b_ptrs=member_tuple(Bs),
        d_outs=member_sizes(plan.d_outs[group.first:group.first + group.count]), h_ptr=h, gates_ptr=gates,
        sel_ptr=sel, dh_ptr=dh, dgates_ptr=dgates, T=plan.T, E=plan.E, r=plan.r, HS=plan.HS,
        h_stride=plan.M * plan.HS, member0=group.first, M=group.count, scaling=plan.scaling,
        rank_blocks=plan.rank_blocks, expert_blocks=plan.operand_chunks // plan.rank_blocks, gated=plan.routed,
        selective=plan.selective,
    )
    launch(rank_grad_kernel, (triton.cdiv(plan.T, c["BM"]),), args, c, config.num_warps)
