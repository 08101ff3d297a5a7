"""Importer of checkpoints written by the method's reference implementation (github:LiaoMengqi/HMoRA).

Its directory holds `config.json` (our field names) and `adapter_model.safetensors`, which is really a torch
pickle of {name: tensor}. Names map onto ours:
  X.mora.mora_a / X.lora.lora_a -> X.lora_A;   X.mora.mora_b / X.lora.lora_b -> X.lora_B
  X.router.mlp.<i>.*             -> X.router.token_mlp.<j>.*  (its k-th Linear -> our k-th Linear)
  X.router.task_router.mlp.<i>.* -> X.router.task_mlp.<j>.*
  X.router.alpha, task_encoder.* -> unchanged
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Dict

import torch

from .config import HMoRAConfig

REFERENCE_WEIGHTS = "adapter_model.safetensors"
REFERENCE_CONFIG = "config.json"

_RENAMES = ((".mora.mora_a", ".lora_A"), (".mora.mora_b", ".lora_B"), (".lora.lora_a", ".lora_A"),
            (".lora.lora_b", ".lora_B"))
_ROUTER_MLP = re.compile(r"^(.*\.router)\.(task_router\.mlp|mlp)\.(\d+)\.(weight|bias)$")


def map_reference_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    linear_indices: Dict[str, list] = {}
    for name in state:
        found = _ROUTER_MLP.match(name)
        if found:
            indices = linear_indices.setdefault(found.group(1) + "." + found.group(2), [])
            if int(found.group(3)) not in indices:
                indices.append(int(found.group(3)))
    mapped = {}
    for name, tensor in state.items():
        found = _ROUTER_MLP.match(name)
        if found:
            router, mlp, index, kind = found.groups()
            ordinal = sorted(linear_indices[f"{router}.{mlp}"]).index(int(index))
            ours = "task_mlp" if mlp.startswith("task_router") else "token_mlp"
            name = f"{router}.{ours}.{2 * ordinal}.{kind}"  # our Linears sit at even indices (ReLU between)
        else:
            for old, new in _RENAMES:
                if name.endswith(old):
                    name = name[: -len(old)] + new
        mapped[name] = tensor
    return mapped


def read_reference_checkpoint(directory, **overrides):
    """(HMoRAConfig, tensors with our names) of a reference checkpoint directory; `overrides` set config
    fields its config.json lacks (e.g. label_smoothing, a training flag of the reference)."""
    directory = Path(directory)
    weights = directory / REFERENCE_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"reference checkpoint file missing: {weights}")
    config = HMoRAConfig.from_json_file(directory / REFERENCE_CONFIG)
    if overrides:
        config = HMoRAConfig.from_dict({**config.to_dict(), **overrides})
    try:
        with open(weights, "rb") as f:  # a pickle despite its name; a path would route it to safetensors
            state = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError) as err:
        raise ValueError(f"{weights} is not a readable reference checkpoint (a torch pickle): {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights}: expected a dict of name -> tensor, got {type(state).__name__}")
    return config, map_reference_names(state)


def import_reference_checkpoint(base_model, directory, **overrides):
    """An HMoRAModel on `base_model` holding the reference checkpoint in `directory`.

    `overrides`: config fields the reference keeps outside config.json, e.g. `label_smoothing=0.1`.
    The reference always scales by lora_alpha / sqrt(r) whatever its `use_rs_scaling` says; so does our
    default `lora_scaling="rslora"`.
    """
    from .model import HMoRAModel

    config, state = read_reference_checkpoint(directory, **overrides)
    model = HMoRAModel(base_model, config)
    model.load_adapter_state_dict(state, source=str(Path(directory) / REFERENCE_WEIGHTS))
    return model
