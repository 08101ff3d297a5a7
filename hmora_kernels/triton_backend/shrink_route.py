"""Forward kernel 1 of a routed group: one pass over x gives the router logits, the routing and the members' h.

logits = drop_0(x) W_r^T + b_r;  p_tok = softmax(logits);  gates = rule(mix(p_tok, p_task, alpha));
h_m = drop_{m+1}(x) A_m^T.   Programs own a block of tokens and one chunk of HC columns of h for MG members at a
time, so registers do not grow with E*r or the number of members; the members of one program share each x tile,
and the chunks of a token block run one after another, so x is re-read from L2, not DRAM. Every dropout mask is
regenerated in registers. Program (block, 0) of launch group 0 stores the routing (and, under top-k or a routing
rule, each token's selected experts as a 64-bit mask); under top-k with one A per expert every program routes its
tokens itself and stores only the selected experts' columns of h.
"""
import triton
import triton.language as tl

from .launch import launch, member_tuple
from .plan import GroupPlan, LaunchGroup
from .routing import KIND_NONE, KIND_TASK, ROUTER_LOGITS, ROUTER_WEIGHT, RULE_DEFAULT, route, selection_mask_bits
from .tiles import (
    FP32_DOT, dot, dot_operand, dropout_scale, expert_bits, fused_jit, member_value, philox_seed, slot_accumulators,
    token_block, token_rank_columns,
)


@fused_jit
def shrink_route_kernel(
    x_ptr, a_ptrs, w_ptr, bias_ptr, logits_in_ptr, task_ptr, alpha_ptr, seed_ptr, selection_bias_ptr,
    h_ptr, logits_ptr, p_tok_ptr, gates_ptr, sel_ptr,
    T, D, E, r, HR, HS, h_stride, member0, M, h_chunks, seq_len, top_k, dropout_p, seed,
    kind, router, has_bias, renorm_softmax, seed_in_memory, stores_routing, masks_h, rule, rule_args,
    BM: tl.constexpr, BK: tl.constexpr, HC: tl.constexpr, MG: tl.constexpr, E_PAD: tl.constexpr,
    DOT: tl.constexpr,
):
    rows, row_ok, rows64 = token_block(T, BM)
    chunk = tl.program_id(1) % h_chunks
    slot0 = (tl.program_id(1) // h_chunks) * MG
    hcols = chunk * HC + tl.arange(0, HC)
    hcol_ok = hcols < HR
    ks = tl.arange(0, BK)
    ce = tl.arange(0, E_PAD)
    designated = stores_routing & (tl.program_id(1) == 0)
    routes = (kind != KIND_NONE) & (designated | masks_h)
    computes_logits = routes & (router == ROUTER_WEIGHT) & (kind != KIND_TASK)
    key = philox_seed(seed, seed_ptr, seed_in_memory)
    accs = slot_accumulators(MG, BM, HC)
    logits = tl.zeros((BM, E_PAD), tl.float32)
    for k0 in range(0, D, BK):
        cols = k0 + ks
        col_ok = cols < D
        offsets = rows64[:, None] * D + cols[None, :]
        xt = tl.load(x_ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if computes_logits:  # routing keeps fp32 accuracy end to end
            w_t = tl.load(w_ptr + ce[None, :] * D + cols[:, None], mask=(ce < E)[None, :] & col_ok[:, None], other=0.0)
            logits += tl.dot(xt * dropout_scale(offsets, key, 0, dropout_p), w_t, input_precision=FP32_DOT)
        updated = ()
        for s in tl.static_range(MG):
            acc = accs[s]
            m = slot0 + s
            if m < M:
                a_t = tl.load(member_value(a_ptrs, m) + hcols.to(tl.int64)[None, :] * D + cols[:, None],
                              mask=hcol_ok[None, :] & col_ok[:, None], other=0.0).to(tl.float32)
                xm = xt * dropout_scale(offsets, key, member0 + m + 1, dropout_p)
                acc += dot(dot_operand(xm, DOT), dot_operand(a_t, DOT), DOT)
            updated = updated + (acc,)
        accs = updated
    store_ok = row_ok[:, None] & hcol_ok[None, :]
    bits = tl.full((BM,), -1, tl.int64)
    if routes:
        valid = row_ok[:, None] & (ce < E)[None, :]
        e_offsets = rows64[:, None] * E + ce[None, :]
        if router == ROUTER_LOGITS:  # a deeper router computed them
            logits = tl.load(logits_in_ptr + e_offsets, mask=valid, other=0.0)
        elif has_bias:
            logits += tl.load(bias_ptr + ce, mask=ce < E, other=0.0)[None, :]
        p_tok, p_task, a, p, selected, gates = route(logits, rows, row_ok, ce, E, seq_len, task_ptr, alpha_ptr, kind,
                                                     top_k, renorm_softmax, rule, rule_args, selection_bias_ptr)
        bits = selection_mask_bits(selected, ce)
        if designated:
            if computes_logits:
                tl.store(logits_ptr + e_offsets, logits, mask=valid)
            if kind != KIND_TASK:
                tl.store(p_tok_ptr + e_offsets, p_tok, mask=valid)
            tl.store(gates_ptr + e_offsets, gates, mask=valid)
            if (top_k > 0) | (rule != RULE_DEFAULT):  # a rule's counts (and Switch's capacity) read them
                tl.store(sel_ptr + rows64, bits, mask=row_ok)
        if masks_h:  # column c of h belongs to expert c // r: stored only where the token selected it
            store_ok = store_ok & expert_bits(bits, hcols // r)
    cols = token_rank_columns(bits, hcols // r, hcols % r, r, masks_h)
    for s in tl.static_range(MG):
        m = slot0 + s
        if m < M:
            tl.store(h_ptr + rows64[:, None] * h_stride + (member0 + m) * HS + cols, accs[s].to(h_ptr.dtype.element_ty),
                     mask=store_ok)


def run_shrink_route(plan: GroupPlan, group: LaunchGroup, x, As, routing_in, routing_out) -> None:
    """Writes launch group `group`'s columns of h (T, M*HS) and, for group 0, the routing outputs.
    routing_in: (router_weight, router_bias, router_logits, task_probs, alpha) fp32, the seed tensor and RankWise's
    selection bias (fp32), absent ones replaced by fp32 / int64 stand-ins (never read); routing_out: (h, logits,
    p_tok, gates, sel)."""
    config = plan.configs(group)["shrink_route"]
    c = config.as_dict()
    weight, bias, logits_in, task, alpha, seed_tensor, selection_bias = routing_in
    h, logits, p_tok, gates, sel = routing_out
    args = dict(
        x_ptr=x, a_ptrs=member_tuple(As), w_ptr=weight, bias_ptr=bias, logits_in_ptr=logits_in, task_ptr=task,
        alpha_ptr=alpha, seed_ptr=seed_tensor, selection_bias_ptr=selection_bias, h_ptr=h, logits_ptr=logits,
        p_tok_ptr=p_tok, gates_ptr=gates, sel_ptr=sel, T=plan.T, D=plan.d_in, E=plan.E, r=plan.r, HR=plan.HR,
        HS=plan.HS, h_stride=plan.M * plan.HS,
        member0=group.first, M=group.count, h_chunks=plan.h_chunks, seq_len=plan.seq_len, top_k=plan.top_k,
        dropout_p=plan.dropout_p, seed=plan.seed_arg, kind=plan.kind_code, router=plan.router,
        has_bias=plan.has_bias, renorm_softmax=plan.renorm_softmax, seed_in_memory=plan.seed_in_memory,
        stores_routing=group.index == 0, masks_h=plan.compact, rule=plan.rule.code, rule_args=plan.rule.kernel_tuple(),
    )
    grid = (triton.cdiv(plan.T, c["BM"]), plan.h_chunks * triton.cdiv(group.count, c["MG"]))
    launch(shrink_route_kernel, grid, args, c, config.num_warps)
