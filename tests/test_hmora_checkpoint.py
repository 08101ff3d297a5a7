"""Checkpoints: real safetensors + JSON under non-PEFT names, atomic saves, clear errors on bad input;
the reference-checkpoint importer's errors; merge_and_unload."""
import json
import os

import pytest
import safetensors.torch
import torch

from hmora import HMoRAConfig, HMoRAModel, get_hmora_model, import_reference_checkpoint
from hmora.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from test_hmora_model import FAMILIES, VOCAB, batch, tiny_base, tiny_model


def _logits(model, ids, mask):
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_give_identical_logits(tmp_path, family):
    model = tiny_model(family)
    ids, mask, _ = batch()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # not adapter_model.* / adapter_config.json
    stored = safetensors.torch.load_file(str(tmp_path / WEIGHTS_NAME))  # real safetensors
    assert set(stored) == set(model.adapter_named_parameters())
    reloaded = HMoRAModel.from_pretrained(tiny_base(family), tmp_path)
    assert torch.equal(_logits(model, ids, mask), _logits(reloaded, ids, mask))
    assert reloaded.hmora_config == model.hmora_config


def test_a_failed_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}
    with torch.no_grad():
        model.base_model.model.layers[0].self_attn.q_proj.lora_B.add_(1.0)

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr("hmora.checkpoint.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporary file left behind
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    HMoRAModel.from_pretrained(tiny_base("qwen2"), tmp_path)


def test_loading_onto_the_wrong_base_model_names_what_does_not_fit(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="adapter is for model_type 'qwen2' but the base model is 'llama'"):
        HMoRAModel.from_pretrained(tiny_base("llama"), tmp_path)
    with pytest.raises(ValueError, match=r"does not fit this base model and config: missing \d+ tensors \(e.g. "
                                         r"\['model.layers.2.mlp.gate_proj.router.alpha'"):  # 4 layers: a new schedule
        HMoRAModel.from_pretrained(tiny_base("qwen2", layers=4), tmp_path)
    wider = tiny_base("qwen2")
    wider.resize_token_embeddings(VOCAB)
    with torch.no_grad():
        wider.model.embed_tokens.weight = torch.nn.Parameter(torch.zeros(VOCAB, 48))
    with pytest.raises(ValueError, match="adapter is for hidden_size 32 but the base model has 48"):
        HMoRAModel.from_pretrained(wider, tmp_path)


def test_missing_corrupt_and_mixed_checkpoint_files(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path)
    weights, config = tmp_path / WEIGHTS_NAME, tmp_path / CONFIG_NAME
    good_weights, good_config = weights.read_bytes(), config.read_text()

    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        HMoRAModel.from_pretrained(tiny_base("qwen2"), tmp_path)
    weights.write_bytes(good_weights)

    config.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HMoRAModel.from_pretrained(tiny_base("qwen2"), tmp_path)
    config.write_text(json.dumps({**json.loads(good_config), "lora_r": 4}))
    with pytest.raises(ValueError, match="does not match the config stored with"):
        HMoRAModel.from_pretrained(tiny_base("qwen2"), tmp_path)
    config.write_text(good_config)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match="checkpoint file missing"):
        HMoRAModel.from_pretrained(tiny_base("qwen2"), tmp_path)


def test_loading_checks_every_tensor_name_and_shape():
    model = tiny_model("qwen2")
    state = {name: p.detach().clone() for name, p in model.adapter_named_parameters().items()}
    name = "model.layers.0.self_attn.q_proj.lora_A"
    with pytest.raises(ValueError, match=rf"{name}: \(3, 32\) in the checkpoint, model needs \(2, 32\)"):
        model.load_adapter_state_dict({**state, name: torch.zeros(3, 32)})
    with pytest.raises(ValueError, match="1 tensors the model does not have"):
        model.load_adapter_state_dict({**state, "extra.lora_B": torch.zeros(1)})
    del state[name]
    with pytest.raises(ValueError, match="missing 1 tensors"):
        model.load_adapter_state_dict(state)


def test_reference_importer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference checkpoint file missing"):
        import_reference_checkpoint(tiny_base("qwen2"), tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    (tmp_path / "config.json").write_text(json.dumps({"lora_r": 2, "num_experts": 4, "peft_type": "hmora"}))
    with pytest.raises(ValueError, match="not a readable reference checkpoint"):
        import_reference_checkpoint(tiny_base("qwen2"), tmp_path)


def test_our_loader_points_reference_checkpoints_to_the_importer(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="import_reference_checkpoint"):
        HMoRAModel.from_pretrained(tiny_base("qwen2"), tmp_path)


def test_merge_and_unload_folds_plain_lora_and_refuses_routed_layers():
    ids, mask, _ = batch()
    routed = tiny_model("qwen2")
    with pytest.raises(ValueError, match="routed layers .* cannot be folded"):
        routed.merge_and_unload()
    config = HMoRAConfig(target_modules=["q_proj", "down_proj"], target_modules_lora=["q_proj", "down_proj"],
                         lora_r=2)
    plain = get_hmora_model(tiny_base("qwen2"), config)
    with torch.no_grad():
        for param in plain.adapter_named_parameters().values():
            param.normal_()
    before = _logits(plain, ids, mask)
    merged = plain.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    with torch.no_grad():
        after = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_reference_names_map_onto_ours():
    """The reference's Sequential(Dropout, Linear, ReLU, Dropout, Linear) router: its k-th Linear is our k-th."""
    from hmora.importer import map_reference_names

    owner = "model.layers.1.mlp.gate_proj"
    names = [f"{owner}.router.mlp.1.weight", f"{owner}.router.mlp.4.bias", f"{owner}.router.task_router.mlp.1.bias",
             f"{owner}.router.alpha", f"{owner}.mora.mora_a", f"{owner}.mora.mora_b",
             "model.layers.1.mlp.down_proj.lora.lora_b", "task_encoder.task_embedding.weight"]
    mapped = map_reference_names({name: torch.zeros(1) for name in names})
    assert list(mapped) == [f"{owner}.router.token_mlp.0.weight", f"{owner}.router.token_mlp.2.bias",
                            f"{owner}.router.task_mlp.0.bias", f"{owner}.router.alpha", f"{owner}.lora_A",
                            f"{owner}.lora_B", "model.layers.1.mlp.down_proj.lora_B",
                            "task_encoder.task_embedding.weight"]


def reference_names(model) -> dict:
    """Our adapter tensors under the reference implementation's names (the inverse of map_reference_names) and with
    its scalar alpha: what its `save_pretrained` writes."""
    from hmora.layers import ExpertLinear

    routed = {name for name, m in model.base_model.named_modules() if isinstance(m, ExpertLinear)}
    state = {}
    for name, tensor in model.adapter_named_parameters().items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            kind = "mora.mora" if module in routed else "lora.lora"
            name = f"{module}.{kind}_{leaf[-1].lower()}"
        for ours, theirs in ((".router.token_mlp.", ".router.mlp."), (".router.task_mlp.", ".router.task_router.mlp.")):
            if ours in name:  # their Sequential(Dropout, Linear, ReLU, Dropout, Linear): our Linear j is at 1 + 3j / 2
                head, _, tail = name.partition(ours)
                index, _, kind = tail.partition(".")
                name = f"{head}{theirs}{1 + 3 * int(index) // 2}.{kind}"
        state[name] = tensor.detach().reshape(()) if name.endswith(".router.alpha") else tensor.detach()
    return state


@pytest.mark.parametrize("router_layers", [1, 2])
def test_reference_checkpoint_with_null_target_modules_lora_routes_every_target(tmp_path, router_layers):
    """The reference reads a null `target_modules_lora` as none: every target module gets experts and a router."""
    config = HMoRAConfig(num_experts=4, lora_r=2, task_token_id=5, dropout=0.0, target_modules_lora=[],
                         num_router_mlp_layers=router_layers)
    source = get_hmora_model(tiny_base("qwen2"), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in source.adapter_named_parameters().values():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    values = {k: v for k, v in source.hmora_config.to_dict().items() if k not in ("position_frequencies", "backend")}
    values.update(peft_type="hmora", torch_dtype=None, use_rs_scaling=False, target_modules_lora=None,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    for ours_only in ("lora_scaling", "renorm", "label_smoothing", "num_encoder_heads", "qkv_modules", "w_i_modules"):
        del values[ours_only]
    (tmp_path / "config.json").write_text(json.dumps(values))
    with open(tmp_path / "adapter_model.safetensors", "wb") as f:  # a torch pickle under that name, as the reference
        torch.save(reference_names(source), f)

    imported = import_reference_checkpoint(tiny_base("qwen2"), tmp_path)
    assert imported.hmora_config.target_modules_lora == []
    owners = set(imported.layer_kinds())
    assert "model.layers.0.self_attn.o_proj" in owners and "model.layers.0.mlp.down_proj" in owners
    ids, mask, _ = batch()
    assert torch.equal(_logits(imported, ids, mask), _logits(source, ids, mask))


def test_peft_api_disable_adapter_unload_and_loading_frozen(tmp_path):
    """disable_adapter() and unload() give the base model's own logits; from_pretrained(is_trainable=False) freezes;
    save_pretrained takes PEFT's keywords and refuses non-safetensors."""
    ids, mask, _ = batch()
    base_logits = _logits(tiny_base("qwen2"), ids, mask)
    model = tiny_model("qwen2")
    adapted = _logits(model, ids, mask)
    assert not torch.allclose(adapted, base_logits)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids, mask), base_logits)
    assert torch.equal(_logits(model, ids, mask), adapted)
    assert model.get_base_model() is model.base_model and model.can_generate()
    assert model.generation_config is model.base_model.generation_config
    model.save_pretrained(tmp_path, is_main_process=True, safe_serialization=True)
    with pytest.raises(ValueError, match="hmora writes only safetensors"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    frozen = HMoRAModel.from_pretrained(tiny_base("qwen2"), tmp_path, is_trainable=False)
    assert not frozen.training and frozen.trainable_parameter_names() == []
    assert torch.equal(_logits(frozen, ids, mask), adapted)
    unloaded = model.unload()
    assert type(unloaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(unloaded(input_ids=ids, attention_mask=mask).logits.detach(), base_logits)
