"""Vectorised dense-gated PyTorch: the fast path on machines without a GPU.

No Python loop over experts and no (T, d_out) tensor per expert: each member is two skinny GEMMs,
h = drop_m(x) A^T and y = base + s * (g (x) h) B^T, with the gates broadcast over each expert's rank block.
Where a CPU spends the adapter's time, and what is done about it here (measured in docs/BENCHMARKS.md):
- dropout masks: "native" draws the positions of the dropped elements of all the op's inputs at once, about p
  uniforms per element (see `hmora_kernels.dropout`), and zeroes them in the copies of x the GEMMs read, then in
  the products backward writes, one (streams, T, d) tensor each (`_DroppedShrink`): a few operators per op, not
  per stream; the inverted-dropout scale 1 / (1 - p) multiplies the rank activations (T, r);
- fresh (T, d_out) tensors: with `reuse_bases` the expand GEMM accumulates into the base output (addmm_), so the
  adapter allocates nothing of size (T, d_out) (a fresh 36 MB tensor costs more in page faults than the GEMM);
- skinny GEMMs: without dropout the router and every member's A read x in one GEMM (N = E + members x r), and
  backward writes dx with one GEMM instead of one per member plus their sum.
Routing is computed in float32 (float64 for float64 inputs) from the router's input in that dtype.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch

from .dropout import ROUTER_STREAM, group_dropped, member_stream
from .reference import compute_dtype, entropy, sequence_index, tsallis_entropy
from .reference import entropy_loss  # noqa: F401  (vectorised over tokens already, a loop over E: this backend's too)
from .types import GroupOutput, RankWise, Switch, TopP


class _DroppedShrink(torch.autograd.Function):
    """[drop_s(x) W_s^T / (1 - p)] for the S dropout streams of one op, W_s in its stream's compute dtype.

    The S dropped copies of x are one (S, T, d) tensor in x's dtype (zeroing is exact in any dtype), kept for the
    dW_s. `dropped` is a bool keep mask of that shape ("philox") or the flat positions of its dropped elements
    ("native", see `hmora_kernels.dropout.group_dropped`); then no mask of size (S, T, d) exists: forward zeroes
    the positions in the copy it writes, backward in the (S, T, d) products dh_s W_s it writes, and sums them: dx.
    """

    @staticmethod
    def forward(ctx, x, dropped, scale, *weights):
        copies = x.unsqueeze(0).expand(len(weights), *x.shape)
        if dropped.dtype == torch.bool:
            xm = torch.where(dropped, copies, 0.0)
        else:
            xm = _zeroed_at(copies.shape, x.dtype, dropped, lambda out: out.copy_(copies))
        ctx.save_for_backward(xm, dropped, *weights)
        ctx.scale = scale
        return tuple(xm[s].to(W.dtype) @ W.T * scale for s, W in enumerate(weights))

    @staticmethod
    def backward(ctx, *dhs):
        xm, dropped, *weights = ctx.saved_tensors
        # in each weight's dtype: a forward under autocast hands back half-precision dh for fp32 weights
        dhs = [dh.to(W.dtype) * ctx.scale for dh, W in zip(dhs, weights)]
        dx = None
        if ctx.needs_input_grad[0]:
            # under autocast (a backward called inside it) mm computes in half precision: no out= of x's dtype
            direct = not torch.is_autocast_enabled(xm.device.type)

            def products(out):
                for s, (dh, W) in enumerate(zip(dhs, weights)):
                    if direct and W.dtype == out.dtype:
                        torch.mm(dh, W, out=out[s])
                    else:  # the fp32 router of half-precision x, or autocast
                        out[s].copy_(dh @ W)
                return out

            if dropped.dtype == torch.bool:
                dxm = torch.where(dropped, products(torch.empty_like(xm)), 0.0)
            else:
                dxm = _zeroed_at(xm.shape, xm.dtype, dropped, products)
            dx = dxm[0] if len(weights) == 1 else dxm.sum(0, dtype=compute_dtype(xm)).to(xm.dtype)
        dWs = [dh.T @ xm[s].to(W.dtype) if ctx.needs_input_grad[3 + s] else None
               for s, (dh, W) in enumerate(zip(dhs, weights))]
        return (dx, None, None, *dWs)


def _zeroed_at(shape, dtype, positions, fill):
    """A new tensor of `shape`, filled by fill(out), with the `native_drop_positions` set to zero (positions count
    from 1, so the flat tensor has a spare element at each end; the last one takes the unused slots)."""
    flat = torch.empty(math.prod(shape) + 2, dtype=dtype, device=positions.device)
    out = flat[1:-1].view(shape)
    fill(out)
    flat.index_fill_(0, positions, 0)
    return out


def _shrink(x, weights, streams, dtypes, dropout_p, seed, dropout_rng) -> List[torch.Tensor]:
    """[drop_s(x) W_s^T in dtypes[i]] for the i-th weight W_s and its dropout stream s."""
    if dropout_p == 0.0:  # every stream reads x itself: one GEMM per compute dtype
        out = [None] * len(weights)
        for dt in dict.fromkeys(dtypes):
            picked = [i for i, d in enumerate(dtypes) if d == dt]
            stacked = torch.cat([weights[i].to(dt) for i in picked])
            parts = (x.to(dt) @ stacked.T).split([weights[i].shape[0] for i in picked], dim=1)
            for i, part in zip(picked, parts):
                out[i] = part
        return out
    dropped = group_dropped(tuple(x.shape), dropout_p, seed, streams, x.device, dropout_rng)
    return list(_DroppedShrink.apply(x, dropped, 1.0 / (1.0 - dropout_p),
                                     *(W.to(dt) for W, dt in zip(weights, dtypes))))


def _expand(operand, B, scaling, base, reuse_base):
    """base + s * operand B^T; written into base's storage when reuse_base; the delta alone without a base."""
    dt = operand.dtype
    if base is None:
        return operand @ (scaling * B.to(dt)).T
    if base.dtype != dt:  # mixed dtypes: the delta in the activations' dtype, added in the base's
        delta = (operand @ (scaling * B.to(dt)).T).to(base.dtype)
        return base.add_(delta) if reuse_base else base + delta
    if reuse_base:
        return base.addmm_(operand, B.to(dt).T, alpha=scaling)
    return torch.addmm(base, operand, B.to(dt).T, alpha=scaling)


def lora(x, A, B, scaling, *, dropout_p=0.0, seed=0, dropout_rng="philox", base=None, reuse_base=False):
    (h,) = _shrink(x, [A], [member_stream(0)], [x.dtype], dropout_p, seed, dropout_rng)
    return _expand(h, B, scaling, base, reuse_base)


def route(logits, *, task_probs=None, alpha=None, kind="token", top_k=None, renorm="softmax", num_tokens=None,
          rule=None, token_mask=None, selection_bias=None):
    return routing(logits, task_probs=task_probs, alpha=alpha, kind=kind, top_k=top_k, renorm=renorm,
                   num_tokens=num_tokens, rule=rule, token_mask=token_mask, selection_bias=selection_bias)[:2]


def routing(logits, *, task_probs=None, alpha=None, kind="token", top_k=None, renorm="softmax", num_tokens=None,
            rule=None, token_mask=None, selection_bias=None):
    """(p_tok, gates, routed_counts, kept_counts); the counts are None under the default rule."""
    p_tok = None
    if logits is not None:
        z = logits.to(compute_dtype(logits))
        p_tok = torch.sigmoid(z) if isinstance(rule, RankWise) else torch.softmax(z, dim=-1)
        num_tokens = logits.shape[0]
    if kind == "token":
        p = p_tok
    else:
        p_task = task_probs.to(compute_dtype(task_probs))
        # expand, not index: the task probabilities are per sequence, broadcast over its tokens
        p_task = p_task.repeat_interleave(num_tokens // task_probs.shape[0], dim=0)
        if kind == "task":
            p = p_task
        else:
            a = torch.sigmoid(alpha.reshape(()).to(p_task.dtype))
            p = torch.lerp(p_tok.to(p_task.dtype), p_task, a)
    if rule is None:
        return p_tok, _gates(p, top_k, renorm), None, None
    real = torch.ones(num_tokens, dtype=torch.bool, device=p.device) if token_mask is None \
        else token_mask.reshape(-1) != 0
    if isinstance(rule, Switch):
        num_sequences = 1 if token_mask is None else token_mask.shape[0]
        return (p_tok, *_switch_gates(p, rule.capacity, real, num_sequences))
    gates, keep = _top_p_gates(p, rule) if isinstance(rule, TopP) else _rank_wise_gates(p, selection_bias, rule.top_k)
    counts = (keep & real[:, None]).sum(0)
    return p_tok, gates, counts, counts


def _expert_order(p):
    """Experts of each row by the selection rule of every backend: a stable descending sort puts NaN first and keeps
    equal values (NaN and NaN too) in expert order; torch.topk leaves the order of ties unspecified."""
    return torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices


def _gates(p, top_k, renorm):
    if top_k is None:
        return p
    idx = _expert_order(p)[:, :top_k]
    vals = p.gather(-1, idx)
    weights = torch.softmax(vals, dim=-1) if renorm == "softmax" else vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(p).scatter(-1, idx, weights)


def _switch_gates(p, capacity, real, num_sequences):
    """(gates, routed, kept): top-1 with gate p[e*]; under a capacity a real token keeps e* while its priority, the
    running count of its sequence's real tokens that chose e* (itself included, in position order), is <= C."""
    T, E = p.shape
    choice = _expert_order(p)[:, :1]
    chosen = torch.zeros(T, E, dtype=torch.bool, device=p.device).scatter(-1, choice, True) & real[:, None]
    keep = torch.ones(T, dtype=torch.bool, device=p.device)
    if capacity is not None:
        priority = chosen.view(num_sequences, T // num_sequences, E).cumsum(1).view(T, E).gather(-1, choice)
        keep = real & (priority.squeeze(-1) <= capacity)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    gates = torch.zeros_like(p).scatter(-1, choice, torch.where(keep[:, None], p.gather(-1, choice), zero))
    return gates, chosen.sum(0), (chosen & keep[:, None]).sum(0)


def _rank_wise_gates(scores, selection_bias, k):
    """(gates, selected): the top-k of v = s + b, gates k * v_i / sum of the selected v (the bias is a constant)."""
    v = scores + selection_bias.detach().to(scores.dtype)
    idx = _expert_order(v)[:, :k]
    vals = v.gather(-1, idx)
    gates = torch.zeros_like(v).scatter(-1, idx, k * vals / vals.sum(-1, keepdim=True))
    return gates, torch.zeros_like(v, dtype=torch.bool).scatter(-1, idx, True)


def _top_p_gates(p, rule):
    """(gates p * keep, keep): DynMoLE's selection. The running sum goes expert by expert in the order of the sort,
    so it rounds exactly as the reference's does."""
    T, E = p.shape
    order = _expert_order(p)
    ordered = p.detach().gather(-1, order)
    top_p = torch.tensor(rule.top_p, dtype=p.dtype, device=p.device)
    running = torch.zeros(T, dtype=p.dtype, device=p.device)
    keep_ordered = torch.empty(T, E, dtype=torch.bool, device=p.device)
    for j in range(E):
        running = running + ordered[:, j]
        keep_ordered[:, j] = running <= top_p
    keep_ordered[:, :rule.keep_top_k] = True
    keep = torch.zeros_like(keep_ordered).scatter(-1, order, keep_ordered)
    if rule.entropy_threshold < 1:
        h = tsallis_entropy(p.detach(), rule.entropy_index, rule.entropy_eps)
        keep = keep | (h > torch.tensor(rule.entropy_threshold, dtype=p.dtype, device=p.device))[:, None]
    return torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device)), keep  # 0, not NaN * 0, if unkept


def routed_group(
    x, members_A: Sequence[torch.Tensor], members_B: Sequence[torch.Tensor], scaling, *, shape,
    router_weight=None, router_bias=None, router_logits=None, task_probs=None, alpha=None,
    kind="token", top_k=None, renorm="softmax", dropout_p=0.0, seed=0, dropout_rng="philox", bases=None,
    reuse_bases=False, rule=None, token_mask=None, selection_bias=None,
) -> GroupOutput:
    T = x.shape[0]
    E, r = shape.num_experts, shape.rank
    members = len(members_A)
    router_in = kind != "task" and router_logits is None  # the router's Linear runs here, on drop_r(x)
    rt = compute_dtype(x)
    ranks = _shrink(
        x, ([router_weight] if router_in else []) + list(members_A),
        ([ROUTER_STREAM] if router_in else []) + [member_stream(m) for m in range(members)],
        ([rt] if router_in else []) + [x.dtype] * members, dropout_p, seed, dropout_rng,
    )
    logits = router_logits
    if router_in:
        logits = ranks.pop(0)
        if router_bias is not None:
            logits = logits + router_bias.to(rt)
    p_tok, gates, routed, kept = routing(
        logits, task_probs=task_probs, alpha=alpha, kind=kind, top_k=top_k, renorm=renorm, num_tokens=T, rule=rule,
        token_mask=token_mask, selection_bias=selection_bias)
    outputs = []
    for m, (h, B) in enumerate(zip(ranks, members_B)):
        h = h.unsqueeze(1) if shape.hydra else h.unflatten(1, (E, r))  # (T, 1 or E, r)
        operand = (gates.unsqueeze(-1) * h).flatten(1).to(x.dtype)  # (T, E*r): each rank block times its gate
        outputs.append(_expand(operand, B, scaling, None if bases is None else bases[m], reuse_bases))
    return GroupOutput(outputs, logits, p_tok, gates, routed, kept)


def _flat_mask(p, mask):
    if mask is None:
        return torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
    return mask.reshape(-1).to(p.dtype)


def gjs_loss(p, gamma_c, gamma_b, mask=None):
    E = p.shape[-1]
    if E == 1:
        return p.new_zeros(())
    ln_e = torch.log(torch.tensor(float(E), dtype=p.dtype))
    p = p.reshape(-1, E)
    mask = _flat_mask(p, mask)
    n = mask.sum()
    balance = torch.clamp(entropy((mask @ p) / n), max=gamma_b * ln_e)
    certainty = (mask * torch.clamp(entropy(p), min=gamma_c * ln_e)).sum() / n
    return torch.relu((gamma_b - gamma_c) * ln_e - (balance - certainty)) / ln_e


def load_balancing_loss(p, gates, top_k=None, mask=None, frequencies="selected"):
    E = p.shape[-1]
    k = E if top_k is None else top_k
    p, gates = p.reshape(-1, E), gates.reshape(-1, E)
    mask = _flat_mask(p, mask)
    n = mask.sum()
    prop = (mask @ p) / n
    weight = (gates != 0).to(p.dtype) if frequencies == "selected" else gates.to(p.dtype)
    freq = (mask @ weight) / n / k
    return E * (prop * freq).sum()


def router_z_loss(logits, mask=None):
    logits = logits.reshape(-1, logits.shape[-1])
    z = torch.logsumexp(logits, dim=-1) ** 2
    mask = _flat_mask(z.unsqueeze(-1), mask)
    return (z * mask).sum() / mask.sum()
