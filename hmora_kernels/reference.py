"""The math of SPEC.md as written: a loop over experts, computed in float32 (float64 for float64 inputs).

Obviously right rather than fast; every other backend is tested against it. Public ops validate their
inputs before they get here (`hmora_kernels.ops`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .dropout import ROUTER_STREAM, group_keep_masks, member_stream
from .types import GroupOutput, RankWise, Switch, TopP


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sequence_index(num_tokens: int, num_sequences: int, device) -> torch.Tensor:
    """Sequence of each token of a flattened (num_sequences x seq_len) batch."""
    return torch.arange(num_tokens, device=device) // (num_tokens // num_sequences)


def lora(x, A, B, scaling, *, dropout_p=0.0, seed=0, dropout_rng="philox", base=None, reuse_base=False):
    """y = base + s * (drop(x) A^T) B^T (a new tensor: reuse_base permits, never obliges, writing into base)."""
    ct = compute_dtype(x)
    (xd,) = _dropped_inputs(x.to(ct), [member_stream(0)], dropout_p, seed, dropout_rng)
    delta = scaling * ((xd @ A.to(ct).T) @ B.to(ct).T)
    return _add_base(delta, base, x)


def route(logits, *, task_probs=None, alpha=None, kind="token", top_k=None, renorm="softmax", num_tokens=None,
          rule=None, token_mask=None, selection_bias=None):
    """(p_tok, gates): p_tok = softmax(logits) (RankWise: sigmoid); p mixes in the task probabilities per SPEC 3.3;
    gates per SPEC 3.4 or the routing rule."""
    return routing(logits, task_probs=task_probs, alpha=alpha, kind=kind, top_k=top_k, renorm=renorm,
                   num_tokens=num_tokens, rule=rule, token_mask=token_mask, selection_bias=selection_bias)[:2]


def routing(logits, *, task_probs=None, alpha=None, kind="token", top_k=None, renorm="softmax", num_tokens=None,
            rule=None, token_mask=None, selection_bias=None):
    """(p_tok, gates, routed_counts, kept_counts); the counts are None under the default rule."""
    p_tok = None
    if logits is not None:
        ct = compute_dtype(logits)
        scores = torch.sigmoid if isinstance(rule, RankWise) else lambda z: torch.softmax(z, dim=-1)
        p_tok = scores(logits.to(ct))
        num_tokens = logits.shape[0]
    if kind == "token":
        p = p_tok
    else:
        ct = compute_dtype(task_probs)
        p_task = task_probs.to(ct)[sequence_index(num_tokens, task_probs.shape[0], task_probs.device)]
        if kind == "task":
            p = p_task
        else:
            a = torch.sigmoid(alpha.reshape(()).to(ct))
            p = (1 - a) * p_tok.to(ct) + a * p_task
    if rule is None:
        return p_tok, _gates(p, top_k, renorm), None, None
    real = [True] * num_tokens if token_mask is None else (token_mask.reshape(-1) != 0).tolist()
    if isinstance(rule, Switch):
        seq_len = num_tokens if token_mask is None else token_mask.shape[1]
        gates, routed, kept = _switch_gates(p, rule.capacity, real, seq_len)
    elif isinstance(rule, TopP):
        gates, kept = _top_p_gates(p, rule, real)
        routed = kept
    else:
        gates, kept = _rank_wise_gates(p, selection_bias, rule.top_k, real)
        routed = kept
    return p_tok, gates, routed, kept


def top_k_order(row, k):
    """The k experts the selection rule picks from one token's probabilities: p descending, NaN above every
    number, equal values (NaN and NaN too) in order of expert index; the first k."""
    values = row.tolist()

    def rank(i):
        return (0, 0.0, i) if math.isnan(values[i]) else (1, -values[i], i)

    return sorted(range(len(values)), key=rank)[:k]


def _gates(p, top_k, renorm):
    if top_k is None:
        return p
    gates = torch.zeros_like(p)
    for t in range(p.shape[0]):  # per token: pick k experts, renormalise only them
        idx = torch.tensor(top_k_order(p[t], top_k), device=p.device)
        vals = p[t][idx]
        weights = torch.softmax(vals, dim=0) if renorm == "softmax" else vals / vals.sum()
        gates[t] = gates[t].index_put((idx,), weights)
    return gates


def _counts(chosen, num_experts, device):
    """(E,) int64: how many of the given expert lists name each expert."""
    counts = [0] * num_experts
    for experts in chosen:
        for e in experts:
            counts[e] += 1
    return torch.tensor(counts, dtype=torch.int64, device=device)


def _switch_gates(p, capacity, real, seq_len):
    """Top-1 with the unrenormalised gate p[e*]; a real token is kept while its sequence has sent at most `capacity`
    real tokens to its expert (itself included), in position order; padding claims nothing."""
    T, E = p.shape
    gates = torch.zeros_like(p)
    claimed = {}  # (sequence, expert) -> real tokens of that sequence that chose the expert so far
    routed, kept = [], []
    for t in range(T):
        e = top_k_order(p[t], 1)[0]
        if not real[t]:
            if capacity is None:  # without a capacity padding is routed like any token (and not counted)
                gates[t, e] = p[t, e]
            continue
        routed.append([e])
        key = (t // seq_len, e)
        claimed[key] = claimed.get(key, 0) + 1
        if capacity is None or claimed[key] <= capacity:
            gates[t, e] = p[t, e]
            kept.append([e])
    return gates, _counts(routed, E, p.device), _counts(kept, E, p.device)


def tsallis_entropy(p, q, eps):
    """Normalised Tsallis entropy of each row of p (..., E), DynMoLE's: S_q(p) / S_q(uniform) with
    S_q(p) = (1 - sum_i (p_i + eps)^q) / (q - 1), S_q(uniform) = (1 - E^(1-q)) / (q - 1) (computed in float64);
    q = 1: Shannon, -sum_i (p_i + eps) ln(p_i + eps) / ln E. E = 1 gives 0."""
    E = p.shape[-1]
    if E == 1:
        return p.new_zeros(p.shape[:-1])
    total = p.new_zeros(p.shape[:-1])
    for i in range(E):  # expert by expert: the summation order of the definition
        shifted = p[..., i] + eps
        total = total + (shifted * torch.log(shifted) if q == 1 else shifted ** q)
    if q == 1:
        return -total / math.log(E)
    return ((1 - total) / (q - 1)) / ((1 - E ** (1 - q)) / (q - 1))


def _top_p_gates(p, rule, real):
    """DynMoLE: keep experts in order of p while the running sum stays <= top_p, at least keep_top_k of them; all
    experts when the normalised Tsallis entropy exceeds the threshold (< 1); gates p * keep."""
    T, E = p.shape
    # the comparisons are in p's dtype, as in every backend
    top_p = torch.tensor(rule.top_p, dtype=p.dtype, device=p.device)
    threshold = torch.tensor(rule.entropy_threshold, dtype=p.dtype, device=p.device)
    gates = torch.zeros_like(p)
    kept = []
    for t in range(T):
        row = p[t].detach()
        keep = []
        running = row.new_zeros(())
        for j, e in enumerate(top_k_order(row, E)):
            running = running + row[e]
            if running <= top_p or j < rule.keep_top_k:
                keep.append(e)
        if rule.entropy_threshold < 1 and tsallis_entropy(row, rule.entropy_index, rule.entropy_eps) > threshold:
            keep = list(range(E))
        idx = torch.tensor(sorted(keep), device=p.device)
        gates[t] = gates[t].index_put((idx,), p[t][idx])
        if real[t]:
            kept.append(keep)
    return gates, _counts(kept, E, p.device)


def _rank_wise_gates(scores, selection_bias, k, real):
    """SMoRA: the top-k of v = s + b; gates k * v_i / sum of the selected v (the bias is a constant)."""
    T, E = scores.shape
    gates = torch.zeros_like(scores)
    kept = []
    for t in range(T):
        v = scores[t] + selection_bias.detach().to(scores.dtype)
        idx = top_k_order(v.detach(), k)
        vals = v[torch.tensor(idx, device=v.device)]
        gates[t] = gates[t].index_put((torch.tensor(idx, device=v.device),), k * vals / vals.sum())
        if real[t]:
            kept.append(idx)
    return gates, _counts(kept, E, scores.device)


def routed_group(
    x, members_A: Sequence[torch.Tensor], members_B: Sequence[torch.Tensor], scaling, *, shape,
    router_weight=None, router_bias=None, router_logits=None, task_probs=None, alpha=None,
    kind="token", top_k=None, renorm="softmax", dropout_p=0.0, seed=0, dropout_rng="philox", bases=None,
    reuse_bases=False, rule=None, token_mask=None, selection_bias=None,
) -> GroupOutput:
    """y_m = base_m + s * sum_e g_e * (drop_m(x) A_{m,e}^T) B_{m,e}^T with g from the group's one router.

    The masks are drawn as the torch backend draws them (`group_dropped`), so "native" masks equal its own."""
    ct = compute_dtype(x)
    E, r = shape.num_experts, shape.rank
    logits = router_logits
    router_in = kind != "task" and router_logits is None
    streams = ([ROUTER_STREAM] if router_in else []) + [member_stream(m) for m in range(len(members_A))]
    inputs = _dropped_inputs(x.to(ct), streams, dropout_p, seed, dropout_rng)
    if router_in:
        xr = inputs.pop(0)
        logits = xr @ router_weight.to(ct).T
        if router_bias is not None:
            logits = logits + router_bias.to(ct)
    p_tok, gates, routed, kept = routing(
        logits, task_probs=task_probs, alpha=alpha, kind=kind, top_k=top_k, renorm=renorm, num_tokens=x.shape[0],
        rule=rule, token_mask=token_mask, selection_bias=selection_bias)
    outputs = []
    for m, (xd, A, B) in enumerate(zip(inputs, members_A, members_B)):
        A, B = A.to(ct), B.to(ct)
        delta = torch.zeros(x.shape[0], B.shape[0], dtype=ct, device=x.device)
        for e in range(E):
            A_e = A if shape.hydra else A[e * r:(e + 1) * r]
            B_e = B[:, e * r:(e + 1) * r]
            delta = delta + gates[:, e:e + 1].to(ct) * ((xd @ A_e.T) @ B_e.T)
        outputs.append(_add_base(scaling * delta, None if bases is None else bases[m], x))
    return GroupOutput(outputs, logits, p_tok, gates, routed, kept)


def _dropped_inputs(x, streams, dropout_p, seed, dropout_rng):
    """[x * keep_s / (1 - p)] for each dropout stream s of the op."""
    if dropout_p == 0.0:
        return [x for _ in streams]
    keep = group_keep_masks(tuple(x.shape), dropout_p, seed, streams, x.device, dropout_rng)
    return [x * k.to(x.dtype) / (1.0 - dropout_p) for k in keep]


def _add_base(delta, base, x):
    if base is None:
        return delta.to(x.dtype)
    return (base.to(delta.dtype) + delta).to(base.dtype)


def entropy(q):
    """H(q) = -sum_i q_i ln(q_i + 1e-9) over the last dimension (SPEC 4)."""
    return -(q * torch.log(q + 1e-9)).sum(-1)


def gjs_loss(p, gamma_c, gamma_b, mask=None):
    """relu((gamma_b - gamma_c) lnE - (min(H(m), gamma_b lnE) - mean_n max(H(p_n), gamma_c lnE))) / lnE."""
    E = p.shape[-1]
    if E == 1:
        return p.new_zeros(())  # one expert: nothing to balance, and lnE = 0
    ln_e = math.log(E)
    p = p.reshape(-1, E)
    mask = torch.ones(p.shape[0], dtype=p.dtype, device=p.device) if mask is None else mask.reshape(-1).to(p.dtype)
    n = mask.sum()
    mean = torch.zeros(E, dtype=p.dtype, device=p.device)
    certainty = p.new_zeros(())
    for t in range(p.shape[0]):
        mean = mean + mask[t] * p[t]
        certainty = certainty + mask[t] * torch.clamp(entropy(p[t]), min=gamma_c * ln_e)
    balance = torch.clamp(entropy(mean / n), max=gamma_b * ln_e)
    return torch.relu((gamma_b - gamma_c) * ln_e - (balance - certainty / n)) / ln_e


def load_balancing_loss(p, gates, top_k=None, mask=None, frequencies="selected"):
    """E * sum_i prop_i * freq_i: prop = masked mean of p; freq = masked fraction of tokens with gate_i != 0
    ("selected") or masked mean of gate_i ("gate_values"), over k."""
    E = p.shape[-1]
    k = E if top_k is None else top_k
    p, gates = p.reshape(-1, E), gates.reshape(-1, E)
    mask = torch.ones(p.shape[0], dtype=p.dtype, device=p.device) if mask is None else mask.reshape(-1).to(p.dtype)
    n = mask.sum()
    loss = p.new_zeros(())
    for i in range(E):
        prop = (mask * p[:, i]).sum() / n
        weight = (gates[:, i] != 0).to(p.dtype) if frequencies == "selected" else gates[:, i].to(p.dtype)
        freq = (mask * weight).sum() / n / k
        loss = loss + prop * freq
    return E * loss


def entropy_loss(p, q, eps, mask=None):
    """Masked mean over tokens of the normalised Tsallis entropy of p (DynMoLE's entropy loss)."""
    h = tsallis_entropy(p.reshape(-1, p.shape[-1]), q, eps)
    mask = torch.ones_like(h) if mask is None else mask.reshape(-1).to(h.dtype)
    return (h * mask).sum() / mask.sum()


def router_z_loss(logits, mask=None):
    """Masked mean over tokens of logsumexp(logits)^2."""
    z = torch.logsumexp(logits.reshape(-1, logits.shape[-1]), dim=-1) ** 2
    if mask is None:
        return z.mean()
    mask = mask.reshape(-1).to(z.dtype)
    return (z * mask).sum() / mask.sum()
