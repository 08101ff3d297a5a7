"""Public ops: validate, pick a backend, call it. Every op has the same signature in every backend."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import checks
from .dispatch import module_for, resolve
from .dropout import Seed
from .types import GroupOutput, RankWise, Switch, TopP

RoutingRule = Union[Switch, TopP, RankWise]
FREQUENCIES = ("selected", "gate_values")


def lora(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, *,
    dropout_p: float = 0.0, seed: Seed = 0, dropout_rng: str = "philox", base: Optional[torch.Tensor] = None,
    reuse_base: bool = False, backend: str = "auto",
) -> torch.Tensor:
    """Plain LoRA: base + s * (drop(x) A^T) B^T.

    x (T, d_in); A (r, d_in); B (d_out, r); base (T, d_out) or None (then the delta alone is returned).
    Dropout: stream 1 of `seed` (an int or a 1-element int64 tensor on x's device), drawn by `dropout_rng`
    ("philox": the same mask in every backend; "native": each backend's fastest generator; see
    `hmora_kernels.dropout`). reuse_base=True allows the op to write the output into base's storage (the torch
    backend does; the caller must not read base afterwards), sparing a new (T, d_out) tensor.
    """
    checks.check_lora(x, A, B, scaling, dropout_p, base)
    checks.check_dropout_rng_and_seed(dropout_rng, seed, x)
    impl = module_for(resolve(backend, x.device))
    return impl.lora(x, A, B, float(scaling), dropout_p=float(dropout_p), seed=checks.plain_seed(seed),
                     dropout_rng=dropout_rng, base=base, reuse_base=bool(reuse_base))


def route(
    logits: Optional[torch.Tensor], *, task_probs: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None, kind: str = "token", top_k: Optional[int] = None,
    renorm: str = "softmax", num_tokens: Optional[int] = None, rule: Optional[RoutingRule] = None,
    token_mask: Optional[torch.Tensor] = None, selection_bias: Optional[torch.Tensor] = None, backend: str = "auto",
):
    """(p_tok, gates) from router logits (T, E), in fp32.

    kind "token": p = softmax(logits); "task": p = task_probs broadcast to each sequence's tokens;
    "hybrid": p = (1 - sigmoid(alpha)) softmax(logits) + sigmoid(alpha) task_probs.
    task_probs (num_sequences, E): token t belongs to sequence t // (T / num_sequences).
    rule None (SPEC 3.4): top_k None: gates = p; else the top-k of p renormalised by softmax over the selected
    probabilities (renorm "softmax", the reference implementation's rule) or by their sum ("sum").
    Selection, the same in every backend: experts ordered by p descending, NaN above every number, equal values
    (NaN and NaN too) by the lowest expert index; the first k. A row with a NaN gets NaN gates exactly at its
    selected experts (0 elsewhere).
    rule Switch / TopP / RankWise (hmora_kernels.types; top_k must be None): that rule's gates, with the same order
    among experts. token_mask (num_sequences, seq_len), tokens flattened sequence-major, 1 = real: Switch's capacity
    counts the real tokens of each sequence. RankWise: p_tok are the sigmoid scores and selection_bias (E,) is
    added to them for the selection and the gates (no gradient).
    For kind "task" logits may be None; then num_tokens gives T.
    """
    if logits is not None:
        checks.check_tensor("logits", logits, 2)
        num_tokens, num_experts, device = logits.shape[0], logits.shape[1], logits.device
    else:
        if kind != "task":
            raise ValueError(f"kind={kind!r} needs router logits (T, E), got None")
        if task_probs is None or num_tokens is None:
            raise ValueError("kind='task' without logits needs task_probs and num_tokens")
        checks.check_tensor("task_probs", task_probs, 2)
        num_experts, device = task_probs.shape[1], task_probs.device
    checks.check_routing_args(kind, top_k, renorm, num_experts)
    checks.check_task_inputs(kind, num_tokens, num_experts, task_probs, alpha)
    checks.check_rule(rule, kind, top_k, num_experts, num_tokens, token_mask, selection_bias, task_probs)
    checks.check_same_device(logits=logits, task_probs=task_probs, alpha=alpha, token_mask=token_mask,
                             selection_bias=selection_bias)
    impl = module_for(resolve(backend, device))
    return impl.route(logits, task_probs=task_probs, alpha=alpha, kind=kind, top_k=top_k, renorm=renorm,
                      num_tokens=num_tokens, rule=rule, token_mask=token_mask, selection_bias=selection_bias)


def routed_group(
    x: torch.Tensor, members_A: Sequence[torch.Tensor], members_B: Sequence[torch.Tensor], scaling: float, *,
    router_weight: Optional[torch.Tensor] = None, router_bias: Optional[torch.Tensor] = None,
    router_logits: Optional[torch.Tensor] = None, task_probs: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None, kind: str = "token", top_k: Optional[int] = None,
    renorm: str = "softmax", dropout_p: float = 0.0, seed: Seed = 0, dropout_rng: str = "philox",
    bases: Optional[Sequence[torch.Tensor]] = None, reuse_bases: bool = False, rule: Optional[RoutingRule] = None,
    token_mask: Optional[torch.Tensor] = None, selection_bias: Optional[torch.Tensor] = None, backend: str = "auto",
) -> GroupOutput:
    """One router, several LoRA-expert members sharing the input x (q/k/v or gate/up).

    y_m = base_m + s * sum_e g_e (drop_m(x) A_{m,e}^T) B_{m,e}^T, with g = route(drop_r(x) W_r^T + b_r, ...).
    x (T, d_in). Member m: A (E*r, d_in), or (r, d_in) for Hydra (one A shared by the experts, inferred from
    the shape); B (d_out_m, E*r), expert e owning columns e*r .. (e+1)*r. E comes from the router weight
    (E, d_in), from router_logits (T, E) when a deeper router computed them, or from task_probs for kind "task".
    Dropout: router stream 0, member m stream m + 1 of `seed`; one independent mask each, drawn by `dropout_rng`
    (see `lora`). reuse_bases=True allows the op to write each output into its base's storage.
    rule, token_mask, selection_bias: as in `route` (RankWise: one A row block per expert, not Hydra).
    Returns GroupOutput(outputs, logits, p_tok, gates, routed_counts, kept_counts), the counts under a rule.
    """
    shape = checks.check_routed_group(
        x, members_A, members_B, scaling, router_weight, router_bias, router_logits, task_probs, alpha,
        kind, top_k, renorm, dropout_p, bases, rule, token_mask, selection_bias,
    )
    checks.check_dropout_rng_and_seed(dropout_rng, seed, x)
    impl = module_for(resolve(backend, x.device))
    return impl.routed_group(
        x, list(members_A), list(members_B), float(scaling), shape=shape, router_weight=router_weight,
        router_bias=router_bias, router_logits=router_logits, task_probs=task_probs, alpha=alpha, kind=kind,
        top_k=top_k, renorm=renorm, dropout_p=float(dropout_p), seed=checks.plain_seed(seed),
        dropout_rng=dropout_rng, bases=None if bases is None else list(bases), reuse_bases=bool(reuse_bases),
        rule=rule, token_mask=token_mask, selection_bias=selection_bias,
    )


def _loss_impl(backend: str, device: torch.device):
    # The losses read (T, E) tensors; the torch code already is one fused pass, so "triton" uses it too.
    name = resolve(backend, device)
    return module_for("reference" if name == "reference" else "torch")


def gjs_loss(
    p: torch.Tensor, gamma_c: float, gamma_b: float, mask: Optional[torch.Tensor] = None, *, backend: str = "auto",
) -> torch.Tensor:
    """Constrained generalised Jensen-Shannon loss of SPEC 4 on probabilities p (..., E) over the masked rows.

    relu((gamma_b - gamma_c) lnE - (min(H(mean p), gamma_b lnE) - mean max(H(p_n), gamma_c lnE))) / lnE.
    Token routers: p (B, S, E) with the attention mask (B, S). Task routers: p (B, E), mask None. E = 1 gives 0.
    """
    checks.check_probs("p", p, mask)
    checks.check_gammas(gamma_c, gamma_b)
    return _loss_impl(backend, p.device).gjs_loss(p, gamma_c, gamma_b, mask)


def load_balancing_loss(
    p: torch.Tensor, gates: torch.Tensor, top_k: Optional[int] = None, mask: Optional[torch.Tensor] = None, *,
    frequencies: str = "selected", backend: str = "auto",
) -> torch.Tensor:
    """E * sum_i prop_i freq_i / k: prop the masked mean of p; freq the masked fraction of tokens with gate_i != 0
    (frequencies "selected", no gradient) or the masked mean of gate_i ("gate_values", DynMoLE's, with gradient).

    top_k: the divisor k (None: E). The reference divides by its configured top_k also under soft routing, where
    every gate is non-zero; k is then any integer >= 1, not tied to E. The Switch / Mixtral / MixLoRA loss
    E * sum_i f_i P_i is k = 1."""
    checks.check_probs("p", p, mask)
    checks.check_probs("gates", gates, mask)
    if tuple(gates.shape) != tuple(p.shape):
        raise ValueError(f"gates {tuple(gates.shape)} must have the shape of p {tuple(p.shape)}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k: expected an integer >= 1 (the divisor of the frequencies) or None for E, "
                         f"got {top_k!r}")
    if frequencies not in FREQUENCIES:
        raise ValueError(f"frequencies: expected one of {FREQUENCIES}, got {frequencies!r}")
    return _loss_impl(backend, p.device).load_balancing_loss(p, gates, top_k, mask, frequencies)


def entropy_loss(
    p: torch.Tensor, entropy_index: float = 1.1, entropy_eps: float = 1e-5, mask: Optional[torch.Tensor] = None, *,
    backend: str = "auto",
) -> torch.Tensor:
    """DynMoLE's entropy loss: the masked mean over tokens of the normalised Tsallis entropy of p (..., E),
    (1 - sum_i (p_i + eps)^q) / (1 - E^(1-q)), q = entropy_index (q = 1: Shannon, -sum (p_i + eps) ln(p_i + eps) / ln E).
    E = 1 gives 0."""
    checks.check_probs("p", p, mask)
    checks.check_entropy_args(entropy_index, entropy_eps)
    return _loss_impl(backend, p.device).entropy_loss(p, entropy_index, entropy_eps, mask)


def router_z_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """Router z-loss: masked mean over tokens of logsumexp(logits)^2."""
    checks.check_probs("logits", logits, mask)
    return _loss_impl(backend, logits.device).router_z_loss(logits, mask)
