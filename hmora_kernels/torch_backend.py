"""Vectorised dense-gated PyTorch: the fast path on machines without a GPU.

No Python loop over experts and no (T, d_out) tensor per expert: each member is two skinny GEMMs,
h = drop_m(x) A^T and y = s * (g (x) h) B^T, with the gates broadcast over each expert's rank block.
Routing is computed in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .dropout import ROUTER_STREAM, apply_dropout, member_stream
from .reference import compute_dtype, entropy, sequence_index
from .types import GroupOutput


def lora(x, A, B, scaling, *, dropout_p=0.0, seed=0, base=None):
    xd = apply_dropout(x, dropout_p, seed, member_stream(0))
    delta = (xd @ A.to(x.dtype).T) @ (scaling * B.to(x.dtype)).T
    return delta if base is None else base + delta.to(base.dtype)


def route(logits, *, task_probs=None, alpha=None, kind="token", top_k=None, renorm="softmax", num_tokens=None):
    p_tok = None
    if logits is not None:
        p_tok = torch.softmax(logits.to(compute_dtype(logits)), dim=-1)
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
    return p_tok, _gates(p, top_k, renorm)


def _gates(p, top_k, renorm):
    if top_k is None:
        return p
    # the selection rule of every backend: a stable descending sort puts NaN first and keeps equal values (NaN and
    # NaN too) in expert order; torch.topk leaves the order of ties unspecified
    idx = torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    vals = p.gather(-1, idx)
    weights = torch.softmax(vals, dim=-1) if renorm == "softmax" else vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(p).scatter(-1, idx, weights)


def routed_group(
    x, members_A: Sequence[torch.Tensor], members_B: Sequence[torch.Tensor], scaling, *, shape,
    router_weight=None, router_bias=None, router_logits=None, task_probs=None, alpha=None,
    kind="token", top_k=None, renorm="softmax", dropout_p=0.0, seed=0, bases=None,
) -> GroupOutput:
    T = x.shape[0]
    E, r = shape.num_experts, shape.rank
    logits = router_logits
    if kind != "task" and router_logits is None:
        rt = compute_dtype(x)
        xr = apply_dropout(x, dropout_p, seed, ROUTER_STREAM).to(rt)
        bias = None if router_bias is None else router_bias.to(rt)
        logits = torch.nn.functional.linear(xr, router_weight.to(rt), bias)
    p_tok, gates = route(logits, task_probs=task_probs, alpha=alpha, kind=kind, top_k=top_k, renorm=renorm,
                         num_tokens=T)
    outputs = []
    for m, (A, B) in enumerate(zip(members_A, members_B)):
        xd = apply_dropout(x, dropout_p, seed, member_stream(m))
        h = xd @ A.to(x.dtype).T  # (T, E*r), Hydra: (T, r)
        h = h.unsqueeze(1) if shape.hydra else h.view(T, E, r)
        gated = (gates.unsqueeze(-1) * h).reshape(T, E * r).to(x.dtype)
        delta = gated @ (scaling * B.to(x.dtype)).T
        base = None if bases is None else bases[m]
        outputs.append(delta if base is None else base + delta.to(base.dtype))
    return GroupOutput(outputs, logits, p_tok, gates)


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


def load_balancing_loss(p, gates, top_k=None, mask=None):
    E = p.shape[-1]
    k = E if top_k is None else top_k
    p, gates = p.reshape(-1, E), gates.reshape(-1, E)
    mask = _flat_mask(p, mask)
    n = mask.sum()
    prop = (mask @ p) / n
    freq = (mask @ (gates != 0).to(p.dtype)) / n / k
    return E * (prop * freq).sum()


def router_z_loss(logits, mask=None):
    logits = logits.reshape(-1, logits.shape[-1])
    z = torch.logsumexp(logits, dim=-1) ** 2
    mask = _flat_mask(z.unsqueeze(-1), mask)
    return (z * mask).sum() / mask.sum()
