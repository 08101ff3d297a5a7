"""Backward kernel 3: passes over x for the input gradient and every down-projection gradient, plus the
(T, E) -> (E,) routing sums.

dx = sum_m drop_{m+1}'(dh_m A_m) + drop_0'(dlogits W_r);  dA_m = dh_m^T drop_{m+1}(x);  dW_r = dlogits^T drop_0(x).
Programs own a d_in column block; each walks its share of the tokens (all of them in deterministic mode, a split
with fp32 atomic adds of the weight gradients otherwise) once per work item: a chunk of HC columns of h for MG
members at a time, so registers do not grow with E*r or the number of members. The work item's A tiles stay in
registers over the tokens. With one work item (HR <= 64 and at most MG members: the common case) x is read once and
dx written once; with more, dx is summed in an fp32 buffer (the program owns its rows, so no atomics) and x re-read
from L2 per item. Masks are regenerated from the seed. Under top-k with one A per expert, only the selected
experts' rank gradients are read. One extra program sums the per-token routing gradients: d bias = sum_t dlogits,
d alpha = sum_t dalpha_t, d p_task[seq] = sum over the sequence's tokens (a fixed order: deterministic).
"""
import triton
import triton.language as tl

from .launch import launch, member_tuple
from .plan import GroupPlan, LaunchGroup
from .tiles import (
    accumulate, dot, dot_operand, dropout_scale, expert_bits, fused_jit, member_value, philox_seed, slot_accumulators,
    token_rank_columns, token_rows, token_split,
)


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
                 num_sequences, sum_bias, sum_task, sum_alpha, BM: tl.constexpr, E_PAD: tl.constexpr):
    """d bias = sum_t dlogits, d alpha = sum_t dalpha_t, d p_task[seq] = sum over the sequence's tokens."""
    ce = tl.arange(0, E_PAD)
    if sum_bias:
        tl.store(dbias_ptr + ce, _sum_rows(dlogits_ptr, 0, T, E, BM, E_PAD), mask=ce < E)
    if sum_alpha:
        tl.store(dalpha_ptr, tl.sum(_sum_rows(dalpha_tok_ptr, 0, T, 1, BM, 16), 0))
    if sum_task:
        for s in range(num_sequences):
            total = _sum_rows(dtask_tok_ptr, s * seq_len, (s + 1) * seq_len, E, BM, E_PAD)
            tl.store(dtask_ptr + s * E + ce, total, mask=ce < E)


@fused_jit
def input_grad_kernel(
    x_ptr, a_ptrs, w_ptr, dh_ptr, sel_ptr, dlogits_ptr, dx_ptr, dx_sum_ptr, da_ptrs, dw_ptr, seed_ptr,
    dtask_tok_ptr, dalpha_tok_ptr, dbias_ptr, dtask_ptr, dalpha_ptr,
    T, D, E, r, HR, HS, h_stride, member0, M, h_chunks, tokens_per_split, dropout_p, seed, seed_in_memory, seq_len,
    num_sequences, router_grad, atomic, dx_first, dx_last, masks_h, sum_bias, sum_task, sum_alpha,
    BM: tl.constexpr, BK: tl.constexpr, HC: tl.constexpr, MG: tl.constexpr, E_PAD: tl.constexpr,
    DOT: tl.constexpr,
):
    if tl.program_id(0) < tl.cdiv(D, BK):
        cols = tl.program_id(0) * BK + tl.arange(0, BK)
        col_ok = cols < D
        key = philox_seed(seed, seed_ptr, seed_in_memory)
        t_begin, t_end = token_split(T, tokens_per_split)
        items = tl.cdiv(M, MG) * h_chunks
        for item in range(items):
            slot0 = (item // h_chunks) * MG
            hcols = (item % h_chunks) * HC + tl.arange(0, HC)
            hcol_ok = hcols < HR
            a_tiles = ()
            for s in tl.static_range(MG):
                # the member's validity as a tensor (the interpreter rejects masks combined with a scalar bool)
                a_ok = (hcol_ok & (hcols * 0 + slot0 + s < M))[:, None] & col_ok[None, :]
                a_tile = tl.load(member_value(a_ptrs, slot0 + s) + hcols.to(tl.int64)[:, None] * D + cols[None, :], mask=a_ok,
                                 other=0.0).to(tl.float32)
                a_tiles = a_tiles + (dot_operand(a_tile, DOT),)
            accs = slot_accumulators(MG, HC, BK)
            routes = router_grad & (item == 0)
            acc_w = slot_accumulators(E_PAD // 16, 16, BK)  # the router in blocks of 16 experts: fewer registers
            for t0 in range(t_begin, t_end, BM):
                rows, row_ok, rows64 = token_rows(t0, t_end, BM)
                offsets = rows64[:, None] * D + cols[None, :]
                tile_ok = row_ok[:, None] & col_ok[None, :]
                xt = tl.load(x_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
                dx = tl.zeros((BM, BK), tl.float32)
                if routes:  # routing gradients keep fp32 accuracy
                    scale = dropout_scale(offsets, key, 0, dropout_p)
                    xr = dot_operand(xt * scale, DOT)
                    updated = ()
                    for b in tl.static_range(E_PAD // 16):
                        experts = b * 16 + tl.arange(0, 16)
                        dl = dot_operand(tl.load(dlogits_ptr + rows64[:, None] * E + experts[None, :],
                                                 mask=row_ok[:, None] & (experts < E)[None, :], other=0.0), DOT)
                        w = dot_operand(tl.load(w_ptr + experts[:, None] * D + cols[None, :],
                                                mask=(experts < E)[:, None] & col_ok[None, :], other=0.0), DOT)
                        updated = updated + (acc_w[b] + dot(tl.trans(dl), xr, DOT),)
                        dx += dot(dl, w, DOT) * scale
                    acc_w = updated
                dh_ok = row_ok[:, None] & hcol_ok[None, :]
                bits = tl.full((BM,), -1, tl.int64)
                if masks_h:  # column c of dh belongs to expert c // r; unselected experts' columns do not exist
                    bits = tl.load(sel_ptr + rows64, mask=row_ok, other=0)
                    dh_ok = dh_ok & expert_bits(bits, hcols // r)
                dh_cols = token_rank_columns(bits, hcols // r, hcols % r, r, masks_h)
                updated = ()
                for s in tl.static_range(MG):
                    acc = accs[s]
                    m = slot0 + s
                    if m < M:
                        scale = dropout_scale(offsets, key, member0 + m + 1, dropout_p)
                        dh = dot_operand(tl.load(dh_ptr + rows64[:, None] * h_stride + (member0 + m) * HS + dh_cols,
                                                 mask=dh_ok, other=0.0), DOT)
                        acc += dot(tl.trans(dh), dot_operand(xt * scale, DOT), DOT)
                        dx += dot(dh, a_tiles[s], DOT) * scale
                    updated = updated + (acc,)
                accs = updated
                if (dx_first == 0) | (item > 0):
                    dx += tl.load(dx_sum_ptr + offsets, mask=tile_ok, other=0.0)
                if dx_last & (item == items - 1):
                    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)
                else:
                    tl.store(dx_sum_ptr + offsets, dx, mask=tile_ok)
            for s in tl.static_range(MG):
                if slot0 + s < M:
                    accumulate(member_value(da_ptrs, slot0 + s) + hcols.to(tl.int64)[:, None] * D + cols[None, :], accs[s],
                               hcol_ok[:, None] & col_ok[None, :], atomic)
            tl.debug_barrier()  # the next item reads dx_sum rows that other threads of this program wrote
            if routes:
                for b in tl.static_range(E_PAD // 16):
                    experts = b * 16 + tl.arange(0, 16)
                    accumulate(dw_ptr + experts[:, None] * D + cols[None, :], acc_w[b],
                               (experts < E)[:, None] & col_ok[None, :], atomic)
    elif tl.program_id(1) == 0:
        routing_sums(dlogits_ptr, dtask_tok_ptr, dalpha_tok_ptr, dbias_ptr, dtask_ptr, dalpha_ptr, T, E, seq_len,
                     num_sequences, sum_bias, sum_task, sum_alpha, BM, E_PAD)


def input_grad_items(plan: GroupPlan, group: LaunchGroup) -> int:
    """Work items of one program of input_grad_kernel for a launch group: member slots x chunks of h."""
    MG = plan.configs(group)["input_grad"].as_dict()["MG"]
    return triton.cdiv(group.count, MG) * plan.h_chunks


def run_input_grad(plan: GroupPlan, group: LaunchGroup, x, As, dAs, dh, sel, seed_tensor, dx, dx_sum, routing,
                   routing_grads) -> None:
    """Adds launch group `group`'s share of dx (summed in dx_sum, fp32, when the call has more than one work item;
    the last writes dx in x's dtype) and writes its dA_m (fp32, zeroed unless plan.deterministic: split programs add
    atomically). Group 0 also does the router: routing = (router_weight or a stand-in, dlogits, dtask_tok,
    dalpha_tok), routing_grads = (dW, dbias, dtask, dalpha) fp32 or stand-ins; `routing` entries None when absent."""
    config = plan.configs(group)["input_grad"]
    c = config.as_dict()
    columns = triton.cdiv(plan.d_in, c["BK"])
    splits, per_split = plan.token_splits(columns, c["BM"])
    weight, dlogits, dtask_tok, dalpha_tok = routing
    dW, dbias, dtask, dalpha = routing_grads
    first, last = group.index == 0, group.index == len(plan.groups) - 1
    router_grad = first and dlogits is not None and plan.computes_logits
    sum_bias = first and plan.has_bias and dlogits is not None
    sums = first and (sum_bias or dtask_tok is not None or dalpha_tok is not None)

    def ptr(t):
        return dh if t is None else t  # absent tensors are never touched (run-time guarded)

    args = dict(
        x_ptr=x, a_ptrs=member_tuple(As), w_ptr=weight, dh_ptr=dh, sel_ptr=sel, dlogits_ptr=ptr(dlogits), dx_ptr=dx,
        dx_sum_ptr=dx_sum, da_ptrs=member_tuple(dAs), dw_ptr=dW, seed_ptr=seed_tensor,
        dtask_tok_ptr=ptr(dtask_tok), dalpha_tok_ptr=ptr(dalpha_tok), dbias_ptr=dbias, dtask_ptr=dtask,
        dalpha_ptr=dalpha, T=plan.T, D=plan.d_in, E=plan.E, r=plan.r, HR=plan.HR, HS=plan.HS,
        h_stride=plan.M * plan.HS,
        member0=group.first, M=group.count, h_chunks=plan.h_chunks, tokens_per_split=per_split,
        dropout_p=plan.dropout_p, seed=plan.seed_arg, seed_in_memory=plan.seed_in_memory, seq_len=plan.seq_len,
        num_sequences=plan.num_sequences, router_grad=router_grad, atomic=splits > 1, dx_first=first,
        dx_last=last, masks_h=plan.compact, sum_bias=sum_bias,
        sum_task=first and dtask_tok is not None, sum_alpha=first and dalpha_tok is not None,
    )
    launch(input_grad_kernel, (columns + sums, splits), args, c, config.num_warps)
