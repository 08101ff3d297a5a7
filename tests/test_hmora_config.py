"""HMoRAConfig: the reference config.json loads as it is, JSON round trip, invalid values are clear errors,
the layer schedule of SPEC 3.3."""
import math
from pathlib import Path

import pytest

from hmora import HMoRAConfig

REFERENCE_CONFIG = Path(__file__).parent / "fixtures" / "qwen2_paper" / "reference_adapter" / "config.json"


def test_reference_config_json_loads_as_it_is():
    config = HMoRAConfig.from_json_file(REFERENCE_CONFIG)
    assert (config.lora_r, config.num_experts, config.top_k, config.task_token_id) == (4, 4, 2, 63)
    assert config.scaling == 8 / math.sqrt(4)  # the reference always uses alpha / sqrt(r)


def test_json_round_trip(tmp_path):
    config = HMoRAConfig(lora_r=4, num_experts=6, top_k=3, renorm="sum", lora_scaling="standard",
                         label_smoothing=0.1, target_modules_lora=["o_proj"])
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    assert HMoRAConfig.from_json_file(path) == config
    assert config.scaling == 1 / 4 * config.lora_alpha


@pytest.mark.parametrize("field, value, message", [
    ("lora_r", 0, "lora_r: expected an integer >= 1"),
    ("num_experts", 2.5, "num_experts: expected an integer >= 1"),
    ("top_k", 9, r"top_k: expected an integer in \[1, num_experts = 8\]"),
    ("dropout", 1.0, r"dropout: expected a probability in \[0, 1\)"),
    ("gamma_div_balance_t", 1.5, r"gamma_div_balance_t: expected a value in \[0, 1\]"),
    ("alpha_low_bound", 0.9, "alpha_low_bound .* must not exceed alpha_up_bound"),
    ("lora_scaling", "sqrt", "lora_scaling: expected one of"),
    ("renorm", "max", "renorm: expected one of"),
    ("backend", "cuda", "backend: expected one of"),
    ("use_load_balancing_loss", True, "use_div_loss and use_load_balancing_loss are alternatives"),
    ("target_modules", "q_proj", "target_modules: expected a list of module names"),
    ("lambda_auxiliary", float("nan"), "lambda_auxiliary: expected a finite number"),
    ("padding_side", "right", "padding_side: expected 'left'"),
])
def test_invalid_values_are_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        HMoRAConfig(**{field: value})


def test_unknown_keys_and_inconsistent_module_lists():
    with pytest.raises(ValueError, match=r"unknown keys \['lora_rank'\]"):
        HMoRAConfig.from_dict({"lora_rank": 8})
    with pytest.raises(ValueError, match=r"target_modules_lora: \['o_proj'\] are not in target_modules"):
        HMoRAConfig(target_modules=["q_proj"], target_modules_lora=["o_proj"])
    with pytest.raises(ValueError, match="task_router_only=True needs use_task_router=True"):
        HMoRAConfig(use_task_router=False, task_router_only=True)


def test_layer_schedule_of_a_28_layer_model():
    config = HMoRAConfig(max_llm_layer=27)
    kinds = [config.layer_kind(layer) for layer in range(28)]
    assert kinds == ["token"] * 5 + ["hybrid"] * 18 + ["task"] * 5
    assert config.alpha_raw(0) == -2.0 and config.alpha_raw(27) == 2.0
    assert HMoRAConfig(max_llm_layer=27, use_task_router=False).layer_kind(27) == "token"
    assert HMoRAConfig(max_llm_layer=27, task_router_only=True).layer_kind(0) == "task"
    assert HMoRAConfig(max_llm_layer=27, alpha_shift=3.0).layer_kind(0) == "hybrid"


def test_constructor_on_a_reference_config_json_points_to_from_dict():
    import json

    values = json.loads(REFERENCE_CONFIG.read_text())
    with pytest.raises(ValueError, match=r"keys of the reference implementation's config.json; load that file with "
                                         r"HMoRAConfig.from_json_file\(path\) or HMoRAConfig.from_dict\(values\)"):
        HMoRAConfig(**values)
    assert HMoRAConfig.from_dict(values) == HMoRAConfig.from_json_file(REFERENCE_CONFIG)
    # null target_modules_lora: the reference's "none"; ours (no peft_type) keeps None = the family default
    assert HMoRAConfig.from_dict({**values, "target_modules_lora": None}).target_modules_lora == []
    assert HMoRAConfig.from_dict({"target_modules_lora": None}).target_modules_lora is None


def test_top_k_is_the_load_balancing_divisor_under_soft_routing():
    HMoRAConfig(top_k_routing_strategy=False, top_k=12, num_experts=4)  # only a divisor: may exceed E
    with pytest.raises(ValueError, match="top_k: expected an integer >= 1"):
        HMoRAConfig(top_k_routing_strategy=False, top_k=0)
