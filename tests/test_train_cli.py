"""hmora-train / hmora-generate end to end on tiny models (a handful of steps): the embedded default's code path,
exact resume through the command line, local Qwen2 / LLaMA / BLOOM directories, and the errors users meet."""
import ast
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hmora.cli import generate_main, train_main
from hmora.tiny import build_tiny_tokenizer, synthetic_rows
from interruption import run_interrupted_after

FAST = ["--batch_size", "4", "--log_steps", "2", "--max_new_tokens", "4"]


def adapter_tensors(checkpoint):
    return load_file(os.path.join(checkpoint, "adapter", "hmora_adapter.safetensors"))


def test_default_run_trains_saves_reloads_and_generates(tmp_path, capsys):
    out_dir = str(tmp_path / "run")
    assert train_main(["--output_dir", out_dir, "--max_steps", "4", *FAST]) == 0
    printed = capsys.readouterr().out
    checkpoint = os.path.join(out_dir, "checkpoint-4")
    assert sorted(os.listdir(checkpoint)) == ["adapter", "base", "run.json", "tokenizer", "training_state.pt"]
    assert "per-task routing" in printed and all(task in printed for task in ("reverse", "sort", "add", "upper"))
    # the demo's first line, then hmora-generate on its own from the run directory: the same greedy answer
    demo = synthetic_rows(1, seed=2)[0]
    line = next(ln for ln in printed.splitlines() if ln.strip().startswith(repr(demo["source"])))
    answer = ast.literal_eval(line.split(" -> ", 1)[1].rsplit(" (target", 1)[0])
    assert generate_main(["--checkpoint", out_dir, "--prompt", demo["source"], "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out == answer + "\n"


def test_resumed_command_line_run_matches_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    # dropout 0.1: the resumed run must also continue the random stream of the dropout masks
    flags = ["--max_steps", "4", "--save_steps", "2", "--accumulation_steps", "2", "--dropout", "0.1", *FAST]
    assert train_main(["--output_dir", str(tmp_path / "a"), *flags]) == 0
    run_interrupted_after(monkeypatch, "checkpoint-2", lambda: train_main(["--output_dir", str(tmp_path / "b"), *flags]))
    assert train_main(["--output_dir", str(tmp_path / "b"), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    straight = adapter_tensors(tmp_path / "a" / "checkpoint-4")
    resumed = adapter_tensors(tmp_path / "b" / "checkpoint-4")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def _tiny_config(family, tokenizer):
    from transformers import BloomConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "bloom":
        return BloomConfig(hidden_size=32, n_layer=2, n_head=2, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=1, n_head=2, **common)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, **common)
    return (LlamaConfig if family == "llama" else Qwen2Config)(**shape)


def local_model(tmp_path, family):
    """A local transformers directory: a tiny random model of `family` and the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    path = tmp_path / family
    AutoModelForCausalLM.from_config(_tiny_config(family, tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def jsonl(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# each built-in family with its own prompt template; LLaMA also under bf16 autocast, BLOOM without task router
@pytest.mark.parametrize("family,template,extra", [
    ("qwen2", "qwen2", []), ("llama", "llama2", ["--bf16"]), ("bloom", "bloom", ["--no-use_task_router"]),
])
def test_local_model_and_dataset(tmp_path, capsys, family, template, extra):
    model = local_model(tmp_path, family)
    dataset = jsonl(tmp_path, synthetic_rows(12, seed=5))
    out_dir = str(tmp_path / "run")
    # num_experts 2 / r 2 keep it small; the hidden size 32 needs fewer than the default 16 encoder heads
    assert train_main(["--model", model, "--dataset", dataset, "--output_dir", out_dir, "--max_steps", "2",
                       "--num_experts", "2", "--lora_r", "2", "--num_encoder_heads", "2", *FAST, *extra]) == 0
    printed = capsys.readouterr().out
    # the rows carry a 'task' field, so routing is reported per task where there are task routers
    assert ("per-task routing" in printed) == ("--no-use_task_router" not in extra)
    with open(os.path.join(out_dir, "checkpoint-2", "run.json")) as f:
        run = json.load(f)
    assert (run["base_model"], run["template"], run["dataset"]) == (model, template, dataset)
    assert not os.path.exists(os.path.join(out_dir, "checkpoint-2", "base"))  # the base stays where it is
    assert generate_main(["--checkpoint", out_dir, "--prompt", "add: 1+2", "upper: abc",
                          "--max_new_tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 2


def test_errors_users_meet(tmp_path, capsys):
    def error_of(main, argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    out = ["--output_dir", str(tmp_path / "run")]
    assert "does not exist" in error_of(train_main, ["--dataset", str(tmp_path / "nope.parquet"), *out])
    no_target = jsonl(tmp_path, [{"source": "a", "answer": "b"}])
    assert "'target' missing" in error_of(train_main, ["--dataset", no_target, *out])
    gpt2 = local_model(tmp_path, "gpt2")
    assert "no prompt template for model family 'gpt2'" in error_of(train_main, ["--model", gpt2, *out])
    assert "expected a local transformers model directory" in error_of(train_main, ["--model", str(tmp_path), *out])
    assert "neither a checkpoint directory" in error_of(train_main, ["--resume", *out])
    assert "drop ['lora_r']" in error_of(train_main, ["--resume", "--lora_r", "4", *out])
    assert "HMoRAConfig.num_experts" in error_of(train_main, ["--num_experts", "0", *out])
    assert "neither a checkpoint directory" in error_of(generate_main, ["--checkpoint", str(tmp_path),
                                                                        "--prompt", "hi"])
    damaged = tmp_path / "checkpoint-1"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"base_model": ')
    assert "not valid JSON" in error_of(generate_main, ["--checkpoint", str(damaged), "--prompt", "hi"])
    (damaged / "run.json").write_text('{"base_model": "base"}')
    assert "not written by hmora-train" in error_of(generate_main, ["--checkpoint", str(damaged), "--prompt", "hi"])


def test_reference_command_line_gives_the_reference_config():
    """The fixture's example_train.py flags, parsed by hmora-train, give the config the reference wrote."""
    import dataclasses

    from hmora import HMoRAConfig
    from hmora.cli import method_flags, train_parser, training_args

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "qwen2_paper")
    with open(os.path.join(fixture, "manifest.json")) as f:
        flags = json.load(f)["example_train_flags"]
    with open(os.path.join(fixture, "reference_adapter", "config.json")) as f:
        reference = HMoRAConfig.from_dict(json.load(f)).to_dict()
    args = train_parser().parse_args(flags)
    ours = HMoRAConfig(**method_flags(args)).to_dict()
    filled_from_the_base = ("target_modules", "max_llm_layer", "hidden_size", "model_type", "task_token_id")
    for name in set(reference) - set(filled_from_the_base) - {"label_smoothing"}:
        assert ours[name] == reference[name], name
    assert ours["label_smoothing"] == 0.1  # a training-script flag in the reference, a config field here
    assert dataclasses.asdict(training_args(args, {}))["eta_b"] == 1.2
