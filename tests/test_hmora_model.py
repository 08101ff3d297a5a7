"""HMoRA on tiny random Qwen2 / LLaMA / BLOOM models: forward, backward, generate, routing context, dropout
and activation checkpointing, parameter counts and the layer schedule (SPEC 1-4)."""
import collections

import pytest
import torch
from transformers import (BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import hmora_kernels
from hmora import HMoRAConfig, HMoRAModel, get_hmora_model
from hmora.model import prompt_part

VOCAB = 64
FAMILIES = ["qwen2", "llama", "bloom"]


def tiny_base(family: str, layers: int = 3, seed: int = 0):
    """A random causal LM small enough for CPU tests; hidden 32 so the task encoder's 16 heads divide it."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, pad_token_id=0, eos_token_id=3, bos_token_id=1)
    if family == "bloom":
        return BloomForCausalLM(BloomConfig(n_layer=layers, n_head=4, **common)).eval()
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    return model_cls(config_cls(intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64, **common)).eval()


def tiny_model(family: str = "qwen2", perturb: bool = True, layers: int = 3, **overrides) -> HMoRAModel:
    """A tiny HMoRA model; `perturb` moves every adapter weight off its init (B = 0 hides most bugs)."""
    config = HMoRAConfig(**{"num_experts": 4, "lora_r": 2, "task_token_id": 5, "dropout": 0.0, **overrides})
    model = get_hmora_model(tiny_base(family, layers), config)
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.adapter_named_parameters().values():
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def batch(seed: int = 2, rows: int = 2, length: int = 8, prompt: int = 5):
    """Left-padded rows (row 1 has two pads); labels -100 on pads and on the prompt."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return ids, mask, labels


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_generate(family):
    model = tiny_model(family).train()
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    config = model.hmora_config
    assert out.logits.shape == (2, 8, VOCAB)
    assert torch.isfinite(out.loss) and out.aux_loss > 0
    assert out.task_aux_loss > 0
    assert out.loss.item() == pytest.approx(config.lambda_lm * out.ce_loss.item() + config.lambda_auxiliary
                                            * (out.aux_loss.item() + out.task_aux_loss.item()), rel=1e-6)
    kinds = model.layer_kinds()
    assert collections.Counter(kinds.values()) == {"token": len(kinds) // 3, "hybrid": len(kinds) // 3,
                                                   "task": len(kinds) // 3}
    assert set(out.router_probs) == {n for n, k in kinds.items() if k != "task"}
    assert set(out.router_gates) == set(kinds) and set(out.task_probs) == {n for n, k in kinds.items() if k != "token"}
    gates = next(iter(out.router_gates.values()))
    assert ((gates > 0).sum(-1) == 2).all()  # top-2 of 4 experts for every token
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    model.eval()
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 11) and torch.equal(generated[:, :8], ids)


def test_bloom_fused_qkv_is_one_routed_group():
    kinds = tiny_model("bloom").layer_kinds()
    assert "transformer.h.0.self_attention.query_key_value" in kinds
    assert not any(name.endswith(("dense", "dense_4h_to_h")) for name in kinds)  # plain LoRA by default


def test_shared_router_gives_every_member_the_owners_gates():
    """q, k, v share the router owned by q: one routed_group call per group and forward, every member's output
    equals its base output plus the gated expert update computed from the owner's gates."""
    model = tiny_model("qwen2", use_task_router=False)
    ids, mask, _ = batch()
    captured = {}
    attn = model.base_model.model.layers[0].self_attn
    hooks = [getattr(attn, n).register_forward_hook(lambda mod, args, out, n=n: captured.update({n: (args[0], out)}))
             for n in ("q_proj", "k_proj", "v_proj")]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    gates = out.router_gates["model.layers.0.self_attn.q_proj"]
    x = captured["q_proj"][0]
    for name in ("q_proj", "k_proj", "v_proj"):
        member = getattr(attn, name)
        assert captured[name][0] is x
        h = (x @ member.lora_A.T).unsqueeze(-2)  # Hydra: one A for all experts
        gated = (gates.unsqueeze(-1) * h).flatten(-2)
        expected = member.base_layer(x) + member.scaling * gated @ member.lora_B.T
        torch.testing.assert_close(captured[name][1], expected, rtol=1e-5, atol=1e-5)


def test_members_given_aliases_of_their_input_share_one_group_computation():
    """DeepSpeed ZeRO-3 hands every module its own `detach()`ed alias of the input: the group must still compute all
    its members at once, with one dropout draw, as when they get the same tensor (each member computing the group
    itself drew other masks and moved the ZeRO-3 run 20% off the single-process one)."""
    from hmora.layers import ExpertLinear

    model = tiny_model("qwen2", dropout=0.1).train()
    ids, mask, labels = batch()
    torch.manual_seed(0)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    hooks = [m.register_forward_pre_hook(lambda module, args: (args[0].detach(), *args[1:]))
             for m in model.modules() if isinstance(m, ExpertLinear)]
    torch.manual_seed(0)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    for hook in hooks:
        hook.remove()
    assert torch.equal(loss, expected)


def test_at_step_zero_the_lm_loss_moves_only_b_matrices():
    """SPEC 2.3: B = 0 at init, so d CE / d(anything but B) = 0. The aux loss moves the token routers and,
    through each router's input, the B matrices of the layers below; never A, alpha or the task side."""
    model = tiny_model("qwen2", perturb=False).train()
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.ce_loss.backward(retain_graph=True)
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert moved and all(HMoRAModel.is_b_matrix(n) for n in moved)
    assert moved == {n for n in model.trainable_parameter_names() if HMoRAModel.is_b_matrix(n)}
    model.zero_grad()
    (model.hmora_config.lambda_auxiliary * out.aux_loss).backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert moved and all(".router.token_mlp." in n or HMoRAModel.is_b_matrix(n) for n in moved)
    assert any(".router.token_mlp." in n for n in moved)


def test_qwen2_1p5b_shaped_paper_setting_counts_and_schedule(capsys):
    """Paper setting on a Qwen2-1.5B-shaped config built on the meta device: 60,566,276 trainable parameters,
    layers 0-4 token-only, 5-22 hybrid, 23-27 task-only (SPEC 3.3, 5)."""
    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        base = Qwen2ForCausalLM(config)
    model = get_hmora_model(base, HMoRAConfig(num_experts=8, lora_r=8, lora_alpha=8, use_hydra_lora=True,
                                              top_k_routing_strategy=True, top_k=2, use_task_router=True,
                                              share_router_for_qkv=True, share_router_for_w_i=True,
                                              target_modules_lora=["o_proj", "down_proj"], task_token_id=30))
    assert model.get_nb_trainable_parameters()[0] == 60_566_276
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert "trainable params: 60,566,276" in printed and "of the base model: 3.92" in printed  # SPEC 5: 3.92%
    by_layer = {}
    for name, kind in model.layer_kinds().items():
        by_layer.setdefault(int(name.split(".")[2]), set()).add(kind)
    assert by_layer == {layer: {"token" if layer <= 4 else "hybrid" if layer <= 22 else "task"} for layer in range(28)}


def _grads_after_step(model, ids, mask, labels, **extra):
    model.zero_grad()
    torch.manual_seed(123)  # the dropout seeds of this step
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, **extra)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("task_loss_sources", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(reentrant, task_loss_sources):
    """With dropout on, checkpointed layers redraw the same seeds in the recomputation; reentrant mode needs the
    task-representation and loss bridges of hmora.reentrant. Gradients equal those without checkpointing, with the
    task-router loss over this batch or over other sources (a second task representation into every layer)."""
    model = tiny_model("qwen2", dropout=0.1).train()
    ids, mask, labels = batch()
    extra = {"task_loss_input_ids": ids[:, :4].flip(0), "task_loss_attention_mask": mask[:, :4].flip(0)} \
        if task_loss_sources else {}
    loss, grads = _grads_after_step(model, ids, mask, labels, **extra)
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    assert model.is_activation_checkpointing
    loss_ckpt, grads_ckpt = _grads_after_step(model, ids, mask, labels, **extra)
    assert torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_dropout_draws_fresh_masks_in_training_and_none_in_eval():
    model = tiny_model("qwen2", dropout=0.3).train()
    ids, mask, labels = batch()
    first = model(input_ids=ids, attention_mask=mask).logits
    second = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_task_representation_defaults_to_the_prompt_part():
    model = tiny_model("qwen2").eval()
    ids, mask, labels = batch()
    task_ids, task_mask = prompt_part(ids, mask, labels)
    assert task_ids.shape == (2, 5) and task_mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1]]
    assert task_ids[1, 2:].tolist() == ids[1, 2:5].tolist()
    with torch.no_grad():
        implicit = model(input_ids=ids, attention_mask=mask, labels=labels)
        explicit = model(input_ids=ids, attention_mask=mask, labels=labels, task_input_ids=task_ids,
                         task_attention_mask=task_mask)
    assert torch.equal(implicit.task_repr, explicit.task_repr) and torch.equal(implicit.logits, explicit.logits)


def test_generate_holds_the_task_weights_and_matches_full_forwards():
    """Greedy generation with the KV cache equals re-running the full forward with the same task input."""
    model = tiny_model("qwen2").eval()
    ids, mask, _ = batch(length=6, prompt=6)
    task_ids, task_mask = ids[:, 1:4], mask[:, 1:4]
    generated = model.generate(input_ids=ids, attention_mask=mask, task_input_ids=task_ids,
                               task_attention_mask=task_mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(4):
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses for left padding
            logits = model(input_ids=seq, attention_mask=seq_mask, position_ids=positions, task_input_ids=task_ids,
                           task_attention_mask=task_mask).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
    assert torch.equal(generated, seq)


def test_task_batch_must_match_the_lm_batch():
    model = tiny_model("qwen2")
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="task_input_ids has 3 rows but input_ids has 2"):
        model(input_ids=ids, attention_mask=mask, task_input_ids=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="task_attention_mask"):
        model(input_ids=ids, task_input_ids=ids[:, :4], task_attention_mask=mask)


def test_the_wrapped_base_model_never_routes_with_a_previous_batchs_task_weights():
    model = tiny_model("qwen2").eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        with pytest.raises(RuntimeError, match="task routing needs the task representation of this batch"):
            model.base_model(input_ids=ids, attention_mask=mask)


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ValueError, match=r"target modules \['qkv_proj'\] match no nn.Linear.*q_proj"):
        get_hmora_model(tiny_base("qwen2"), HMoRAConfig(target_modules=["q_proj", "qkv_proj"],
                                                        target_modules_lora=[]))


def test_unknown_family_needs_an_explicit_mapping():
    base = tiny_base("qwen2")
    base.config.model_type = "mystery"
    with pytest.raises(ValueError, match="model_type 'mystery' has no built-in default"):
        get_hmora_model(base, HMoRAConfig())
    model = get_hmora_model(base, HMoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"],
                                              target_modules_lora=["down_proj"], qkv_modules=["q_proj", "v_proj"],
                                              w_i_modules=[], num_experts=2, top_k=1, task_token_id=5))
    assert list(model.layer_kinds()) == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]


@pytest.mark.parametrize("overrides, hydra_rows", [
    ({"use_hydra_lora": False}, 8),                       # one A per expert: (E*r, d_in)
    ({"top_k_routing_strategy": False}, 2),               # soft routing: gates = p
    ({"renorm": "sum", "lora_scaling": "standard"}, 2),   # our options
    ({"use_task_router": False}, 2),                      # every layer token-only
    ({"task_router_only": True}, 2),                      # every layer task-only
    ({"num_router_mlp_layers": 2, "dropout": 0.1}, 2),    # deeper router, router_logits path with dropout
    ({"use_div_loss": False, "use_load_balancing_loss": True}, 2),
])
def test_config_variants_train(overrides, hydra_rows):
    model = tiny_model("qwen2", **overrides).train()
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    q_proj = model.base_model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A.shape == (hydra_rows, 32)
    assert torch.isfinite(out.loss)
    kinds = set(model.layer_kinds().values())
    assert kinds == ({"token"} if overrides.get("use_task_router") is False else
                     {"task"} if overrides.get("task_router_only") else {"token", "hybrid", "task"})
    gates = next(iter(out.router_gates.values()))
    assert torch.allclose(gates.sum(-1), torch.ones(()))
    if overrides.get("top_k_routing_strategy") is False:
        assert (gates > 0).all()


def test_triton_backend_in_the_model_matches_the_torch_backend():
    """The layers call the kernel ops with the config's backend; under TRITON_INTERPRET=1 (tests/conftest.py) the
    fused Triton kernels run on CPU tensors and must reproduce the torch backend, dropout masks included (the
    "philox" generator draws the same masks in every backend)."""
    pytest.importorskip("triton")
    ids, mask, labels = batch()
    results = {}
    for backend in ("torch", "triton"):
        model = tiny_model("qwen2", backend=backend, dropout=0.1, dropout_rng="philox").train()
        _, results[backend] = _grads_after_step(model, ids, mask, labels)
    for name, grad in results["torch"].items():
        diff = (results["triton"][name] - grad).abs().max().item()
        # fp32 sums in another order, amplified through 3 layers: reference vs torch differ by up to 2e-4 here
        assert diff <= 1e-3 * grad.abs().max().item() + 1e-6, name


def test_forward_survives_a_transformers_that_renames_output_fields(monkeypatch):
    """transformers 5.24 made every ModelOutput.__init__ rename `past_key_values=` to `cache=`; a release may rename
    any field. Our output must never pass the library's field names through its own constructor: simulate a
    renaming __init__ (both directions) and check the forward still returns the base model's cache, under the
    name the base model gave it."""
    from hmora.model import HMoRAOutput

    renames = {"past_key_values": "cache", "cache": "past_key_values", "hidden_states": "states"}
    original = HMoRAOutput.__init__

    def renaming_init(self, *args, **kwargs):
        original(self, *args, **{renames.get(k, k): v for k, v in kwargs.items()})

    monkeypatch.setattr(HMoRAOutput, "__init__", renaming_init)
    model = tiny_model("qwen2").eval()
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True, output_hidden_states=True)
    cache_names = {"cache", "past_key_values"} & set(out.keys())
    assert len(cache_names) == 1 and out[cache_names.pop()] is not None
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 8, VOCAB)


def test_soft_routing_load_balancing_divides_by_the_configured_top_k():
    """SPEC 4: the reference divides the frequencies by its top_k also under soft routing, where every gate is
    non-zero: each router's loss is E * sum_i prop_i * 1 / k = E / k = 2 at E 4, top_k 2 (E / E = 1 would be ours)."""
    model = tiny_model("qwen2", top_k_routing_strategy=False, top_k=2, use_div_loss=False,
                       use_load_balancing_loss=True).train()
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.aux_loss.item() == pytest.approx(2.0 * len(out.router_probs), rel=1e-6)
    assert out.task_aux_loss.item() == 0.0  # the task routers' loss is GJS only (use_div_loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_task_router_only_routes_every_token_of_a_sequence_by_its_task_weights():
    model = tiny_model("qwen2", task_router_only=True).train()
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert set(model.layer_kinds().values()) == {"task"} and out.router_probs == {}
    assert out.aux_loss.item() == 0.0 and out.task_aux_loss > 0
    for name, gates in out.router_gates.items():
        p_task = out.task_probs[name]
        _, expected = hmora_kernels.route(None, task_probs=p_task, kind="task", top_k=2, num_tokens=16)
        torch.testing.assert_close(gates.reshape(16, -1), expected)
    out.loss.backward()
    task_side = [n for n, p in model.named_parameters() if p.requires_grad and ("task_mlp" in n or "task_encoder" in n)]
    assert task_side and all(model.get_parameter(n).grad.abs().sum() > 0 for n in task_side)
    generated = model.eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                      pad_token_id=0)
    assert generated.shape == (2, 10)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deeper_routers_give_the_reference_backends_results(backend):
    """num_router_mlp_layers = 3 (d -> 32 -> 32 -> E, the router_logits path of the kernels) with dropout 0.1:
    values and gradients of every backend equal the reference backend's (the "philox" generator: triton's "native"
    masks are its Philox stream, the reference's are torch's)."""
    if backend == "triton":
        pytest.importorskip("triton")
    ids, mask, labels = batch()
    results = {}
    for name in ("reference", backend):
        model = tiny_model("qwen2", backend=name, dropout=0.1, num_router_mlp_layers=3, dropout_rng="philox").train()
        assert len(model.base_model.model.layers[0].self_attn.q_proj.router.token_mlp) == 5  # 3 Linear, 2 ReLU
        results[name] = _grads_after_step(model, ids, mask, labels)
    (loss_ref, grads_ref), (loss, grads) = results["reference"], results[backend]
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    for name, grad in grads_ref.items():
        diff = (grads[name] - grad).abs().max().item()
        assert diff <= 1e-3 * grad.abs().max().item() + 1e-6, name
