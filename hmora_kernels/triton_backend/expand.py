"""Forward kernel 2 of a routed group: y_m = base_m + s * (g (x) h_m) B_m^T for every member in one launch.

Programs own a block of d_out columns of one member and a share of the tokens: the B tile is loaded once and
stays in registers while the program walks its tokens, so B is read once per token split, not per token block.
The (BM, E*r) operand g (x) h_m (gates broadcast over each expert's rank block) is built in registers from
compact h and gate tiles, so the GEMM has K = E*r >= 16 even when r = 4; it multiplies gates, so it runs at
fp32 accuracy (3xTF32).
"""
import torch
import triton
import triton.language as tl

from .launch import launch
from .plan import GroupPlan
from .tiles import FP32_DOT, b_columns, gated_operand, rank_and_gates, token_rows, token_split


@triton.jit
def expand_kernel(
    h_ptr, gates_ptr, b_ptrs, base_ptrs, y_ptrs, d_outs, block_starts,
    T, E, HR, scaling, tokens_per_split,
    RANK: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, E_SLOTS: tl.constexpr,
    R_SLOTS: tl.constexpr, HYDRA: tl.constexpr, GATED: tl.constexpr, HAS_BASE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t_begin, t_end = token_split(T, tokens_per_split)
    b_col, b_ok = b_columns(E, RANK, E_SLOTS, R_SLOTS)
    for m in tl.static_range(M):
        if (pid_n >= block_starts[m]) & (pid_n < block_starts[m + 1]):
            d_out = d_outs[m]
            n = (pid_n - block_starts[m]) * BN + tl.arange(0, BN)
            n_ok = n < d_out
            b_t = tl.load(b_ptrs[m] + n[None, :] * (E * RANK) + b_col[:, None], mask=n_ok[None, :] & b_ok[:, None],
                          other=0.0).to(tl.float32)
            for t0 in range(t_begin, t_end, BM):
                rows, row_ok, rows64 = token_rows(t0, t_end, BM)
                h3, g = rank_and_gates(h_ptr, gates_ptr, rows64, row_ok, M * HR, m * HR, E, RANK, E_SLOTS, R_SLOTS,
                                       HYDRA, GATED)
                y = tl.dot(gated_operand(h3, g, E_SLOTS, R_SLOTS), b_t, input_precision=FP32_DOT) * scaling
                out = rows64[:, None] * d_out + n[None, :]
                ok = row_ok[:, None] & n_ok[None, :]
                if HAS_BASE:
                    y += tl.load(base_ptrs[m] + out, mask=ok, other=0.0).to(tl.float32)
                tl.store(y_ptrs[m] + out, y.to(y_ptrs[m].dtype.element_ty), mask=ok)


def member_block_starts(d_outs, block_cols):
    """Program-id ranges along the d_out grid axis: member m owns [starts[m], starts[m + 1])."""
    starts = [0]
    for d in d_outs:
        starts.append(starts[-1] + triton.cdiv(d, block_cols))
    return tuple(starts)


def run_expand(plan: GroupPlan, h, gates, Bs, bases, out_dtype):
    """One output per member: base + s * (g (x) h) B^T, or the delta alone when bases is None."""
    blocks = plan.tiles("expand")
    device = h.device
    ys = tuple(torch.empty(plan.T, d, dtype=out_dtype, device=device) for d in plan.d_outs)
    starts = member_block_starts(plan.d_outs, blocks.cols)
    splits, per_split = plan.token_splits(starts[-1], blocks.rows, reduces=False)
    args = dict(
        h_ptr=h, gates_ptr=h if gates is None else gates, b_ptrs=tuple(Bs),
        base_ptrs=ys if bases is None else tuple(bases), y_ptrs=ys, d_outs=plan.d_outs, block_starts=starts,
        T=plan.T, E=plan.E, HR=plan.HR, scaling=plan.scaling, tokens_per_split=per_split,
    )
    constexprs = dict(RANK=plan.r, M=plan.M, BM=blocks.rows, BN=blocks.cols, E_SLOTS=plan.E_SLOTS,
                      R_SLOTS=plan.R_SLOTS, HYDRA=plan.hydra, GATED=gates is not None, HAS_BASE=bases is not None)
    launch(expand_kernel, (starts[-1], splits), args, constexprs, blocks.num_warps)
    return list(ys)
