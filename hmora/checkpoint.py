"""Our checkpoint: real safetensors + JSON config, written atomically.

Files: `hmora_adapter.safetensors` (adapter tensors, named relative to the base model, with the config JSON
also in its metadata) and `hmora_config.json` (the same config, for people). The names are not PEFT's
(`adapter_model.*` / `adapter_config.json`), so transformers never auto-loads them as a PEFT adapter.
Each file is written to a temporary file in the same directory, flushed and fsynced, then renamed over the
old one: a failed save leaves the last good checkpoint as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import HMoRAConfig

WEIGHTS_NAME = "hmora_adapter.safetensors"
CONFIG_NAME = "hmora_config.json"
CONFIG_METADATA_KEY = "hmora_config"


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask: what open() or mkdir() would give (mkstemp / mkdtemp give 0600 / 0700)."""
    umask = os.umask(0)  # os.umask is the portable way to read the umask: set it, and set it straight back
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(temporary path) in path's directory, then rename over `path`; on any error remove the temp."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def full_tensor(tensor):
    """The whole tensor of a sharded (FSDP2 DTensor) parameter, gathered from every rank; others as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def zero3_gathered(tensors):
    """A context in which the DeepSpeed ZeRO-3 partitioned parameters among `tensors` hold their whole values (a
    collective: every rank enters it); outside it they are empty."""
    partitioned = [t for t in tensors if hasattr(t, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def save_adapter(model, directory, state_dict=None, is_main_process: bool = True) -> None:
    """Write the adapter of `model`. `state_dict` (e.g. the full state dict Trainer gathers under FSDP): take the
    adapter tensors from it instead of from the model. Every rank must call this under FSDP2 or DeepSpeed ZeRO-3
    (gathering is collective); only the main process writes."""
    if state_dict is not None:
        by_adapter_name = {name[len("base_model."):] if name.startswith("base_model.") else name: tensor
                           for name, tensor in state_dict.items()}
        tensors = {name: by_adapter_name[name] for name in model.adapter_state_tensors()}
    else:
        tensors = model.adapter_state_tensors()
    with zero3_gathered(tensors.values()):  # copies: ZeRO-3 empties the gathered parameters on the way out
        tensors = {name: full_tensor(t).detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    if not is_main_process:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_json = model.hmora_config.to_json_string()
    metadata = {"format": "pt", CONFIG_METADATA_KEY: config_json}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json + "\n", encoding="utf-8"))


def read_checkpoint(directory):
    """(config, tensors) of a checkpoint directory, with clear errors for missing, corrupt or mixed files."""
    directory = Path(directory)
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for path in (config_path, weights):
        if not path.is_file():
            hint = " (a reference-implementation checkpoint? use hmora.import_reference_checkpoint)" \
                if (directory / "adapter_model.safetensors").exists() else ""
            raise FileNotFoundError(f"HMoRA checkpoint file missing: {path}{hint}")
    config = HMoRAConfig.from_json_file(config_path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"HMoRA checkpoint {weights} is not a readable safetensors file ({err}); "
                         f"the file is corrupt or truncated") from None
    if stored is None or json.loads(stored) != config.to_dict():
        raise ValueError(f"{config_path} does not match the config stored with {weights}; the checkpoint mixes "
                         f"files of two saves")
    return config, tensors


def load_adapter(base_model, directory, is_trainable: bool = True):
    from .model import HMoRAModel

    config, tensors = read_checkpoint(directory)
    model = HMoRAModel(base_model, config)
    model.load_adapter_state_dict(tensors, source=str(Path(directory) / WEIGHTS_NAME))
    if not is_trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def is_checkpoint(directory) -> bool:
    return (Path(directory) / WEIGHTS_NAME).is_file()
