"""torch.compile of an HMoRA model with dropout on: graphs and graph breaks, compile time, loss and gradients
against eager (issue 12). The numbers behind docs/BENCHMARKS.md's torch.compile paragraph.

    python -m benchmarks.compile_check                 # explain + compile the tiny model (a few minutes)
    python -m benchmarks.compile_check --explain-only  # graphs and breaks only (seconds)
    python -m benchmarks.compile_check --layer         # + explain the layer-cpu model (Qwen2-1.5B layer 14 of 28)

The tiny model is near the issue's (2 layers, hidden 64): a 3-layer Qwen2 of hidden 64 (a token-, a hybrid- and a
task-routed layer), the paper's HMoRA setting but E 4, r 2, dropout 0.1.
Graph breaks come from `torch._dynamo.explain` on the training forward (loss included); compile time is the first
compiled forward + backward (inductor, `fallback_random`, so that compiled masks are eager's and the losses can be
compared exactly; without it inductor draws other masks of the same distribution).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict, Optional

import torch

VOCAB = 128


def tiny_hmora(dropout_rng: str, layers: int = 3, hidden: int = 64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hmora import HMoRAConfig, get_hmora_model

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=0))
    # 3 layers: the schedule makes them token-, hybrid- and task-routed, one of each
    config = HMoRAConfig(num_experts=4, lora_r=2, task_token_id=5, dropout=0.1, dropout_rng=dropout_rng)
    model = get_hmora_model(base, config).train()
    with torch.no_grad():  # off the init (B = 0 would hide the adapters)
        for param in model.adapter_named_parameters().values():
            param.add_(0.3 * torch.randn(param.shape))
    return model


def tiny_batch(rows: int = 2, length: int = 16) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(6, VOCAB, (rows, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
            "task_input_ids": ids[:, :5], "task_attention_mask": torch.ones_like(ids[:, :5]), "use_cache": False}


def explain(model, inputs: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Dynamo's view of one training forward: graphs, breaks and why."""
    torch._dynamo.reset()
    result = torch._dynamo.explain(lambda: model(**inputs).loss)()
    return {"graphs": result.graph_count, "graph_breaks": result.graph_break_count,
            "break_reasons": sorted({str(b.reason).splitlines()[0] for b in result.break_reasons})}


def _step(module, model, inputs, seed: int = 123):
    torch.manual_seed(seed)  # this step's masks
    loss = module(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def compile_against_eager(model, inputs) -> Dict[str, object]:
    """Seconds of the first compiled step (fullgraph, inductor), of a second one, and the differences to eager."""
    import torch._inductor.config as inductor_config

    start = time.perf_counter()
    loss, grads = _step(model, model, inputs)
    eager_s = time.perf_counter() - start
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with inductor_config.patch(fallback_random=True):
        start = time.perf_counter()
        compiled_loss, compiled_grads = _step(compiled, model, inputs)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        _step(compiled, model, inputs)
        second_s = time.perf_counter() - start
    worst = max(((compiled_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                for n, g in grads.items())
    return {"first_compiled_step_s": round(first_s, 1), "second_compiled_step_s": round(second_s, 4),
            "eager_step_s": round(eager_s, 4), "loss_eager": loss.item(), "loss_compiled": compiled_loss.item(),
            "loss_abs_diff": abs(compiled_loss - loss).item(), "gradients": len(grads),
            "worst_grad_diff_over_max": worst}


def layer_explain(dropout: float) -> Dict[str, object]:
    """Graphs and breaks of the layer-cpu hmora model (benchmarks.decoder_layer) at T 128."""
    from .decoder_layer import LayerSetting, build_base, hmora_config, make_inputs

    from hmora import get_hmora_model

    setting = LayerSetting(dropout=dropout, seq_len=128)
    model = get_hmora_model(build_base(setting.shape), hmora_config(setting)).train()
    i = make_inputs(setting)
    torch._dynamo.reset()
    result = torch._dynamo.explain(
        lambda: model(inputs_embeds=i.embeds, labels=i.labels, task_input_ids=i.task_input_ids).loss)()
    return {"graphs": result.graph_count, "graph_breaks": result.graph_break_count}


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--explain-only", action="store_true", help="graphs and breaks, no compilation")
    parser.add_argument("--layer", action="store_true", help="also explain the layer-cpu model at dropout 0.1")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"torch": torch.__version__}
    inputs = tiny_batch()
    for rng in ("native", "philox"):
        model = tiny_hmora(rng)
        report[f"tiny_{rng}"] = {"layer_kinds": sorted(set(model.layer_kinds().values())),
                                 "explain": explain(model, inputs)}
        if not args.explain_only:
            report[f"tiny_{rng}"]["compile"] = compile_against_eager(model, inputs)
    if args.layer:
        report["layer_cpu_T128_dropout_0.1"] = layer_explain(0.1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
