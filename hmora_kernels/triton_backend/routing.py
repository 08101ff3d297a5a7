"""Routing of a block of tokens in registers, forward (`route`) and backward (`route_backward`): router
probabilities, the hybrid mix with the task probabilities, and the gate rule, all in fp32.

The gate rule is `select_experts` (which experts a token uses), `gate_values` (their weights) and
`gate_values_backward`. The rule (default soft / top-k, Switch, TopP, RankWise: plan.RULE_CODES) and its
parameters are run-time values, like the routing kind, so every rule runs in the same compiled kernels; every
kernel reaches routing through `route` / `route_backward` alone. Switch's capacity depends on other tokens: it is
applied between the forward kernels (autograd.apply_capacity), and backward reads the selection it leaves.
"""
import triton
import triton.language as tl

from .plan import KIND_CODES, RULE_CODES, ROUTER_LOGITS as _ROUTER_LOGITS, ROUTER_WEIGHT as _ROUTER_WEIGHT
from .tiles import expert_bits

KIND_TOKEN = tl.constexpr(KIND_CODES["token"])
KIND_TASK = tl.constexpr(KIND_CODES["task"])
KIND_HYBRID = tl.constexpr(KIND_CODES["hybrid"])
KIND_NONE = tl.constexpr(KIND_CODES["none"])
ROUTER_WEIGHT = tl.constexpr(_ROUTER_WEIGHT)
ROUTER_LOGITS = tl.constexpr(_ROUTER_LOGITS)
RULE_DEFAULT = tl.constexpr(RULE_CODES["default"])
RULE_SWITCH = tl.constexpr(RULE_CODES["Switch"])
RULE_TOP_P = tl.constexpr(RULE_CODES["TopP"])
RULE_RANK_WISE = tl.constexpr(RULE_CODES["RankWise"])
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
def next_expert(p, is_nan, free, cols):
    """(rows,) the first of each token's free experts in the selection order: p descending, NaN counting as larger
    than any number, equal values (NaN and NaN too) broken by the lowest expert index."""
    first_nan = tl.min(tl.where(free & is_nan, cols[None, :], _NO_EXPERT), axis=1)
    number = tl.where(free & ~is_nan, p, float("-inf"))
    best = tl.max(number, axis=1)
    ties = free & ~is_nan & (number == best[:, None])
    return tl.where(first_nan < _NO_EXPERT, first_nan, tl.min(tl.where(ties, cols[None, :], _NO_EXPERT), 1))


@triton.jit
def tsallis_entropy(p, expert_ok, q, eps, norm):
    """(rows,) DynMoLE's normalised Tsallis entropy (1 - sum_e (p_e + eps)^q) / norm, norm = 1 - E^(1-q); for
    q = 1 Shannon's -sum_e (p_e + eps) ln(p_e + eps) / norm, norm = ln E (plan.RuleArgs)."""
    shifted = tl.where(expert_ok, p + eps, 1.0)
    if q == 1.0:
        entropy = -tl.sum(tl.where(expert_ok, shifted * tl.log(shifted), 0.0), axis=1)
    else:
        entropy = 1.0 - tl.sum(tl.where(expert_ok, tl.exp(q * tl.log(shifted)), 0.0), axis=1)
    return entropy / norm


@triton.jit
def select_top_p(p, cols, expert_ok, E, rule_args):
    """DynMoLE: experts in the selection order while their running sum (fp32, in that order, as every backend sums
    it) stays <= top_p, and at least the first keep_top_k; every expert when the normalised Tsallis entropy exceeds
    the threshold (the host passes +inf when the broadcast is off)."""
    top_p, keep_top_k, threshold = rule_args[0], rule_args[1], rule_args[2]
    is_nan = p != p
    taken = tl.full(p.shape, 0, tl.int1)
    selected = taken
    running = tl.zeros((p.shape[0],), tl.float32)
    for j in range(E):
        pick = cols[None, :] == next_expert(p, is_nan, expert_ok & ~taken, cols)[:, None]
        running += tl.sum(tl.where(pick, p, 0.0), axis=1)  # the one picked value: exact
        taken = taken | pick
        selected = selected | (pick & ((running <= top_p) | (j < keep_top_k))[:, None])
    broadcast = tsallis_entropy(p, expert_ok, rule_args[3], rule_args[4], rule_args[5]) > threshold
    return selected | (broadcast[:, None] & expert_ok)


@triton.jit
def select_experts(p, cols, expert_ok, E, top_k, rule, rule_args):
    """Which experts each token uses. Top-k (the default rule with top_k > 0, Switch's top-1, RankWise's top-k of
    s + b): the first k in the selection order (`next_expert`). TopP: `select_top_p`. Soft routing: every expert."""
    if rule == RULE_TOP_P:
        selected = select_top_p(p, cols, expert_ok, E, rule_args)
    elif top_k > 0:
        selected = tl.full(p.shape, 0, tl.int1)
        is_nan = p != p
        for _ in range(top_k):
            selected = selected | (cols[None, :] == next_expert(p, is_nan, expert_ok & ~selected, cols)[:, None])
    else:
        selected = tl.broadcast_to(expert_ok, p.shape)
    return selected


@triton.jit
def gate_values(p, selected, top_k, renorm_softmax, rule):
    """Gates of the selected experts (0 elsewhere). Default top-k: renormalised by a softmax over the selected
    probabilities (the reference implementation's rule) or by their sum; RankWise: k v / sum of the selected v (v the
    biased scores in p); soft routing, Switch and TopP keep p. A NaN among a token's selected probabilities makes all
    its selected gates NaN, as in the reference."""
    if (top_k > 0) & (rule != RULE_SWITCH):
        if renorm_softmax:
            z = tl.where(selected, p, float("-inf"))
            e = tl.where(selected, tl.exp(z - tl.max(z, axis=1)[:, None]), 0.0)
        else:
            e = tl.where(selected, p, 0.0)
        gates = tl.where(selected, gate_scale(top_k, rule) * e / tl.sum(e, axis=1)[:, None], 0.0)
    else:
        gates = tl.where(selected, p, 0.0)
    return gates


@triton.jit
def gate_scale(top_k, rule):
    """What the renormalised gates sum to: k under RankWise (SMoRA's k v / sum v), else 1."""
    scale = 1.0
    if rule == RULE_RANK_WISE:
        scale = top_k * 1.0
    return scale


@triton.jit
def gate_values_backward(dgates, p, selected, gates, top_k, renorm_softmax, rule):
    """dL/dp from dL/dgates, through gate_values. Sum renormalisation with gates c p / V (c = gate_scale, V the sum of
    the selected p): dp = (c dg - sum_S g dg) / V."""
    if (top_k > 0) & (rule != RULE_SWITCH):
        g_dg = tl.sum(tl.where(selected, gates * dgates, 0.0), axis=1)[:, None]
        if renorm_softmax:
            dp = tl.where(selected, gates * (dgates - g_dg), 0.0)
        else:
            dp = tl.where(selected, (gate_scale(top_k, rule) * dgates - g_dg)
                          / tl.sum(tl.where(selected, p, 0.0), axis=1)[:, None], 0.0)
    else:
        dp = tl.where(selected, dgates, 0.0)
    return dp


@triton.jit
def rule_probs(p_tok, rows, cols, valid, E, seq_len, task_ptr, alpha_ptr, kind, rule, bias_ptr):
    """(p_task, a, p): the values the gate rule reads: mix_probs' p, under RankWise the scores plus the selection
    bias (a constant: no gradient)."""
    p_task, a, p = mix_probs(p_tok, rows, cols, valid, E, seq_len, task_ptr, alpha_ptr, kind)
    if rule == RULE_RANK_WISE:
        p += tl.load(bias_ptr + cols, mask=cols < E, other=0.0)[None, :]
    return p_task, a, p


@triton.jit
def route(logits, rows, row_ok, cols, E, seq_len, task_ptr, alpha_ptr, kind, top_k, renorm_softmax, rule,
          rule_args, bias_ptr):
    """(p_tok, p_task, a, p, selected, gates) of a block of tokens from its router logits (kind token / hybrid) or
    its sequences' task probabilities (kind task). p_tok: the softmax, under RankWise the sigmoid scores. Switch's
    selection here is before its capacity."""
    expert_ok = (cols < E)[None, :]
    valid = row_ok[:, None] & expert_ok
    p_tok = tl.zeros_like(logits)
    if kind != KIND_TASK:
        if rule == RULE_RANK_WISE:
            p_tok = tl.where(expert_ok, tl.sigmoid(logits), 0.0)
        else:
            p_tok = softmax_rows(logits, expert_ok)
    p_task, a, p = rule_probs(p_tok, rows, cols, valid, E, seq_len, task_ptr, alpha_ptr, kind, rule, bias_ptr)
    selected = select_experts(p, cols, expert_ok, E, top_k, rule, rule_args)
    return p_tok, p_task, a, p, selected, gate_values(p, selected, top_k, renorm_softmax, rule)


@triton.jit
def route_backward(dgates, p_tok, bits, rows, row_ok, cols, E, seq_len, task_ptr, alpha_ptr, kind, top_k,
                   renorm_softmax, rule, rule_args, bias_ptr):
    """(dp_tok, dp_task per token, d alpha per token) from dL/dgates, recomputing the forward's routing from p_tok
    (the same fp32 values, so the same selection); Switch reads its selection after the capacity from `bits` (the
    stored masks: a dropped token has none)."""
    expert_ok = (cols < E)[None, :]
    valid = row_ok[:, None] & expert_ok
    p_task, a, p = rule_probs(p_tok, rows, cols, valid, E, seq_len, task_ptr, alpha_ptr, kind, rule, bias_ptr)
    if rule == RULE_SWITCH:
        selected = expert_bits(bits, cols) & expert_ok
    else:
        selected = select_experts(p, cols, expert_ok, E, top_k, rule, rule_args)
    gates = gate_values(p, selected, top_k, renorm_softmax, rule)
    dp = tl.where(valid, gate_values_backward(dgates, p, selected, gates, top_k, renorm_softmax, rule), 0.0)
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
