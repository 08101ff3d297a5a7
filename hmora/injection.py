"""Injection of HMoRA layers into a transformers causal LM by module name (SPEC 1, 3.3, 3.5)."""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Tuple

from torch import nn

from .config import FAMILY_FIELDS, MODEL_FAMILIES, HMoRAConfig
from .context import RoutingState
from .layers import ExpertLinear, LoRALinear, RoutedGroup
from .routers import Router

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def complete_config(base_model: nn.Module, config: HMoRAConfig) -> None:
    """Fill the base-model-dependent fields of `config` (family defaults, sizes) and check they fit."""
    base_config = base_model.config
    model_type = getattr(base_config, "model_type", None)
    if config.model_type is not None and config.model_type != model_type:
        raise ValueError(f"the adapter is for model_type {config.model_type!r} but the base model is "
                         f"{model_type!r}; load it onto a {config.model_type} model")
    hidden = base_model.get_input_embeddings().weight.shape[1]
    if config.hidden_size is not None and config.hidden_size != hidden:
        raise ValueError(f"the adapter is for hidden_size {config.hidden_size} but the base model has {hidden}; "
                         f"load it onto the base model it was trained on")
    family = MODEL_FAMILIES.get(model_type, {})
    for name in FAMILY_FIELDS:
        if getattr(config, name) is None:
            if name not in family:
                raise ValueError(
                    f"HMoRAConfig.{name} is unset and model_type {model_type!r} has no built-in default "
                    f"(built in: {sorted(MODEL_FAMILIES)}); give {', '.join(FAMILY_FIELDS)}")
            setattr(config, name, list(family[name]))
    config.model_type, config.hidden_size = model_type, hidden
    # as the reference: the last decoder layer's index, or a larger configured value
    config.max_llm_layer = max(config.max_llm_layer or 0, base_config.num_hidden_layers - 1)
    config.validate()


def _layer_index(name: str) -> int:
    found = _LAYER_INDEX.search(f".{name}.")
    if found is None:
        raise ValueError(f"target module {name!r} is not inside a numbered decoder layer; only decoder-layer "
                         f"Linears can be adapted (the layer index sets its routing kind)")
    return int(found.group(1))


def _group_key(name: str, config: HMoRAConfig) -> Tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    if config.share_router_for_qkv and leaf in config.qkv_modules:
        return parent, "qkv"
    if config.share_router_for_w_i and leaf in config.w_i_modules:
        return parent, "w_i"
    return parent, leaf


def _member_order(name: str, config: HMoRAConfig) -> int:
    """The owner of a shared router is the first of its family list (q_proj, gate_proj)."""
    leaf = name.rpartition(".")[2]
    for family in (config.qkv_modules, config.w_i_modules):
        if leaf in family:
            return family.index(leaf)
    return 0


def find_targets(base_model: nn.Module, config: HMoRAConfig) -> List[str]:
    linears = [name for name, module in base_model.named_modules() if isinstance(module, nn.Linear)]
    leaves = {name.rpartition(".")[2] for name in linears}
    unknown = sorted(set(config.target_modules) - leaves)
    if unknown:
        raise ValueError(f"target modules {unknown} match no nn.Linear of this {config.model_type} model; "
                         f"its Linear names are {sorted(leaves)}")
    return [name for name in linears if name.rpartition(".")[2] in config.target_modules]


def inject(base_model: nn.Module, config: HMoRAConfig, state: RoutingState, task_dim: int) -> List[RoutedGroup]:
    """Replace every target Linear by a LoRALinear or ExpertLinear; returns the routed groups in model order."""
    complete_config(base_model, config)
    targets = find_targets(base_model, config)
    groups: Dict[Tuple[str, str], List[str]] = OrderedDict()
    for name in targets:
        if name.rpartition(".")[2] in config.target_modules_lora:
            _replace(base_model, name, LoRALinear(base_model.get_submodule(name), config, state))
        else:
            groups.setdefault(_group_key(name, config), []).append(name)
    routed = []
    for names in groups.values():
        names = sorted(names, key=lambda n: _member_order(n, config))
        layer = _layer_index(names[0])
        kind = config.layer_kind(layer)
        owner_base = base_model.get_submodule(names[0])
        router = Router(kind, owner_base.in_features, task_dim, config.router_experts, config.num_router_mlp_layers,
                        config.router_hidden_dim, config.alpha_raw(layer), device=owner_base.weight.device,
                        bias=config.router_bias, init_std=config.router_init_std, jitter=config.router_jitter,
                        selection_bias=config.routing_variant == "rank_wise")
        members = []
        for i, name in enumerate(names):
            member = ExpertLinear(base_model.get_submodule(name), config, state, router if i == 0 else None)
            _replace(base_model, name, member)
            members.append(member)
        routed.append(RoutedGroup(names[0], members, config, state))
    return routed


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
