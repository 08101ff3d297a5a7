"""The routing variants in the model (HMoRAConfig.routing_variant, README "Routing variants"): config validation,
each recipe on a tiny Qwen2 (forward, backward, the loss as documented, gates of the variant's shape, checkpoint
round trip, generation), switch capacity and its layer kinds, router init and jitter, rank-wise routing's selection
bias (counts of real tokens, once per optimizer step, never from checkpoint recomputations; 2 processes agree)."""
import math

import pytest
import torch

import hmora_kernels as hk
from hmora import HMoRAConfig, HMoRAModel
from hmora.config import ROUTING_RECIPES
from hmora.context import ForwardContext

from distributed import spawn
from test_hmora_model import batch, tiny_base, tiny_model

VARIANTS = list(ROUTING_RECIPES)
RANK_TOP_K = 3  # of the E * r = 4 * 2 = 8 rank-1 experts of the tiny model


def variant_model(variant, perturb=True, **overrides):
    extra = {"rank_top_k": RANK_TOP_K} if variant == "rank_wise" else {}
    return tiny_model("qwen2", perturb=perturb, **{**ROUTING_RECIPES[variant], **extra, **overrides})


# ---- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(routing_variant="topp"), r"routing_variant: expected None .* or one of \('mixlora', 'switch'"),
    (dict(routing_variant="switch"), "routing_variant='switch' brings its own auxiliary loss; set use_div_loss=False"),
    (dict(routing_variant="switch", use_div_loss=False, use_load_balancing_loss=True),
     "set use_load_balancing_loss=False"),
    (dict(ROUTING_RECIPES["mixlora"], renorm="softmax"), "'mixlora' is top-k renormalised by sum"),
    (dict(ROUTING_RECIPES["top_p"], keep_top_k=9), r"keep_top_k: expected an integer in \[1, 8\], got 9"),
    (dict(ROUTING_RECIPES["rank_wise"], rank_top_k=65), r"rank_top_k: expected an integer in \[1, 64\]"),
    (dict(ROUTING_RECIPES["rank_wise"], use_hydra_lora=True), "set use_hydra_lora=False"),
    (dict(ROUTING_RECIPES["rank_wise"], use_task_router=True), "set use_task_router=False"),
    (dict(expert_capacity=0), "expert_capacity: expected an integer >= 1, got 0"),
    (dict(capacity_factor=0.0), "capacity_factor: expected a number > 0"),
    (dict(max_sequence_length=1.5), "max_sequence_length: expected an integer >= 1"),
    (dict(top_p=1.5), r"top_p: expected a value in \(0, 1\]"),
    (dict(entropy_index=0.0), r"entropy_index: expected a Tsallis index q in \(0, 2\]"),
    (dict(router_init_std=-1.0), "router_init_std: expected None"),
    (dict(router_jitter=1.0), r"router_jitter: expected a value in \[0, 1\)"),
    (dict(router_z_loss_coef=float("inf")), "router_z_loss_coef: expected a finite number >= 0"),
    (dict(router_bias="no"), "router_bias: expected True or False"),
])
def test_invalid_variant_settings_are_one_clear_line(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        HMoRAConfig(**overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_recipes_are_valid_and_round_trip_json(variant):
    config = HMoRAConfig(**ROUTING_RECIPES[variant])
    assert HMoRAConfig.from_dict(config.to_dict()) == config
    assert config.gate_top_k == (2 if variant == "mixlora" else None)


def test_capacity_and_rules_per_layer_kind():
    config = HMoRAConfig(**ROUTING_RECIPES["switch"], num_experts=8)
    assert config.capacity(8) == math.ceil(1.25 * 1024 / 8) == 160
    assert config.routing_rule("token") == config.routing_rule("hybrid") == hk.Switch(160)
    assert config.routing_rule("task") == hk.Switch(None)  # one expert per sequence: no capacity
    assert HMoRAConfig(**ROUTING_RECIPES["switch"], expert_capacity=7).routing_rule("token") == hk.Switch(7)
    assert HMoRAConfig(**ROUTING_RECIPES["top_p"]).routing_rule("task") == hk.TopP(0.75, 2, 0.9, 1.1, 1e-5)
    rank_wise = HMoRAConfig(**ROUTING_RECIPES["rank_wise"])
    assert rank_wise.routing_rule("token") == hk.RankWise(8) and rank_wise.router_experts == 64
    assert rank_wise.routed_scaling == 16 / 8  # SMoRA: alpha / k, the gates sum to k


# ---- each variant on a tiny model ------------------------------------------------------------------------------
def expected_terms(variant, model, router_inputs, mask):
    """The variant's losses, unweighted and averaged over the token routers, straight from the kernel ops on each
    router's logits recomputed from its captured input (dropout 0): what out.aux_loss_terms must hold."""
    config, terms = model.hmora_config, {}
    token_routers = [n for n, kind in model.layer_kinds().items() if kind != "task"]
    for name in token_routers:
        linear = model.base_model.get_submodule(name).router.token_mlp[0]
        logits = linear(router_inputs[name].float()).detach()
        flat = logits.reshape(-1, logits.shape[-1])
        if variant == "top_p":
            p_tok, gates = hk.route(flat, rule=config.routing_rule("token"))
            p_tok, gates = p_tok.view(logits.shape), gates.view(logits.shape)
            router = {"balance": hk.load_balancing_loss(p_tok, gates, 1, mask, frequencies="gate_values"),
                      "entropy": hk.entropy_loss(p_tok, config.entropy_index, config.entropy_eps, mask)}
        else:
            p_tok, gates = hk.route(flat, top_k=config.top_k if variant == "mixlora" else 1)
            router = {"balance": hk.load_balancing_loss(p_tok.view(logits.shape), gates.view(logits.shape), 1, mask)}
            if variant == "switch":
                router["z"] = hk.router_z_loss(logits, mask)
        for key, value in router.items():
            terms[key] = terms.get(key, 0) + value.item() / len(token_routers)
    return terms


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_with_its_loss_and_gates(variant):
    model = variant_model(variant).train()
    config = model.hmora_config
    ids, mask, labels = batch()
    router_inputs = {}
    hooks = [model.base_model.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: router_inputs.update({name: args[0]})) for name in model.layer_kinds()]
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    for hook in hooks:
        hook.remove()
    assert out.loss.item() == pytest.approx(config.lambda_lm * out.ce_loss.item() + out.aux_loss.item(), rel=1e-6)
    weights = {"balance": config.balance_loss_coef, "z": config.router_z_loss_coef, "entropy": config.entropy_loss_coef}
    assert out.aux_loss.item() == pytest.approx(sum(weights[k] * v.item() for k, v in out.aux_loss_terms.items()),
                                                rel=1e-6)
    if variant == "rank_wise":
        assert out.aux_loss.item() == 0.0 and out.aux_loss_terms == {}  # loss-free balancing
    else:
        expected = expected_terms(variant, model, router_inputs, mask)
        assert set(out.aux_loss_terms) == set(expected)
        for name, value in expected.items():
            assert out.aux_loss_terms[name].item() == pytest.approx(value, rel=1e-5), name
    real = mask.bool()
    for name, gates in out.router_gates.items():
        chosen = (gates != 0).sum(-1)
        if variant == "mixlora":
            assert (chosen == 2).all() and torch.allclose(gates.sum(-1), torch.ones(()))
        elif variant == "switch":  # no drops at this size: one expert per real token; pads none outside task layers
            assert (chosen[real] == 1).all()
            assert (chosen[~real] == (1 if model.layer_kinds()[name] == "task" else 0)).all()
        elif variant == "top_p":
            assert (chosen >= config.keep_top_k).all()
        else:
            assert (chosen == RANK_TOP_K).all() and torch.allclose(gates.sum(-1), torch.full((), RANK_TOP_K * 1.0))
    out.loss.backward()
    routers = {n: p for n, p in model.named_parameters() if ".router." in n}
    assert routers and all(p.grad is not None and p.grad.any() for p in routers.values())
    assert all(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if n.endswith("lora_B"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_checkpoint_round_trip_and_generate(tmp_path, variant):
    model = variant_model(variant).train()
    ids, mask, labels = batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    model.update_routing_bias()  # rank_wise: a bias off zero, saved and restored
    model.save_pretrained(tmp_path)
    reloaded = HMoRAModel.from_pretrained(tiny_base("qwen2"), tmp_path)
    assert reloaded.hmora_config == model.hmora_config
    state, restored = model.adapter_state_tensors(), reloaded.adapter_state_tensors()
    assert set(state) == set(restored) and all(torch.equal(t, restored[n]) for n, t in state.items())
    biases = model.adapter_named_buffers()
    assert bool(biases) == (variant == "rank_wise") and all(b.any() for b in biases.values())
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids, attention_mask=mask).logits,
                           reloaded.eval()(input_ids=ids, attention_mask=mask).logits)
    generated = reloaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                  pad_token_id=0)
    assert generated.shape == (2, 11)


def test_router_init_and_bias_of_the_recipes():
    for variant, std in (("mixlora", 0.02), ("switch", 0.02)):
        model = variant_model(variant, perturb=False)
        mlp = model.base_model.model.layers[1].self_attn.q_proj.router.token_mlp[0]
        assert mlp.bias is None
        weights = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("mlp.0.weight")])
        assert weights.std().item() == pytest.approx(std, rel=0.15)
    default = tiny_model("qwen2", perturb=False).base_model.model.layers[0].self_attn.q_proj.router.token_mlp[0]
    assert default.bias is not None and default.weight.abs().max() <= 1 / math.sqrt(32)  # nn.Linear's init


# ---- switch capacity in the model -------------------------------------------------------------------------------
def test_switch_capacity_drops_real_tokens_but_not_in_task_layers():
    """expert_capacity 1 over sequences of up to 8 real tokens and 4 experts: token and hybrid layers drop, task-only
    layers route every token (no capacity there)."""
    model = variant_model("switch", expert_capacity=1).eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    for name, kind in model.layer_kinds().items():
        routed = (out.router_gates[name] != 0).any(-1)
        if kind == "task":
            assert routed.all()
        else:  # at most one real token per expert and sequence keeps its expert
            assert not routed[~real].any()
            assert (routed.sum(-1) <= 4).all() and (routed[real].sum() < real.sum())


def test_token_mask_follows_the_layer_input():
    """The real-token mask a layer sees: the attention mask itself; in a cached generation step the last columns;
    with generation's expanded batch (beams) each row repeated; all ones without a mask."""
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    context = ForwardContext(attention_mask=mask)
    assert torch.equal(context.token_mask("q", (2, 4), "cpu"), mask.bool())
    assert context.token_mask("q", (2, 1), "cpu").tolist() == [[True], [True]]
    assert torch.equal(context.token_mask("q", (4, 4), "cpu"), mask.bool().repeat_interleave(2, 0))
    assert ForwardContext().token_mask("q", (2, 3), "cpu").all()
    with pytest.raises(ValueError, match="the attention mask has 2 rows but the layer input has 3 sequences"):
        context.token_mask("q", (3, 4), "cpu")


# ---- jitter ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True])
def test_router_jitter_is_redrawn_identically_under_activation_checkpointing(reentrant):
    model = variant_model("switch", router_jitter=0.1, dropout=0.1).train()
    ids, mask, labels = batch()

    def step():
        model.zero_grad()
        torch.manual_seed(5)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    logits, grads = step()
    torch.manual_seed(6)
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)  # the noise is drawn anew
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    logits_ckpt, grads_ckpt = step()
    assert torch.equal(logits, logits_ckpt)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    model.eval()
    with torch.no_grad():  # no jitter outside training
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


# ---- rank-wise selection bias ------------------------------------------------------------------------------------
def rank_wise_counts(model, ids, mask):
    """Per router: the real tokens each rank-1 expert was selected for in one forward, from its gates."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return {name: ((g != 0) & mask.bool()[..., None]).sum((0, 1)) for name, g in out.router_gates.items()}


def test_rank_wise_bias_update_once_per_step_from_real_tokens():
    model = variant_model("rank_wise", dropout=0.0).eval()
    ids, mask, labels = batch()
    expected = rank_wise_counts(model, ids, mask)  # eval forwards are not counted
    model.train()
    for _ in range(2):  # an accumulation window of two micro-batches
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    counts = model.update_routing_bias()
    u = model.hmora_config.bias_update_rate
    for name, count in counts.items():
        assert torch.equal(count, 2 * expected[name])
        assert count.sum() == 2 * RANK_TOP_K * mask.sum()  # 14 real tokens (2 pads), k experts each
        bias = model.get_buffer(f"base_model.{name}.router.selection_bias")
        torch.testing.assert_close(bias, u * torch.sign(count.double().mean() - count.double()).float())
    assert all(c.sum() == 0 for c in model.update_routing_bias().values())  # counting restarted after the update


@pytest.mark.parametrize("reentrant", [False, True])
def test_rank_wise_counts_skip_checkpoint_recomputations(reentrant):
    ids, mask, labels = batch()
    results = []
    for checkpointing in (False, True):
        model = variant_model("rank_wise", dropout=0.1).train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        torch.manual_seed(3)
        model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        results.append(model.update_routing_bias())
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_rank_wise_bias_update_hooks_the_optimizer_and_changes_selection():
    model = variant_model("rank_wise", bias_update_rate=0.5).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    handle = model.register_routing_bias_update(optimizer)
    ids, mask, labels = batch()
    before = rank_wise_counts(model.eval(), ids, mask)
    model.train()(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(not b.any() for b in model.adapter_named_buffers().values())
    optimizer.step()
    assert all(b.abs().max() == 0.5 for b in model.adapter_named_buffers().values())
    after = rank_wise_counts(model.eval(), ids, mask)  # lr 0: only the bias moved, and it moved the selection
    assert any(not torch.equal(before[n], after[n]) for n in before)
    handle.remove()


def test_update_routing_bias_is_a_no_op_without_rank_wise_routing():
    model = variant_model("switch")
    assert model.update_routing_bias() == {} and model.adapter_named_buffers() == {}


def rank_wise_ranks(rank: int, world: int, out_dir: str) -> None:
    """One forward on this rank's sequence under DDP, one bias update; saves the bias."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = variant_model("rank_wise").train()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    ids, mask, labels = batch(rows=world)
    shard = slice(rank, rank + 1)
    wrapped(input_ids=ids[shard], attention_mask=mask[shard], labels=labels[shard]).loss.backward()
    model.update_routing_bias()
    torch.save(model.adapter_named_buffers(), f"{out_dir}/rank{rank}.pt")


@pytest.mark.distributed
def test_rank_wise_bias_is_the_same_on_every_rank_and_sums_their_counts(tmp_path):
    spawn(rank_wise_ranks, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = variant_model("rank_wise").train()  # one process: both sequences, one update
    ids, mask, labels = batch(rows=2)
    for row in range(2):
        model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], labels=labels[row:row + 1])
    model.update_routing_bias()
    expected = model.adapter_named_buffers()
    assert any(b.any() for b in expected.values())
    for name, bias in expected.items():
        assert torch.equal(ranks[0][name], bias) and torch.equal(ranks[1][name], bias), name
