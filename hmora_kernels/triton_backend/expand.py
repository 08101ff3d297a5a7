"""Forward kernel 2 of a routed group: y_m = base_m + s * (g (x) h_m) B_m^T for every member of a launch group.

Programs own a block of d_out columns of one member and a share of the tokens. The (BM, E*r) operand g (x) h_m
(each expert's rank block scaled by its gate) is built in registers from compact h and gate tiles, one chunk of EC
experts x RCH ranks at a time, so the GEMM has K >= 16 even when r = 4 and registers do not grow with E*r; it
multiplies gates, so it runs at fp32 accuracy (3xTF32). The first chunk's B tile stays in registers while the
program walks its tokens (for E*r <= 64 that is all of B: read once per token split). Under top-k a chunk is
skipped for a block of tokens that selected none of its experts, and unselected experts' h blocks are not loaded.
"""
import triton
import triton.language as tl

from .launch import launch, member_sizes, member_tuple
from .plan import LAUNCH_MEMBERS, GroupPlan, LaunchGroup
from .tiles import (
    FP32_DOT, any_expert_selected, b_chunk_columns, chunk_experts_ranks, chunk_rank_and_gates, fused_jit,
    gated_operand, member_columns, member_value, selection_bits, token_rows, token_split,
)


@triton.jit
def load_b_chunk(b_ptr, n, n_ok, e, j, e_ok, j_ok, KE, r, EC: tl.constexpr, RCH: tl.constexpr):
    """(EC * RCH, BN) tile of B^T for one chunk of the gate-scaled operand: B[n, e * r + j]."""
    b_col, b_ok = b_chunk_columns(e, j, e_ok, j_ok, r, EC, RCH)
    return tl.load(b_ptr + n.to(tl.int64)[None, :] * KE + b_col[:, None], mask=n_ok[None, :] & b_ok[:, None],
                   other=0.0).to(tl.float32)


@fused_jit
def expand_kernel(
    h_ptr, gates_ptr, sel_ptr, b_ptrs, base_ptrs, y_ptrs, d_outs, block_starts,
    T, E, r, HS, h_stride, member0, scaling, tokens_per_split, rank_blocks, chunks, gated, selective, has_base,
    BM: tl.constexpr, BN: tl.constexpr, EC: tl.constexpr, RCH: tl.constexpr, HYDRA: tl.constexpr,
):
    t_begin, t_end = token_split(T, tokens_per_split)
    m, d_out, n, n_ok, h_col0 = member_columns(block_starts, d_outs, member0, HS, BN)
    b_ptr = member_value(b_ptrs, m)
    KE = E * r
    e0, e, j, e_ok, j_ok = chunk_experts_ranks(0, rank_blocks, E, r, EC, RCH)
    b_first = load_b_chunk(b_ptr, n, n_ok, e, j, e_ok, j_ok, KE, r, EC, RCH)
    for t0 in range(t_begin, t_end, BM):
        rows, row_ok, rows64 = token_rows(t0, t_end, BM)
        bits, union = selection_bits(sel_ptr, rows64, row_ok, selective)
        y = tl.zeros((BM, BN), tl.float32)
        for chunk in range(chunks):
            e0, e, j, e_ok, j_ok = chunk_experts_ranks(chunk, rank_blocks, E, r, EC, RCH)
            if any_expert_selected(union, e0, EC):
                b = b_first
                if chunk > 0:
                    b = load_b_chunk(b_ptr, n, n_ok, e, j, e_ok, j_ok, KE, r, EC, RCH)
                h3, g, h_cols, h_ok = chunk_rank_and_gates(h_ptr, gates_ptr, bits, rows64, row_ok, h_stride, h_col0,
                                                           e, j, e_ok, j_ok, r, E, gated, selective, HYDRA)
                y += tl.dot(gated_operand(h3, g, EC, RCH), b, input_precision=FP32_DOT)
        y = y * scaling
        out = rows64[:, None] * d_out + n[None, :]
        ok = row_ok[:, None] & n_ok[None, :]
        y_ptr = member_value(y_ptrs, m)
        if has_base:
            y += tl.load(member_value(base_ptrs, m) + out, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=ok)


def member_block_starts(d_outs, block_cols):
    """Program-id ranges along the d_out grid axis: member m owns [starts[m], starts[m + 1]), as ints, and as the
    kernels' LAUNCH_MEMBERS + 1 floats (see launch.member_sizes; padded with the end)."""
    starts = [0]
    for d in d_outs:
        starts.append(starts[-1] + triton.cdiv(d, block_cols))
    return starts, tuple(float(s) for s in starts) + (float(starts[-1]),) * (LAUNCH_MEMBERS + 1 - len(starts))


def run_expand(plan: GroupPlan, group: LaunchGroup, h, gates, sel, Bs, bases, ys) -> None:
    """Writes each member's output ys[m] = base + s * (g (x) h) B^T (the delta alone when bases is None)."""
    config = plan.configs(group)["expand"]
    c = config.as_dict()
    d_outs = plan.d_outs[group.first:group.first + group.count]
    starts, block_starts = member_block_starts(d_outs, c["BN"])
    splits, per_split = plan.token_splits(starts[-1], c["BM"], reduces=False)
    args = dict(
        h_ptr=h, gates_ptr=gates, sel_ptr=sel, b_ptrs=member_tuple(Bs),
        base_ptrs=member_tuple(ys if bases is None else bases), y_ptrs=member_tuple(ys), d_outs=member_sizes(d_outs),
        block_starts=block_starts, T=plan.T, E=plan.E, r=plan.r, HS=plan.HS, h_stride=plan.M * plan.HS,
        member0=group.first, scaling=plan.scaling, tokens_per_split=per_split, rank_blocks=plan.rank_blocks,
        chunks=plan.operand_chunks, gated=plan.routed, selective=plan.selective, has_base=bases is not None,
    )
    launch(expand_kernel, (starts[-1], splits), args, c, config.num_warps)
