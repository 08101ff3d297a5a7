"""Backward kernel 2: per block of tokens, the routing taken back from the gate gradients to the logits.

From dgates (T, E) (summed over members and column blocks by the rank-gradient kernels) plus any gradient on the
returned gates, p_tok and logits: back through the gate rule, the hybrid mix and the softmax (RankWise: the sigmoid) to
dlogits (T, E), and the per-token task-probability and alpha contributions (summed by input_grad_kernel's extra
program).
"""
import triton
import triton.language as tl

from .launch import launch
from .plan import GroupPlan
from .routing import KIND_HYBRID, KIND_TASK, RULE_RANK_WISE, RULE_SWITCH, route_backward
from .tiles import fused_jit, token_block


@fused_jit
def route_grad_kernel(
    dgates_ptr, p_tok_ptr, task_ptr, alpha_ptr, dgates_in_ptr, dp_tok_in_ptr, dlogits_in_ptr, selection_bias_ptr,
    sel_ptr, dlogits_ptr, dtask_tok_ptr, dalpha_tok_ptr,
    T, E, seq_len, top_k, kind, renorm_softmax, has_dgates, has_dp_tok, has_dlogits, rule, rule_args,
    BM: tl.constexpr, E_PAD: tl.constexpr,
):
    rows, row_ok, rows64 = token_block(T, BM)
    ce = tl.arange(0, E_PAD)
    valid = row_ok[:, None] & (ce < E)[None, :]
    e_offsets = rows64[:, None] * E + ce[None, :]
    dgates = tl.load(dgates_ptr + e_offsets, mask=valid, other=0.0)
    if has_dgates:
        dgates += tl.load(dgates_in_ptr + e_offsets, mask=valid, other=0.0)
    p_tok = tl.zeros((BM, E_PAD), tl.float32)
    if kind != KIND_TASK:
        p_tok = tl.load(p_tok_ptr + e_offsets, mask=valid, other=0.0)
    bits = tl.full((BM,), 0, tl.int64)
    if rule == RULE_SWITCH:  # the selection after the capacity
        bits = tl.load(sel_ptr + rows64, mask=row_ok, other=0)
    dp_tok, dp_task, dalpha = route_backward(dgates, p_tok, bits, rows, row_ok, ce, E, seq_len, task_ptr, alpha_ptr,
                                             kind, top_k, renorm_softmax, rule, rule_args, selection_bias_ptr)
    if kind == KIND_TASK:
        tl.store(dtask_tok_ptr + e_offsets, dp_task, mask=valid)
    else:
        if kind == KIND_HYBRID:
            tl.store(dtask_tok_ptr + e_offsets, dp_task, mask=valid)
            tl.store(dalpha_tok_ptr + rows64, dalpha, mask=row_ok)
        if has_dp_tok:
            dp_tok += tl.load(dp_tok_in_ptr + e_offsets, mask=valid, other=0.0)
        if rule == RULE_RANK_WISE:  # p_tok = sigmoid(logits)
            dlogits = dp_tok * p_tok * (1.0 - p_tok)
        else:
            dlogits = p_tok * (dp_tok - tl.sum(p_tok * dp_tok, axis=1)[:, None])
        if has_dlogits:
            dlogits += tl.load(dlogits_in_ptr + e_offsets, mask=valid, other=0.0)
        tl.store(dlogits_ptr + e_offsets, dlogits, mask=valid)


def run_route_grad(plan: GroupPlan, dgates, p_tok, task_probs, alpha, dgates_in, dp_tok_in, dlogits_in, selection_bias,
                   sel, outputs):
    """Writes outputs = (dlogits, dtask_tok, dalpha_tok) (fp32; stand-ins where the kind has none) from dgates
    (T, E) fp32 and the gradients that reached the returned gates / p_tok / logits (None when none did); RankWise
    reads its selection bias, Switch the selections `sel` its capacity left."""
    config = plan.configs(plan.groups[0])["route_grad"]
    c = config.as_dict()
    dlogits, dtask_tok, dalpha_tok = outputs

    def ptr(t):
        return dgates if t is None else t  # absent tensors are never touched (run-time guarded)

    args = dict(
        dgates_ptr=dgates, p_tok_ptr=ptr(p_tok), task_ptr=ptr(task_probs), alpha_ptr=ptr(alpha),
        dgates_in_ptr=ptr(dgates_in), dp_tok_in_ptr=ptr(dp_tok_in), dlogits_in_ptr=ptr(dlogits_in),
        selection_bias_ptr=ptr(selection_bias), sel_ptr=sel, dlogits_ptr=dlogits, dtask_tok_ptr=dtask_tok,
        dalpha_tok_ptr=dalpha_tok,
        T=plan.T, E=plan.E, seq_len=plan.seq_len, top_k=plan.top_k, kind=plan.kind_code,
        renorm_softmax=plan.renorm_softmax, has_dgates=dgates_in is not None, has_dp_tok=dp_tok_in is not None,
        has_dlogits=dlogits_in is not None, rule=plan.rule.code, rule_args=plan.rule.kernel_tuple(),
    )
    launch(route_grad_kernel, (triton.cdiv(plan.T, c["BM"]),), args, c, config.num_warps)
