"""HMoRAConfig: every option of SPEC.md, named as in the reference implementation's config.json and flags.

The reference's `config.json` loads as it is (`HMoRAConfig.from_dict`). Options of our own:
`lora_scaling`, `renorm`, `label_smoothing`, `backend`, `dropout_rng`, `num_encoder_heads`, `position_frequencies`,
`qkv_modules`, `w_i_modules`, and the routing variants of the MoE-LoRA family (`routing_variant` and the fields after
it; README "Routing variants"; `ROUTING_RECIPES` holds each variant's published recipe).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import InitVar, dataclass
from typing import Any, Dict, List, Optional

from hmora_kernels import BACKENDS, DROPOUT_RNGS, RankWise, Switch, TopP

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
ROUTING_VARIANTS = ("mixlora", "switch", "top_p", "rank_wise")

# Each variant's recipe from its authors' code, as HMoRAConfig field values (hmora-train --routing applies them
# before the user's own flags). Every variant replaces HMoRA's auxiliary losses with its own.
_VARIANT_COMMON = {"use_div_loss": False, "use_load_balancing_loss": False, "router_bias": False}
ROUTING_RECIPES: Dict[str, Dict[str, Any]] = {
    # MoE-PEFT / MixLoRA: top-k renormalised by sum, Linear(bias=False) ~ N(0, 0.02), Mixtral load balancing
    "mixlora": {**_VARIANT_COMMON, "routing_variant": "mixlora", "top_k_routing_strategy": True, "renorm": "sum",
                "router_init_std": 0.02},
    # MoE-PEFT mixlora-switch (its README's init 0.02; the code default 1.0 saturates the softmax)
    "switch": {**_VARIANT_COMMON, "routing_variant": "switch", "router_init_std": 0.02},
    # DynMoLE: Linear(bias=False) with nn.Linear's default initialisation
    "top_p": {**_VARIANT_COMMON, "routing_variant": "top_p"},
    # SMoRA: 64 rank-1 experts (E * r = 8 * 8), 8 active, lora_alpha 16 (scale alpha / k = 2); token routing only
    "rank_wise": {**_VARIANT_COMMON, "routing_variant": "rank_wise", "use_task_router": False,
                  "use_hydra_lora": False, "lora_alpha": 16},
}
POSITION_FREQUENCIES = ("reference", "correctly_rounded")
RENORMS = ("softmax", "sum")


def _option(default, help: str, **metadata):
    """A field of ours with its command-line help (hmora-train makes a flag of every field)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclass
class HMoRAConfig:
    """Configuration of an HMoRA adapter (SPEC.md). Validated on construction; JSON round trip.

    target_modules / target_modules_lora / qkv_modules / w_i_modules: None = the model family's default
    (MODEL_FAMILIES), filled in by `get_hmora_model`. Other families: give all four (module names, the last part
    of the dotted path; [] for none).
    max_llm_layer: the L - 1 of the layer schedule; None = the base model's last layer index (as the reference,
    a smaller value is raised to it).
    hidden_size / model_type: filled in from the base model; a checkpoint is checked against them on load.
    routing_variant: None (HMoRA) or a routing strategy of the MoE-LoRA family (README "Routing variants"), which
    brings its own losses weighted by its own coefficients (lambda_auxiliary then weighs nothing: the variants need
    use_div_loss and use_load_balancing_loss off); each reads the fields commented with its name.
    """

    target_modules: Optional[List[str]] = None
    target_modules_lora: Optional[List[str]] = None
    lora_r: int = 8
    lora_alpha: float = 8
    lora_scaling: str = "rslora"          # ours: "rslora" s = alpha / sqrt(r) (reference), "standard" s = alpha / r
    num_experts: int = 8
    use_hydra_lora: bool = True
    dropout: float = 0.1
    dropout_rng: str = _option(
        "native", "dropout masks from each backend's fastest generator (native), or the same masks in every backend "
                  "(philox; slower on CPU; see hmora_kernels.dropout)", choices=DROPOUT_RNGS)
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
    # ---- routing variants (ours; README "Routing variants"). None: HMoRA's routing (SPEC 3.4) and losses (SPEC 4)
    routing_variant: Optional[str] = _option(
        None, "a routing strategy of the MoE-LoRA family instead of HMoRA's (see README; hmora.config.ROUTING_RECIPES "
              "holds each one's recipe)", choices=ROUTING_VARIANTS)
    router_bias: bool = _option(True, "router linear layers with a bias (SPEC 2.3; the variants' recipes: none)")
    router_init_std: Optional[float] = _option(
        None, "router weights drawn from N(0, std) (mixlora / switch recipes: 0.02); unset: nn.Linear's init")
    router_jitter: float = _option(0.0, "token routers' input times U(1 - eps, 1 + eps) while training (switch)")
    balance_loss_coef: float = _option(0.001, "weight of the load-balancing loss E * sum_e f_e P_e of mixlora, "
                                              "switch and top_p")
    router_z_loss_coef: float = _option(0.001, "weight of the router z-loss mean logsumexp(logits)^2 of switch")
    expert_capacity: Optional[int] = _option(
        None, "switch: real tokens per expert and sequence; unset: ceil(capacity_factor * max_sequence_length / E)")
    capacity_factor: float = _option(1.25, "switch: capacity factor (1.0, 1.25 and 2.0 are common)")
    max_sequence_length: int = _option(1024, "switch: the sequence length the expert capacity is computed for")
    top_p: float = _option(0.75, "top_p (DynMoLE): keep experts while their probabilities sum to at most this")
    keep_top_k: int = _option(2, "top_p: experts kept at least")
    entropy_threshold: float = _option(0.9, "top_p: every expert for a token whose normalised Tsallis entropy "
                                            "exceeds this (1 or more: never)")
    entropy_index: float = _option(1.1, "top_p: Tsallis entropy index q (1: Shannon)")
    entropy_eps: float = _option(1e-5, "top_p: added to each probability inside the Tsallis entropy")
    entropy_loss_coef: float = _option(0.01, "top_p: weight of the mean normalised Tsallis entropy loss")
    rank_top_k: int = _option(8, "rank_wise (SMoRA): active rank-1 experts of the E * r")
    bias_update_rate: float = _option(1e-5, "rank_wise: selection-bias step per optimizer step")
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
        if self.dropout_rng not in DROPOUT_RNGS:
            fail("dropout_rng", f"one of {DROPOUT_RNGS}")
        if self.padding_side != "left":
            fail("padding_side", "'left' (the task encoder right-aligns positions)")
        self._validate_routing_variant(fail)
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

    def _validate_routing_variant(self, fail) -> None:
        def number(name, ok, expected):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and ok(value)):
                fail(name, expected)

        def integer(name, low, high=None):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low
                    and (high is None or value <= high)):
                fail(name, f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")

        variant = self.routing_variant
        if variant is not None and variant not in ROUTING_VARIANTS:
            fail("routing_variant", f"None (HMoRA's routing) or one of {ROUTING_VARIANTS}")
        if not isinstance(self.router_bias, bool):
            fail("router_bias", "True or False")
        if self.router_init_std is not None:
            number("router_init_std", lambda v: v > 0, "None (nn.Linear's init) or a standard deviation > 0")
        number("router_jitter", lambda v: 0 <= v < 1, "a value in [0, 1)")
        for name in ("balance_loss_coef", "router_z_loss_coef", "entropy_loss_coef", "bias_update_rate"):
            number(name, lambda v: v >= 0, "a finite number >= 0")
        if self.expert_capacity is not None:
            integer("expert_capacity", 1)
        number("capacity_factor", lambda v: v > 0, "a number > 0 (1.0, 1.25 and 2.0 are common)")
        integer("max_sequence_length", 1)
        number("top_p", lambda v: 0 < v <= 1, "a value in (0, 1]")
        number("entropy_threshold", lambda v: v > 0, "a number > 0 (>= 1 turns the all-experts broadcast off)")
        number("entropy_index", lambda v: 0 < v <= 2, "a Tsallis index q in (0, 2] (1: Shannon)")
        number("entropy_eps", lambda v: v >= 0, "a number >= 0")
        if variant is None:
            return
        for flag in ("use_div_loss", "use_load_balancing_loss"):
            if getattr(self, flag):
                raise ValueError(f"HMoRAConfig: routing_variant={variant!r} brings its own auxiliary loss; set "
                                 f"{flag}=False (or start from ROUTING_RECIPES[{variant!r}])")
        if variant == "mixlora" and not (self.top_k_routing_strategy and self.renorm == "sum"):
            raise ValueError("HMoRAConfig: routing_variant='mixlora' is top-k renormalised by sum; set "
                             "top_k_routing_strategy=True and renorm='sum'")
        if variant == "top_p":
            integer("keep_top_k", 1, self.num_experts)
        if variant == "rank_wise":
            integer("rank_top_k", 1, self.num_experts * self.lora_r)
            if self.use_hydra_lora:
                raise ValueError("HMoRAConfig: routing_variant='rank_wise' makes every rank an expert of its own A "
                                 "row; a Hydra A shared by all experts would make them one: set use_hydra_lora=False")
            if self.use_task_router:
                raise ValueError("HMoRAConfig: routing_variant='rank_wise' routes on sigmoid scores, which do not "
                                 "mix with task-router probabilities: set use_task_router=False (token routing only)")

    # ---- derived values ---------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        if self.lora_scaling == "rslora":
            return self.lora_alpha / math.sqrt(self.lora_r)
        return self.lora_alpha / self.lora_r

    @property
    def gate_top_k(self) -> Optional[int]:
        """The default rule's k (None: soft routing); the variants other than mixlora choose experts themselves."""
        if self.routing_variant not in (None, "mixlora"):
            return None
        return self.top_k if self.top_k_routing_strategy else None

    @property
    def router_experts(self) -> int:
        """Outputs of each router: E, or E * r rank-1 experts under rank_wise."""
        return self.num_experts * self.lora_r if self.routing_variant == "rank_wise" else self.num_experts

    @property
    def routed_scaling(self) -> float:
        """The routed layers' s: `scaling`, or lora_alpha / rank_top_k under rank_wise (SMoRA: gates sum to k)."""
        return self.lora_alpha / self.rank_top_k if self.routing_variant == "rank_wise" else self.scaling

    def capacity(self, num_experts: int) -> int:
        """Switch's expert capacity: expert_capacity, or ceil(capacity_factor * max_sequence_length / E)."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        return math.ceil(self.capacity_factor * self.max_sequence_length / num_experts)

    def routing_rule(self, kind: str):
        """The hmora_kernels routing rule of a router of `kind` ('token', 'hybrid', 'task'); None: SPEC 3.4."""
        variant = self.routing_variant
        if variant == "switch":  # task-only: every token of a sequence has the same expert, so no capacity
            return Switch(None if kind == "task" else self.capacity(self.num_experts))
        if variant == "top_p":
            return TopP(self.top_p, self.keep_top_k, self.entropy_threshold, self.entropy_index, self.entropy_eps)
        if variant == "rank_wise":
            return RankWise(self.rank_top_k)
        return None

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
