"""CPU time of one hybrid decoder layer of Qwen2-1.5B shape inside a real transformers model, forward + backward.

Each implementation is a one-layer Qwen2ForCausalLM with the same frozen base weights:
  bare           the Qwen2 layer as it is (its input requires grad, as in a layer whose predecessors are adapted);
  stand-in       the reference implementation's structure in plain PyTorch: one `nn.Dropout` per adapter and
                 router input, the router's gates computed by q_proj / gate_proj and read by the others, each
                 adapter output `F.linear(...) * s + residual`, top-k gates as `softmax(full(min).scatter(topk))`,
                 a task encoder and task routers, loss = CE + 0.005 * the token routers' GJS;
  hmora          `get_hmora_model` with the torch backend, the "native" dropout generator;
  hmora-philox   the same with the bit-exact "philox" generator;
  hmora+compile  torch.compile(hmora model), the default inductor backend.
The setting is the paper's: E 8, r 8, Hydra, top-2, task router, q/k/v and gate/up router sharing, plain LoRA on
o/down, constrained-GJS auxiliary loss. The layer is layer 14 of 28 (hybrid routing): the one-layer model gets
`max_llm_layer` 27 and the `alpha_shift` that gives its layer 0 layer 14's initial mixing weight.

Every implementation runs once per round, the rounds interleaved. A row gives the median step time and the added
time: the median over rounds of (step - bare step of the same round), so that a load drifting over the run
cancels out of the differences.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import hmora_kernels as hk

NUM_LAYERS, LAYER_INDEX = 28, 14  # the layer is layer 14 of Qwen2-1.5B's 28: hybrid routing
VOCAB = 1024  # cut from 151,936: the LM head is the same in every implementation and only adds noise
SOURCE_TOKENS = 16  # the task encoder's input per sequence
IMPLEMENTATIONS = ("bare", "stand-in", "hmora", "hmora-philox", "hmora+compile")
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


@dataclass(frozen=True)
class LayerShape:
    """A Qwen2 decoder layer's shape (its config.json)."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int


QWEN2_1_5B_LAYER = LayerShape("qwen2-1.5b", hidden=1536, intermediate=8960, heads=12, kv_heads=2)


@dataclass(frozen=True)
class LayerSetting:
    """The paper setting on one decoder layer; `tokens` = batch x sequence."""

    shape: LayerShape = QWEN2_1_5B_LAYER
    dropout: float = 0.1
    batch: int = 1
    seq_len: int = 1024
    num_experts: int = 8
    rank: int = 8
    top_k: int = 2
    backend: str = "torch"
    dropout_rng: str = "native"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def hybrid_alpha_shift() -> float:
    """alpha_shift that gives layer 0 of a 28-layer schedule the initial alpha of layer 14 (eps_alpha 2)."""
    return 2.0 * 2.0 * LAYER_INDEX / (NUM_LAYERS - 1)


def build_base(shape: LayerShape, seed: int = 0):
    """A one-layer Qwen2ForCausalLM of the given layer shape, random weights, fp32, frozen, in training mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, num_hidden_layers=1, tie_word_embeddings=True, hidden_size=shape.hidden,
                         intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, rms_norm_eps=1e-6, rope_theta=1_000_000.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).float()
    return model.requires_grad_(False).train()


def hmora_config(s: LayerSetting):
    from hmora import HMoRAConfig

    return HMoRAConfig(num_experts=s.num_experts, lora_r=s.rank, lora_alpha=s.rank, use_hydra_lora=True,
                       top_k_routing_strategy=True, top_k=s.top_k, use_task_router=True, dropout=s.dropout,
                       target_modules_lora=["o_proj", "down_proj"], max_llm_layer=NUM_LAYERS - 1,
                       alpha_shift=hybrid_alpha_shift(), backend=s.backend, dropout_rng=s.dropout_rng)


# ---------------------------------------------------------------- the stand-in for the reference implementation


class StandInRouter(nn.Module):
    """Hybrid token router with its task router: p = (1 - sigmoid(a)) softmax(W drop(x)) + sigmoid(a) p_task."""

    def __init__(self, d_in: int, d_task: int, num_experts: int, top_k: int, alpha: float, p: float):
        super().__init__()
        self.token = nn.Sequential(nn.Dropout(p), nn.Linear(d_in, num_experts))
        self.task = nn.Sequential(nn.Dropout(p), nn.Linear(d_task, num_experts))
        self.alpha = nn.Parameter(torch.tensor(alpha))
        self.top_k = top_k
        self.task_weight: Optional[torch.Tensor] = None
        self.p_tok: Optional[torch.Tensor] = None
        self.gates: Optional[torch.Tensor] = None

    def set_task(self, task_repr: torch.Tensor) -> None:
        self.task_weight = F.softmax(self.task(task_repr), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.p_tok = F.softmax(self.token(x), dim=-1)
        a = torch.sigmoid(self.alpha)
        p = (1 - a) * self.p_tok + a * self.task_weight.unsqueeze(-2)
        values, index = torch.topk(p, self.top_k, dim=-1)
        self.gates = torch.softmax(torch.full_like(p, torch.finfo(p.dtype).min).scatter(-1, index, values), dim=-1)
        return self.gates


class StandInAdapter(nn.Module):
    """A frozen Linear plus either E Hydra experts gated by a router, or a plain LoRA; its own nn.Dropout."""

    def __init__(self, base: nn.Linear, rank: int, num_experts: int, scaling: float, p: float,
                 router: Optional[StandInRouter], owns_router: bool):
        super().__init__()
        self.base = base
        self.dropout = nn.Dropout(p)
        self.A = nn.Parameter(torch.empty(rank, base.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        columns = rank * (num_experts if router is not None else 1)
        self.B = nn.Parameter(torch.randn(base.out_features, columns) * 0.01)
        self.rank, self.num_experts, self.scaling = rank, num_experts, scaling
        self.routers = [router] if router is not None else []  # a list: the owner registers the module
        if owns_router:
            self.router = router
        self.owns_router = owns_router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = F.linear(x, self.base.weight, self.base.bias)
        h = F.linear(self.dropout(x), self.A)
        if self.routers:
            router = self.routers[0]
            gates = router(x) if self.owns_router else router.gates
            h = h.unsqueeze(-2).expand(*h.shape[:-1], self.num_experts, self.rank)
            h = (h * gates.unsqueeze(-1)).reshape(*h.shape[:-2], -1)
        y = F.linear(h, self.B) * self.scaling
        return y.to(residual.dtype) + residual


class StandInModel(nn.Module):
    """The base model with stand-in adapters; loss = CE + lambda * sum of the token routers' GJS losses."""

    def __init__(self, base: nn.Module, s: LayerSetting):
        super().__init__()
        from hmora.task_encoder import TaskEncoder

        self.base = base
        d = base.config.hidden_size
        alpha = -2.0 + hybrid_alpha_shift()
        scaling = s.rank / math.sqrt(s.rank)
        self.routers = nn.ModuleList()
        for layer in base.model.layers:
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                router = StandInRouter(d, d, s.num_experts, s.top_k, alpha, s.dropout)
                self.routers.append(router)
                for i, name in enumerate(names):
                    plain = name in ("o_proj", "down_proj")
                    adapter = StandInAdapter(getattr(parent, name), s.rank, s.num_experts, scaling, s.dropout,
                                             None if plain else router, owns_router=i == 0)
                    setattr(parent, name, adapter)
        self.task_encoder = TaskEncoder(d, 16, 1, s.dropout, torch.zeros(d))  # as hmora's: 16 heads, one layer

    def forward(self, inputs_embeds, labels, task_input_ids):
        embeds = self.base.get_input_embeddings()(task_input_ids)
        task_repr = self.task_encoder(embeds, torch.ones_like(task_input_ids))
        for router in self.routers:
            router.set_task(task_repr)
        logits = self.base(inputs_embeds=inputs_embeds).logits
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        aux = sum(hk.gjs_loss(r.p_tok, 0.5, 0.98, backend="torch") for r in self.routers)
        return ce + 0.005 * aux


# ---------------------------------------------------------------- the steps and their timing


@dataclass
class LayerInputs:
    embeds: torch.Tensor
    labels: torch.Tensor
    task_input_ids: torch.Tensor


def make_inputs(s: LayerSetting, seed: int = 0) -> LayerInputs:
    gen = torch.Generator().manual_seed(seed)
    d = s.shape.hidden
    embeds = (torch.randn(s.batch, s.seq_len, d, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, VOCAB, (s.batch, s.seq_len), generator=gen)
    task_ids = torch.randint(0, VOCAB, (s.batch, SOURCE_TOKENS), generator=gen)
    return LayerInputs(embeds, labels, task_ids)


def _ce(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def build_steps(s: LayerSetting, implementations: Sequence[str] = IMPLEMENTATIONS,
                seed: int = 0) -> Dict[str, Callable[[LayerInputs], torch.Tensor]]:
    """implementation -> step(inputs) running forward + backward and returning the loss. Each implementation gets
    its own copy of the same base weights (seed); "hmora+compile" is torch.compile of the hmora model (inductor)."""
    from hmora import get_hmora_model

    steps = {}
    for impl in implementations:
        base = build_base(s.shape, seed)
        if impl == "bare":
            module = base

            def forward(i, model=base):
                return _ce(model(inputs_embeds=i.embeds).logits, i.labels)
        elif impl == "stand-in":
            module = StandInModel(base, s)

            def forward(i, model=module):
                return model(i.embeds, i.labels, i.task_input_ids)
        elif impl in ("hmora", "hmora-philox", "hmora+compile"):
            rng = "philox" if impl == "hmora-philox" else s.dropout_rng
            module = get_hmora_model(base, hmora_config(replace(s, dropout_rng=rng))).train()
            model = torch.compile(module) if impl == "hmora+compile" else module

            def forward(i, model=model):
                return model(inputs_embeds=i.embeds, labels=i.labels, task_input_ids=i.task_input_ids).loss
        else:
            raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {impl!r}")
        params = [p for p in module.parameters() if p.requires_grad]

        def step(i, forward=forward, params=params):
            loss = forward(i)
            loss.backward()
            i.embeds.grad = None
            for p in params:
                p.grad = None
            return loss.detach()

        steps[impl] = step
    return steps


def time_interleaved(steps: Dict[str, Callable[[LayerInputs], torch.Tensor]], inputs: LayerInputs, rounds: int,
                     clock: Callable[[], float] = time.perf_counter) -> Tuple[Dict[str, float], Dict[str, List[float]]]:
    """(seconds of each implementation's first step, which compiles what is compiled; seconds per step of each
    implementation, one step each per round, in round-robin order).

    `clock`: wall time by default; `time.process_time` counts only this process's CPU time (a steadier measure
    with one thread on a loaded machine; with several threads it also counts their spin-waits)."""
    first: Dict[str, float] = {}
    for name, step in steps.items():
        start = clock()
        step(inputs)
        first[name] = clock() - start
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = clock()
            step(inputs)
            samples[name].append(clock() - start)
    return first, samples


def added_time(samples: Dict[str, List[float]], name: str) -> float:
    """Median over rounds of (this implementation's time - the bare layer's time in the same round)."""
    return statistics.median(t - bare for t, bare in zip(samples[name], samples["bare"]))


@dataclass(frozen=True)
class LayerCase:
    """One setting of the decoder layer, its implementations timed side by side at `threads` torch threads."""

    setting: LayerSetting
    implementations: Tuple[str, ...]
    threads: int = 2
    section: str = "decoder-layer"
    max_rounds: Optional[int] = None  # for slow rows whose added time is many times the noise

    def run(self, rounds: int, threads: Optional[int] = None, clock: str = "wall") -> List[Dict[str, object]]:
        """Rows: median seconds per step, added seconds over the bare layer and their ratio to the stand-in's.
        clock: "wall" or "process" (this process's CPU time, see `time_interleaved`)."""
        threads = threads or self.threads
        rounds = min(rounds, self.max_rounds or rounds)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            steps = build_steps(self.setting, self.implementations)
            first, samples = time_interleaved(steps, make_inputs(self.setting), rounds, CLOCKS[clock])
        finally:
            torch.set_num_threads(previous)
        s = self.setting
        standin = added_time(samples, "stand-in") if "stand-in" in samples else None
        rows = []
        for name, times in samples.items():
            added = added_time(samples, name)
            note = f"first step (compiling) {first[name]:.0f} s" if name == "hmora+compile" else ""
            rows.append({
                "section": self.section, "model": s.shape.name, "layer": f"{LAYER_INDEX} of {NUM_LAYERS}, hybrid",
                "tokens": s.tokens, "experts": s.num_experts, "rank": s.rank, "dropout": s.dropout,
                "dtype": "float32", "threads": threads, "clock": clock, "rounds": rounds, "implementation": name,
                "dropout_rng": {"hmora-philox": "philox", "hmora": s.dropout_rng,
                                "hmora+compile": s.dropout_rng}.get(name, "nn.Dropout" if name == "stand-in" else ""),
                "cpu_s": statistics.median(times), "cpu_s_rounds": times, "first_step_s": first[name],
                "added_s": added, "added_vs_standin": None if not standin else added / standin, "note": note,
            })
        return rows
