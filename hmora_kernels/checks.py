"""Input validation shared by every public op: errors say what was expected, what came, and what to do."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .dropout import DROPOUT_RNGS
from .types import ROUTING_RULES, RankWise, Switch, TopP

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ROUTING_KINDS = ("token", "task", "hybrid")
RENORMS = ("softmax", "sum")


def _shape(t: torch.Tensor) -> str:
    return f"({', '.join(str(s) for s in t.shape)})"


def check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {_shape(t)} ({t.dim()}-D)")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name}: unsupported dtype {t.dtype}; expected one of float16, bfloat16, float32, float64 "
            f"(cast it with .to(torch.float32))"
        )


def check_same_device(**tensors) -> None:
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}; move them with .to(device)")


def check_dropout(p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {p!r}")


def check_dropout_rng_and_seed(dropout_rng: str, seed, x: torch.Tensor) -> None:
    if dropout_rng not in DROPOUT_RNGS:
        raise ValueError(f"dropout_rng: expected one of {DROPOUT_RNGS}, got {dropout_rng!r}")
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
            raise ValueError(
                f"seed: expected a Python int or a 1-element int64 tensor on {x.device}, got a {seed.dtype} tensor "
                f"of shape {_shape(seed)} on {seed.device}; draw one with torch.randint(0, 2**31 - 1, (1,), "
                f"device=x.device)")
    elif not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed: expected a Python int or a 1-element int64 tensor, got {type(seed).__name__}")


def plain_seed(seed):
    """A tensor seed as it is (reading it would wait for the device), an int as an int."""
    return seed if isinstance(seed, torch.Tensor) else int(seed)


def check_scaling(scaling) -> None:
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise ValueError(f"scaling: expected a Python float (e.g. lora_alpha / sqrt(r)), got {type(scaling).__name__}")


def check_base(name: str, base, x: torch.Tensor, d_out: int) -> None:
    if base is None:
        return
    check_tensor(name, base, 2)
    if tuple(base.shape) != (x.shape[0], d_out):
        raise ValueError(
            f"{name}: expected shape ({x.shape[0]}, {d_out}) to match x {_shape(x)} and the adapter's d_out, "
            f"got {_shape(base)}"
        )


def check_lora(x, A, B, scaling, dropout_p, base) -> None:
    check_tensor("x", x, 2)
    check_tensor("A", A, 2)
    check_tensor("B", B, 2)
    check_same_device(x=x, A=A, B=B, base=base)
    if A.shape[0] < 1:
        raise ValueError(f"A: rank r must be >= 1, got A of shape {_shape(A)}")
    if A.shape[1] != x.shape[1]:
        raise ValueError(f"A {_shape(A)} must have d_in = x.shape[1] = {x.shape[1]} columns (x is {_shape(x)})")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"B {_shape(B)} must have r = {A.shape[0]} columns to match A {_shape(A)}")
    check_scaling(scaling)
    check_dropout(dropout_p)
    check_base("base", base, x, B.shape[0])


def check_routing_args(kind: str, top_k: Optional[int], renorm: str, num_experts: int) -> None:
    if kind not in ROUTING_KINDS:
        raise ValueError(f"kind: expected one of {ROUTING_KINDS}, got {kind!r}")
    if renorm not in RENORMS:
        raise ValueError(f"renorm: expected one of {RENORMS}, got {renorm!r}")
    if num_experts < 1:
        raise ValueError(f"number of experts E must be >= 1, got E = {num_experts}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= num_experts):
        raise ValueError(f"top_k: expected an integer in [1, E = {num_experts}] or None for soft routing, got {top_k!r}")


def check_task_inputs(kind: str, num_tokens: int, num_experts: int, task_probs, alpha) -> None:
    if kind in ("task", "hybrid"):
        if task_probs is None:
            raise ValueError(f"kind={kind!r} needs task_probs of shape (num_sequences, E = {num_experts}), got None")
        check_tensor("task_probs", task_probs, 2)
        if task_probs.shape[1] != num_experts:
            raise ValueError(f"task_probs {_shape(task_probs)} must have E = {num_experts} columns")
        n_seq = task_probs.shape[0]
        if n_seq < 1 or num_tokens % n_seq != 0:
            raise ValueError(
                f"task_probs has {n_seq} sequences but there are {num_tokens} tokens; tokens must be "
                f"num_sequences x seq_len, flattened sequence-major"
            )
    if kind == "hybrid":
        if not isinstance(alpha, torch.Tensor) or alpha.numel() != 1:
            got = _shape(alpha) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
            raise ValueError(f"kind='hybrid' needs alpha as a 1-element tensor (pre-sigmoid), got {got}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value, ok: Callable[[float], bool], expected: str) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and ok(value)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def check_entropy_args(entropy_index, entropy_eps, prefix: str = "") -> None:
    _check_number(f"{prefix}entropy_index", entropy_index, lambda q: 0 < q <= 2,
                  "a Tsallis index q in (0, 2] (1: Shannon)")
    _check_number(f"{prefix}entropy_eps", entropy_eps, lambda eps: eps >= 0, "a number >= 0")


def check_rule(rule, kind: str, top_k, num_experts: int, num_tokens: int, token_mask, selection_bias,
               task_probs) -> None:
    """The routing rule and its inputs: token_mask (num_sequences, seq_len) and RankWise's selection_bias (E,)."""
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor) or token_mask.dim() != 2 or token_mask.numel() != num_tokens:
            got = _shape(token_mask) if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
            raise ValueError(f"token_mask: expected (num_sequences, seq_len) with num_sequences * seq_len = T = "
                             f"{num_tokens} (1 = real token, 0 = padding), got {got}")
        if token_mask.is_complex():
            raise ValueError(f"token_mask: expected a bool, integer or float tensor, got {token_mask.dtype}")
        if task_probs is not None and task_probs.shape[0] != token_mask.shape[0]:
            raise ValueError(f"token_mask {_shape(token_mask)} and task_probs {_shape(task_probs)} must have one row "
                             f"per sequence each")
    if selection_bias is not None and not isinstance(rule, RankWise):
        raise ValueError(f"selection_bias is an input of rule=RankWise(...) only, got it with rule={rule}; drop it")
    if rule is None:
        return
    if not isinstance(rule, ROUTING_RULES):
        raise ValueError(f"rule: expected None (soft or top-k routing) or one of Switch, TopP, RankWise from "
                         f"hmora_kernels, got {rule!r}")
    if top_k is not None:
        raise ValueError(f"top_k={top_k!r} belongs to the default rule; rule={rule} picks its own experts: "
                         f"pass top_k=None")
    if isinstance(rule, Switch):
        if rule.capacity is not None:
            if not (_is_int(rule.capacity) and rule.capacity >= 1):
                raise ValueError(f"Switch.capacity: expected None or an integer >= 1, got {rule.capacity!r}")
            if token_mask is None:
                raise ValueError("Switch(capacity=...) counts per sequence: give token_mask (num_sequences, "
                                 "seq_len), 1 for real tokens, 0 for padding")
    elif isinstance(rule, TopP):
        _check_number("TopP.top_p", rule.top_p, lambda v: 0 < v <= 1, "a value in (0, 1]")
        if not (_is_int(rule.keep_top_k) and 1 <= rule.keep_top_k <= num_experts):
            raise ValueError(f"TopP.keep_top_k: expected an integer in [1, E = {num_experts}], "
                             f"got {rule.keep_top_k!r}")
        _check_number("TopP.entropy_threshold", rule.entropy_threshold, lambda v: v > 0,
                      "a number > 0 (>= 1 turns the all-experts broadcast off)")
        check_entropy_args(rule.entropy_index, rule.entropy_eps, "TopP.")
    else:
        if not (_is_int(rule.top_k) and 1 <= rule.top_k <= num_experts):
            raise ValueError(f"RankWise.top_k: expected an integer in [1, E = {num_experts}], got {rule.top_k!r}")
        if kind != "token":
            raise ValueError(f"RankWise routes on sigmoid scores, which do not mix with task probabilities: "
                             f"expected kind='token', got kind={kind!r}")
        if selection_bias is None:
            raise ValueError(f"RankWise needs selection_bias of shape (E = {num_experts},) (zeros to start), got None")
        check_tensor("selection_bias", selection_bias, 1)
        if selection_bias.shape[0] != num_experts:
            raise ValueError(f"selection_bias {_shape(selection_bias)} must have E = {num_experts} entries")


@dataclass(frozen=True)
class GroupShape:
    """What a routed group's tensors imply: E experts of rank r, Hydra or not."""

    num_experts: int
    rank: int
    hydra: bool


def check_routed_group(
    x, members_A: Sequence, members_B: Sequence, scaling, router_weight, router_bias, router_logits,
    task_probs, alpha, kind, top_k, renorm, dropout_p, bases, rule=None, token_mask=None, selection_bias=None,
) -> GroupShape:
    check_tensor("x", x, 2)
    if len(members_A) < 1 or len(members_A) != len(members_B):
        raise ValueError(
            f"members_A and members_B: expected the same number (>= 1) of A and B matrices, "
            f"got {len(members_A)} and {len(members_B)}"
        )
    if kind not in ROUTING_KINDS:
        raise ValueError(f"kind: expected one of {ROUTING_KINDS}, got {kind!r}")
    if kind == "task":
        if task_probs is None:
            raise ValueError("kind='task' needs task_probs of shape (num_sequences, E), got None")
        check_tensor("task_probs", task_probs, 2)
        num_experts = task_probs.shape[1]
    elif router_logits is not None:
        check_tensor("router_logits", router_logits, 2)
        if router_logits.shape[0] != x.shape[0]:
            raise ValueError(f"router_logits {_shape(router_logits)} must have one row per token of x {_shape(x)}")
        num_experts = router_logits.shape[1]
    else:
        if router_weight is None:
            raise ValueError(f"kind={kind!r} needs router_weight (E, d_in) or router_logits (T, E), got neither")
        check_tensor("router_weight", router_weight, 2)
        if router_weight.shape[1] != x.shape[1]:
            raise ValueError(
                f"router_weight {_shape(router_weight)} must have d_in = {x.shape[1]} columns to match x {_shape(x)}"
            )
        num_experts = router_weight.shape[0]
        if router_bias is not None:
            check_tensor("router_bias", router_bias, 1)
            if router_bias.shape[0] != num_experts:
                raise ValueError(f"router_bias {_shape(router_bias)} must have E = {num_experts} entries")
    if num_experts < 1:
        raise ValueError(f"number of experts E must be >= 1, got E = {num_experts}")
    check_routing_args(kind, top_k, renorm, num_experts)
    check_task_inputs(kind, x.shape[0], num_experts, task_probs, alpha)
    check_rule(rule, kind, top_k, num_experts, x.shape[0], token_mask, selection_bias, task_probs)

    rank = None
    hydra = None
    for m, (A, B) in enumerate(zip(members_A, members_B)):
        check_tensor(f"members_A[{m}]", A, 2)
        check_tensor(f"members_B[{m}]", B, 2)
        if A.shape[1] != x.shape[1]:
            raise ValueError(f"members_A[{m}] {_shape(A)} must have d_in = {x.shape[1]} columns to match x {_shape(x)}")
        if B.shape[1] % num_experts != 0 or B.shape[1] == 0:
            raise ValueError(
                f"members_B[{m}] {_shape(B)} must have E*r columns with E = {num_experts} and r >= 1 "
                f"(expert e owns columns e*r .. (e+1)*r)"
            )
        r = B.shape[1] // num_experts
        if A.shape[0] == B.shape[1]:
            member_hydra = False
        elif A.shape[0] == r:
            member_hydra = True
        else:
            raise ValueError(
                f"members_A[{m}] {_shape(A)} must have E*r = {B.shape[1]} rows (one A per expert) or r = {r} rows "
                f"(Hydra: one A shared by all experts), to match members_B[{m}] {_shape(B)}"
            )
        if num_experts == 1:
            member_hydra = False  # with one expert both layouts are the same matrix
        if rank is not None and (r, member_hydra) != (rank, hydra):
            raise ValueError(
                f"all members of a group need the same rank and layout: member 0 has r = {rank}, hydra = {hydra}; "
                f"member {m} has r = {r}, hydra = {member_hydra}"
            )
        rank, hydra = r, member_hydra
        if bases is not None:
            check_base(f"bases[{m}]", bases[m], x, B.shape[0])
    if hydra and isinstance(rule, RankWise):
        raise ValueError("RankWise experts are ranks of one LoRA: give each member A (E*r, d_in), one row block per "
                         "expert, not a Hydra A (r, d_in) shared by all")
    if bases is not None and len(bases) != len(members_A):
        raise ValueError(f"bases: expected one base output per member ({len(members_A)}), got {len(bases)}")
    check_scaling(scaling)
    check_dropout(dropout_p)
    check_same_device(
        x=x, router_weight=router_weight, router_bias=router_bias, router_logits=router_logits,
        task_probs=task_probs, alpha=alpha, token_mask=token_mask, selection_bias=selection_bias,
        **{f"members_A[{m}]": A for m, A in enumerate(members_A)},
        **{f"members_B[{m}]": B for m, B in enumerate(members_B)},
        **({f"bases[{m}]": b for m, b in enumerate(bases)} if bases is not None else {}),
    )
    return GroupShape(num_experts=num_experts, rank=rank, hydra=hydra)


def check_probs(name: str, p, mask) -> None:
    if not isinstance(p, torch.Tensor) or p.dim() < 2:
        got = _shape(p) if isinstance(p, torch.Tensor) else type(p).__name__
        raise ValueError(f"{name}: expected probabilities of shape (..., E), got {got}")
    check_tensor(name, p, p.dim())
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(p.shape[:-1]):
            got = _shape(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected shape {tuple(p.shape[:-1])} ({name}'s shape without E), got {got}")
        check_same_device(**{name: p, "mask": mask})


def check_gammas(gamma_c: float, gamma_b: float) -> None:
    if not (0.0 <= gamma_c <= 1.0 and 0.0 <= gamma_b <= 1.0):
        raise ValueError(f"gamma_c and gamma_b must lie in [0, 1], got gamma_c = {gamma_c}, gamma_b = {gamma_b}")
