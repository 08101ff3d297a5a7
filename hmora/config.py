"""HMoRAConfig: every option of SPEC.md, named as in the reference implementation's config.json and flags.

The reference's `config.json` loads as it is (`HMoRAConfig.from_dict`). Options of our own:
`lora_scaling`, `renorm`, `label_smoothing`, `backend`, `num_encoder_heads`, `position_frequencies`, `qkv_modules`,
`w_i_modules`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import InitVar, dataclass
from typing import Any, Dict, List, Optional

from hmora_kernels import BACKENDS

# Per model family: default target modules, the plain-LoRA ones (the paper's o/down and their BLOOM
# counterparts), the q/k/v group and the gate/up group that may share a router. BLOOM's q, k, v is one fused
# Linear, so its attention "group" has one member and always shares.
_LLAMA_LIKE = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               "target_modules_lora": ["o_proj", "down_proj"],
               "qkv_modules": ["q_proj", "k_proj", "v_proj"], "w_i_modules": ["gate_proj", "up_proj"]}
MODEL_FAMILIES: Dict[str, Dict[str, List[str]]] = {
    "qwen2": _LLAMA_LIKE,
    "llama": _LLAMA_LIKE,
    "bloom": {"target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
              "target_modules_lora": ["dense", "dense_4h_to_h"],
              "qkv_modules": ["query_key_value"], "w_i_modules": []},
}
FAMILY_FIELDS = ("target_modules", "target_modules_lora", "qkv_modules", "w_i_modules")

# Keys of the reference config.json that carry no information for us: `peft_type` is always "hmora",
# `torch_dtype` is saved as null, and the reference code ignores `use_rs_scaling` (it always uses
# alpha / sqrt(r), our default `lora_scaling="rslora"`). Their presence marks a reference config.json, whose
# null `target_modules_lora` means no plain-LoRA module (ours: the family default).
REFERENCE_ONLY_KEYS = ("peft_type", "torch_dtype", "use_rs_scaling")
_ABSENT = object()

LORA_SCALINGS = ("rslora", "standard")
POSITION_FREQUENCIES = ("reference", "correctly_rounded")
RENORMS = ("softmax", "sum")


@dataclass
class HMoRAConfig:
    """Configuration of an HMoRA adapter (SPEC.md). Validated on construction; JSON round trip.

    target_modules / target_modules_lora / qkv_modules / w_i_modules: None = the model family's default
    (MODEL_FAMILIES), filled in by `get_hmora_model`. Other families: give all four (module names, the last part
    of the dotted path; [] for none).
    max_llm_layer: the L - 1 of the layer schedule; None = the base model's last layer index (as the reference,
    a smaller value is raised to it).
    hidden_size / model_type: filled in from the base model; a checkpoint is checked against them on load.
    """

    target_modules: Optional[List[str]] = None
    target_modules_lora: Optional[List[str]] = None
    lora_r: int = 8
    lora_alpha: float = 8
    lora_scaling: str = "rslora"          # ours: "rslora" s = alpha / sqrt(r) (reference), "standard" s = alpha / r
    num_experts: int = 8
    use_hydra_lora: bool = True
    dropout: float = 0.1
    top_k_routing_strategy: bool = True
    top_k: int = 2
    renorm: str = "softmax"               # ours: top-k gates by softmax over the selected (reference) or "sum"
    use_task_router: bool = True
    task_router_only: bool = False
    share_router_for_qkv: bool = True
    share_router_for_w_i: bool = True
    num_router_mlp_layers: int = 1
    router_hidden_dim: int = 32
    epsilon_alpha: float = 2.0
    alpha_shift: float = 0.0
    alpha_low_bound: float = 0.2
    alpha_up_bound: float = 0.8
    max_llm_layer: Optional[int] = None
    use_div_loss: bool = True
    gamma_div_certain_t: float = 0.5
    gamma_div_balance_t: float = 0.98
    gamma_div_certain_s: float = 0.5
    gamma_div_balance_s: float = 0.98
    use_load_balancing_loss: bool = False
    lambda_auxiliary: float = 0.005
    lambda_lm: float = 1.0
    label_smoothing: float = 0.0          # ours (the reference passes it to its training loop)
    trainable_encoder: bool = True
    num_encoder_layer: int = 1
    num_encoder_heads: int = 16           # ours: the reference hard-codes 16
    position_frequencies: str = "reference"  # ours: task-encoder sinusoid frequencies, or "correctly_rounded"
    task_token: str = "?"
    task_token_id: Optional[int] = None   # None: the task token starts as the mean embedding row
    padding_side: str = "left"
    hidden_size: Optional[int] = None
    model_type: Optional[str] = None
    qkv_modules: Optional[List[str]] = None
    w_i_modules: Optional[List[str]] = None
    backend: str = "auto"
    # the reference config.json's own keys: accepted only to say how to load such a file
    peft_type: InitVar[Any] = _ABSENT
    torch_dtype: InitVar[Any] = _ABSENT
    use_rs_scaling: InitVar[Any] = _ABSENT

    def __post_init__(self, peft_type, torch_dtype, use_rs_scaling):
        given = [k for k, v in zip(REFERENCE_ONLY_KEYS, (peft_type, torch_dtype, use_rs_scaling)) if v is not _ABSENT]
        if given:
            raise ValueError(
                f"HMoRAConfig got {given}, keys of the reference implementation's config.json; load that file with "
                f"HMoRAConfig.from_json_file(path) or HMoRAConfig.from_dict(values), which drop them and read its "
                f"null target_modules_lora as none")
        self.validate()

    # ---- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(name, expected):
            raise ValueError(f"HMoRAConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("lora_r", "num_experts", "num_router_mlp_layers", "router_hidden_dim", "num_encoder_layer",
                     "num_encoder_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "an integer >= 1")
        for name in ("lora_alpha", "epsilon_alpha", "alpha_shift", "lambda_auxiliary", "lambda_lm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                fail(name, "a finite number")
        for name in ("lora_alpha", "epsilon_alpha", "lambda_auxiliary", "lambda_lm"):
            if getattr(self, name) < 0:
                fail(name, "a number >= 0")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "a probability in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            fail("label_smoothing", "a value in [0, 1)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            fail("top_k", "an integer >= 1 (load balancing divides by it even under soft routing)")
        if self.top_k_routing_strategy and self.top_k > self.num_experts:
            fail("top_k", f"an integer in [1, num_experts = {self.num_experts}] with top_k_routing_strategy")
        for name in ("gamma_div_certain_t", "gamma_div_balance_t", "gamma_div_certain_s", "gamma_div_balance_s",
                     "alpha_low_bound", "alpha_up_bound"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "a value in [0, 1]")
        if self.alpha_low_bound > self.alpha_up_bound:
            raise ValueError(
                f"HMoRAConfig: alpha_low_bound ({self.alpha_low_bound}) must not exceed alpha_up_bound "
                f"({self.alpha_up_bound})")
        if self.use_div_loss and self.use_load_balancing_loss:
            raise ValueError("HMoRAConfig: use_div_loss and use_load_balancing_loss are alternatives; enable one")
        if self.task_router_only and not self.use_task_router:
            raise ValueError("HMoRAConfig: task_router_only=True needs use_task_router=True")
        if self.lora_scaling not in LORA_SCALINGS:
            fail("lora_scaling", f"one of {LORA_SCALINGS}")
        if self.renorm not in RENORMS:
            fail("renorm", f"one of {RENORMS}")
        if self.position_frequencies not in POSITION_FREQUENCIES:
            fail("position_frequencies", f"one of {POSITION_FREQUENCIES}")
        if self.backend not in BACKENDS:
            fail("backend", f"one of {BACKENDS}")
        if self.padding_side != "left":
            fail("padding_side", "'left' (the task encoder right-aligns positions)")
        if self.max_llm_layer is not None and (not isinstance(self.max_llm_layer, int) or self.max_llm_layer < 0):
            fail("max_llm_layer", "None or an integer >= 0 (the index of the last decoder layer)")
        for name in FAMILY_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                fail(name, "a list of module names")
            setattr(self, name, list(value))
        if self.target_modules is not None and self.target_modules_lora is not None:
            stray = sorted(set(self.target_modules_lora) - set(self.target_modules))
            if stray:
                raise ValueError(f"HMoRAConfig.target_modules_lora: {stray} are not in target_modules "
                                 f"{self.target_modules}; add them there or remove them")

    # ---- derived values ---------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        if self.lora_scaling == "rslora":
            return self.lora_alpha / math.sqrt(self.lora_r)
        return self.lora_alpha / self.lora_r

    @property
    def gate_top_k(self) -> Optional[int]:
        return self.top_k if self.top_k_routing_strategy else None

    def layer_kind(self, layer: int) -> str:
        """'token', 'hybrid' or 'task' for decoder layer `layer` (SPEC 3.3)."""
        if not self.use_task_router:
            return "token"
        if self.task_router_only:
            return "task"
        a = 1.0 / (1.0 + math.exp(-self.alpha_raw(layer)))
        if a < self.alpha_low_bound:
            return "token"
        if a > self.alpha_up_bound:
            return "task"
        return "hybrid"

    def alpha_raw(self, layer: int) -> float:
        """-eps + 2 eps l / (L - 1) + shift: the initial pre-sigmoid mixing weight of layer `layer`."""
        if self.max_llm_layer is None:
            raise ValueError("HMoRAConfig.max_llm_layer is unset; get_hmora_model fills it from the base model")
        fraction = layer / self.max_llm_layer if self.max_llm_layer > 0 else 0.0
        return -self.epsilon_alpha + 2.0 * self.epsilon_alpha * fraction + self.alpha_shift

    # ---- JSON -------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "HMoRAConfig":
        """Our config dict, or the reference implementation's config.json (marked by its `peft_type`): there a
        null `target_modules_lora` means none, every target module routed."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(REFERENCE_ONLY_KEYS))
        if unknown:
            raise ValueError(f"HMoRAConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        fields = {k: v for k, v in values.items() if k in known}
        if "peft_type" in values and fields.get("target_modules_lora", []) is None:
            fields["target_modules_lora"] = []
        return cls(**fields)

    @classmethod
    def from_json_file(cls, path) -> "HMoRAConfig":
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"HMoRA config not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"HMoRA config {path} is not valid JSON ({err}); the file is corrupt") from None
        if not isinstance(values, dict):
            raise ValueError(f"HMoRA config {path}: expected a JSON object, got {type(values).__name__}")
        return cls.from_dict(values)
