"""Backend selection: `backend=` on every op; HMORA_BACKEND replaces "auto" (an explicit argument wins)."""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "torch", "triton")


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get("HMORA_BACKEND", "")
        if forced:
            if forced not in BACKENDS[1:]:
                raise ValueError(f"HMORA_BACKEND: expected one of {BACKENDS[1:]}, got {forced!r}")
            return forced
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def module_for(name: str) -> ModuleType:
    """The implementation module of a resolved backend name."""
    if name == "reference":
        from . import reference

        return reference
    if name == "torch":
        from . import torch_backend

        return torch_backend
    return _triton_module()


def _triton_module() -> ModuleType:
    loaded = sys.modules.get("hmora_kernels.triton_backend")
    if loaded is not None:  # no importlib call once loaded: torch.compile(fullgraph=True) traces through this
        return loaded
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install triton (or use backend='torch')")
    try:
        return importlib.import_module("hmora_kernels.triton_backend")
    except ModuleNotFoundError as err:
        if err.name != "hmora_kernels.triton_backend":
            raise
        raise NotImplementedError(
            "backend='triton': the fused Triton kernels are not part of this build yet; use backend='torch'"
        ) from None
