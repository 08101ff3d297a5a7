"""Backward kernel 3: the up-projection gradients of every member, plus the (T, E) -> (E,) routing sums.

dB_m = s * dY_m^T (g (x) h_m)   (d_out_m, E*r), at fp32 accuracy (3xTF32) because the
operand carries the gates.
One extra program sums the per-token routing gradients: d bias = sum_t dlogits, d alpha = sum_t dalpha_t,
d p_task[seq] = sum over the sequence's tokens; a fixed order, so these are deterministic in every mode.
"""
import triton
import triton.language as tl

from .expand import member_block_starts
from .launch import launch
from .plan import GroupPlan
from .tiles import FP32_DOT, rank_tile


@triton.jit
def _sum_rows(src_ptr, t_begin, t_end, width, BM: tl.constexpr, W_PAD: tl.constexpr):
    """Column sums of rows [t_begin, t_end) of a (T, width) fp32 matrix."""
    cw = tl.arange(0, W_PAD)
    total = tl.zeros((W_PAD,), tl.float32)
    for t0 in range(t_begin, t_end, BM):
        rows = t0 + tl.arange(0, BM)
        ok = (rows < t_end)[:, None] & (cw < width)[None, :]
        total += tl.sum(tl.load(src_ptr + rows.to(tl.int64)[:, None] * width + cw[None, :], mask=ok, other=0.0), 0)
    return total


@triton.jit
def b_grad_kernel(
    dy_ptrs, db_ptrs, d_outs, block_starts, h_ptr, gates_ptr,
    dlogits_ptr, dtask_tok_ptr, dalpha_tok_ptr, dbias_ptr, dtask_ptr, dalpha_ptr,
    T, E, HR, scaling, tokens_per_split, seq_len, num_sequences,
    RANK: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KE_PAD: tl.constexpr, E_PAD: tl.constexpr,
    HYDRA: tl.constexpr, GATED: tl.constexpr, ATOMIC: tl.constexpr,
    SUM_BIAS: tl.constexpr, SUM_TASK: tl.constexpr, SUM_ALPHA: tl.constexpr,
):
    pid_n = tl.program_id(0)
    ck = tl.arange(0, KE_PAD)
    KE = E * RANK
    t_begin = tl.program_id(1) * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, T)
    for m in tl.static_range(M):
        if (pid_n >= block_starts[m]) & (pid_n < block_starts[m + 1]):
            d_out = d_outs[m]
            n = (pid_n - block_starts[m]) * BN + tl.arange(0, BN)
            n_ok = n < d_out
            acc = tl.zeros((BN, KE_PAD), tl.float32)
            for t0 in range(t_begin, t_end, BM):
                rows = t0 + tl.arange(0, BM)
                row_ok = rows < t_end
                rows64 = rows.to(tl.int64)
                dy = tl.load(dy_ptrs[m] + rows64[:, None] * d_out + n[None, :],
                             mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                gated = rank_tile(h_ptr, gates_ptr, rows64, row_ok, ck, M * HR, m * HR, E, KE, RANK, HYDRA, GATED)
                acc += tl.dot(tl.trans(dy), gated, input_precision=FP32_DOT)
            out = db_ptrs[m] + n[:, None] * KE + ck[None, :]
            ok = n_ok[:, None] & (ck < KE)[None, :]
            if ATOMIC:
                tl.atomic_add(out, acc * scaling, mask=ok)
            else:
                tl.store(out, acc * scaling, mask=ok)
    if (pid_n == block_starts[M]) & (tl.program_id(1) == 0):
        ce = tl.arange(0, E_PAD)
        if SUM_BIAS:
            tl.store(dbias_ptr + ce, _sum_rows(dlogits_ptr, 0, T, E, BM, E_PAD), mask=ce < E)
        if SUM_ALPHA:
            tl.store(dalpha_ptr, tl.sum(_sum_rows(dalpha_tok_ptr, 0, T, 1, BM, 16), 0))
        if SUM_TASK:
            for s in range(num_sequences):
                total = _sum_rows(dtask_tok_ptr, s * seq_len, (s + 1) * seq_len, E, BM, E_PAD)
                tl.store(dtask_ptr + s * E + ce, total, mask=ce < E)


def run_b_grad(plan: GroupPlan, dys, h, gates, dlogits, dtask_tok, dalpha_tok, weight_grads):
    """Writes dB_m and the summed routing gradients (bias, task probabilities, alpha) into `weight_grads`."""
    blocks = plan.tiles("b_grad")
    starts = member_block_starts(plan.d_outs, blocks.cols)
    splits, per_split = plan.token_splits(starts[-1], blocks.rows)
    sum_bias = plan.has_bias and dlogits is not None
    args = dict(
        dy_ptrs=tuple(dys), db_ptrs=tuple(weight_grads.dB), d_outs=plan.d_outs, block_starts=starts, h_ptr=h,
        gates_ptr=h if gates is None else gates,
        dlogits_ptr=dlogits if sum_bias else h, dtask_tok_ptr=h if dtask_tok is None else dtask_tok,
        dalpha_tok_ptr=h if dalpha_tok is None else dalpha_tok,
        dbias_ptr=weight_grads.dbias if sum_bias else h,
        dtask_ptr=h if dtask_tok is None else weight_grads.dtask,
        dalpha_ptr=h if dalpha_tok is None else weight_grads.dalpha,
        T=plan.T, E=plan.E, HR=plan.HR, scaling=plan.scaling, tokens_per_split=per_split,
        seq_len=plan.seq_len, num_sequences=plan.num_sequences,
    )
    constexprs = dict(
        RANK=plan.r, M=plan.M, BM=blocks.rows, BN=blocks.cols, KE_PAD=plan.KE_PAD, E_PAD=plan.E_PAD, HYDRA=plan.hydra,
        GATED=gates is not None, ATOMIC=splits > 1, SUM_BIAS=sum_bias, SUM_TASK=dtask_tok is not None,
        SUM_ALPHA=dalpha_tok is not None,
    )
    launch(b_grad_kernel, (starts[-1] + 1, splits), args, constexprs, blocks.num_warps)
