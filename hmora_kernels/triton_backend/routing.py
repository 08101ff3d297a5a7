"""Routing of a block of tokens in registers, forward (`route`) and backward (`route_backward`): router
probabilities, the hybrid mix with the task probabilities, and the gate rule, all in fp32.

The gate rule is `select_experts` (which experts a token uses), `gate_values` (their weights) and
`gate_values_backward`; a new rule (switch top-1, DynMoLE top-p, ...) slots in there, behind a rule code, and
every kernel keeps reaching routing through `route` / `route_backward` alone. (A rule that depends on other tokens,
such as expert capacity, also needs a scan over the tokens in order before the expand kernel.)
"""
import triton
import triton.language as tl

from .plan import KIND_CODES, ROUTER_LOGITS as _ROUTER_LOGITS, ROUTER_WEIGHT as _ROUTER_WEIGHT

KIND_TOKEN = tl.constexpr(KIND_CODES["token"])
KIND_TASK = tl.constexpr(KIND_CODES["task"])
KIND_HYBRID = tl.constexpr(KIND_CODES["hybrid"])
KIND_NONE = tl.constexpr(KIND_CODES["none"])
ROUTER_WEIGHT = tl.constexpr(_ROUTER_WEIGHT)
ROUTER_LOGITS = tl.constexpr(_ROUTER_LOGITS)
_NO_EXPERT = tl.constexpr(1 << 30)


@triton.jit
def softmax_rows(z, valid):
    """Row softmax over the valid columns (others 0), in fp32."""
    z = tl.where(valid, z, float("-inf"))
    e = tl.where(valid, tl.exp(z - tl.max(z, axis=1)[:, None]), 0.0)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def mix_probs(p_tok, rows, cols, valid, E, seq_len, task_ptr, alpha_ptr, kind):
    """(p_task, a, p): p = p_tok (token), p_task of the token's sequence (task), or (1 - a) p_tok + a p_task with
    a = sigmoid(alpha) (hybrid)."""
    p_task = tl.zeros_like(p_tok)
    a = 0.0
    p = p_tok
    if kind != KIND_TOKEN:
        seq = (rows // seq_len).to(tl.int64)
        p_task = tl.load(task_ptr + seq[:, None] * E + cols[None, :], mask=valid, other=0.0)
        if kind == KIND_TASK:
            p = p_task
        else:
            a = tl.sigmoid(tl.load(alpha_ptr))
            p = (1.0 - a) * p_tok + a * p_task
    # past the last token or expert any positive p will do (nothing there is stored): no 0/0 in the renorm
    return p_task, a, tl.where(valid, p, 1.0)


@triton.jit
def select_experts(p, cols, expert_ok, top_k):
    """Which experts each token uses. Top-k: order the experts by p descending, NaN counting as larger than any
    number, equal values (NaN and NaN too) broken by the lowest expert index, and take the first k. Soft routing
    (top_k = 0): every expert."""
    if top_k > 0:
        selected = tl.full(p.shape, 0, tl.int1)
        is_nan = p != p
        for _ in range(top_k):
            free = expert_ok & ~selected
            first_nan = tl.min(tl.where(free & is_nan, cols[None, :], _NO_EXPERT), axis=1)
            number = tl.where(free & ~is_nan, p, float("-inf"))
            best = tl.max(number, axis=1)
            ties = free & ~is_nan & (number == best[:, None])
            first = tl.where(first_nan < _NO_EXPERT, first_nan, tl.min(tl.where(ties, cols[None, :], _NO_EXPERT), 1))
            selected = selected | (cols[None, :] == first[:, None])
    else:
        selected = tl.broadcast_to(expert_ok, p.shape)
    return selected


@triton.jit
def gate_values(p, selected, top_k, renorm_softmax):
    """Gates of the selected experts (0 elsewhere): top-k renormalised by a softmax over the selected probabilities
    (the reference implementation's rule) or by their sum; soft routing keeps p. A NaN among a token's selected
    probabilities makes all its selected gates NaN, as in the reference."""
    if top_k > 0:
        if renorm_softmax:
            z = tl.where(selected, p, float("-inf"))
            e = tl.where(selected, tl.exp(z - tl.max(z, axis=1)[:, None]), 0.0)
        else:
            e = tl.where(selected, p, 0.0)
        gates = tl.where(selected, e / tl.sum(e, axis=1)[:, None], 0.0)
    else:
        gates = tl.where(selected, p, 0.0)
    return gates


@triton.jit
def gate_values_backward(dgates, p, selected, gates, top_k, renorm_softmax):
    """dL/dp from dL/dgates, through gate_values."""
    if top_k > 0:
        g_dg = tl.sum(tl.where(selected, gates * dgates, 0.0), axis=1)[:, None]
        if renorm_softmax:
            dp = tl.where(selected, gates * (dgates - g_dg), 0.0)
        else:
            dp = tl.where(selected, (dgates - g_dg) / tl.sum(tl.where(selected, p, 0.0), axis=1)[:, None], 0.0)
    else:
        dp = tl.where(selected, dgates, 0.0)
    return dp


@triton.jit
def route(logits, rows, row_ok, cols, E, seq_len, task_ptr, alpha_ptr, kind, top_k, renorm_softmax):
    """(p_tok, p_task, a, p, selected, gates) of a block of tokens from its router logits (kind token / hybrid) or
    its sequences' task probabilities (kind task)."""
    expert_ok = (cols < E)[None, :]
    valid = row_ok[:, None] & expert_ok
    p_tok = tl.zeros_like(logits)
    if kind != KIND_TASK:
        p_tok = softmax_rows(logits, expert_ok)
    p_task, a, p = mix_probs(p_tok, rows, cols, valid, E, seq_len, task_ptr, alpha_ptr, kind)
    selected = select_experts(p, cols, expert_ok, top_k)
    return p_tok, p_task, a, p, selected, gate_values(p, selected, top_k, renorm_softmax)


@triton.jit
def route_backward(dgates, p_tok, rows, row_ok, cols, E, seq_len, task_ptr, alpha_ptr, kind, top_k,
                   renorm_softmax):
    """(dp_tok, dp_task per token, d alpha per token) from dL/dgates, recomputing the forward's routing from p_tok
    (the same fp32 values, so the same selection)."""
    expert_ok = (cols < E)[None, :]
    valid = row_ok[:, None] & expert_ok
    p_task, a, p = mix_probs(p_tok, rows, cols, valid, E, seq_len, task_ptr, alpha_ptr, kind)
    selected = select_experts(p, cols, expert_ok, top_k)
    gates = gate_values(p, selected, top_k, renorm_softmax)
    dp = tl.where(valid, gate_values_backward(dgates, p, selected, gates, top_k, renorm_softmax), 0.0)
    dp_tok = dp
    dp_task = tl.zeros_like(dp)
    dalpha = tl.sum(dp, axis=1) * 0.0
    if kind == KIND_TASK:
        dp_task = dp
    if kind == KIND_HYBRID:
        dp_tok = (1.0 - a) * dp
        dp_task = a * dp
        dalpha = tl.sum(dp * (p_task - p_tok), axis=1) * a * (1.0 - a)
    return dp_tok, dp_task, dalpha


@triton.jit
def selection_mask_bits(selected, cols):
    """(rows,) int64: bit e set when expert e is selected (E <= 64; the bits are distinct, so their sum is their or)."""
    return tl.sum(tl.where(selected, tl.full(cols.shape, 1, tl.int64)[None, :] << cols.to(tl.int64)[None, :], 0), 1)
