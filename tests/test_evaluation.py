"""The per-task routing report of hmora-train (hmora.evaluation) on a stand-in model whose gates are known: expert
usage over real tokens only, token-routed layers only, switch's dropped tokens, rank-wise experts summarised."""
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hmora import HMoRAConfig
from hmora.config import ROUTING_RECIPES
from hmora.data import QWEN2_TEMPLATE, encode_rows
from hmora.evaluation import format_routing_report, routing_report
from hmora.tiny import build_tiny_tokenizer, synthetic_rows

EXPERTS = 3
DROP = 7  # token ids divisible by 7 get no expert (as switch's capacity drops a token); the pad id 0 among them


class KnownGates:
    """Token-routed layers gate expert `id % EXPERTS` of each token, or none when `id % DROP == 0`; the task-only
    layer gates every expert (it must not count: usage is about the token routers)."""

    hmora_config = HMoRAConfig(**ROUTING_RECIPES["switch"], num_experts=EXPERTS)
    task_encoder = None
    device = torch.device("cpu")

    def layer_kinds(self):
        return {"layers.0.mlp": "token", "layers.1.mlp": "hybrid", "layers.2.mlp": "task"}

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask, task_input_ids, task_attention_mask):
        gates = F.one_hot(input_ids % EXPERTS, EXPERTS).float() * (input_ids % DROP != 0)[..., None]
        return SimpleNamespace(router_gates={"layers.0.mlp": gates, "layers.1.mlp": 0.5 * gates,
                                             "layers.2.mlp": torch.ones_like(gates)})


def test_expert_usage_counts_real_tokens_of_the_token_routed_layers():
    tokenizer, rows = build_tiny_tokenizer(), synthetic_rows(10, seed=3)
    report = routing_report(KnownGates(), tokenizer, QWEN2_TEMPLATE, rows, max_length=64, batch_size=4)
    for task in ("reverse", "sort", "add", "upper"):
        ids = [i for e in encode_rows(tokenizer, QWEN2_TEMPLATE, [r for r in rows if r["task"] == task], 64)
               for i in e.input_ids]  # every real token of the task's rows, unpadded
        kept = Counter(i % EXPERTS for i in ids if i % DROP)
        assert report["expert_usage"][task] == pytest.approx([kept[e] / len(ids) for e in range(EXPERTS)], abs=1e-4)
        assert report["dropped"][task] == pytest.approx(sum(i % DROP == 0 for i in ids) / len(ids), abs=1e-4)


def test_report_lines_of_switch_and_of_rank_wise_experts():
    report = {"expert_usage": {"add": [0.5, 0.25, 0.125], "sort": [0.0, 1.0, 0.0]}, "dropped": {"add": 0.125,
                                                                                                 "sort": 0.0}}
    lines = format_routing_report(KnownGates(), report, rows_without_task=2, what="eval rows").splitlines()
    assert lines[0].startswith("per-task expert usage on eval rows (switch: share of real tokens whose gate")
    assert lines[1].split() == ["task", "expert0", "expert1", "expert2", "dropped"]
    assert lines[2].split() == ["add", "0.500", "0.250", "0.125", "0.125"]
    assert lines[4] == "  (2 rows without a 'task' field are not in this report)"

    # rank-wise: E * r = 2 * 2 rank-1 experts, shown per expert as the number of its r ranks active per token
    rank_wise = SimpleNamespace(hmora_config=HMoRAConfig(**ROUTING_RECIPES["rank_wise"], num_experts=2, lora_r=2,
                                                         rank_top_k=2))
    lines = format_routing_report(rank_wise, {"expert_usage": {"add": [0.5, 0.25, 1.0, 0.005]}}).splitlines()
    assert lines[0].startswith("per-task expert usage on rows (rank_wise: 4 rank-1 experts, 2 active per token")
    assert lines[1].split() == ["task", "expert0", "expert1", "used"]
    assert lines[2].split() == ["add", "0.750", "1.005", "3/4"]  # 0.005: under 1% of the tokens, not used
