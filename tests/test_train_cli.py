"""hmora-train / hmora-generate end to end on tiny models (a handful of steps): the embedded default's code path,
exact resume through the command line, local Qwen2 / LLaMA / BLOOM directories, and the errors users meet."""
import ast
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hmora.cli import generate_main, train_main  # noqa: E402
from hmora.plot import plot_main  # noqa: E402
from hmora.tiny import build_tiny_tokenizer, synthetic_rows  # noqa: E402
from interruption import ctrl_c_during_step, run_interrupted_after  # noqa: E402

FAST = ["--batch_size", "4", "--log_steps", "2", "--max_new_tokens", "4"]
# the tiny default with a smaller evaluation (4 rows generated)
SMALL_DEFAULT = [*FAST, "--eval_generate", "4"]


def adapter_tensors(checkpoint):
    return load_file(os.path.join(checkpoint, "adapter", "hmora_adapter.safetensors"))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_default_run_trains_evaluates_plots_saves_reloads_and_generates(tmp_path, capsys):
    out_dir = str(tmp_path / "run")
    assert train_main(["--output_dir", out_dir, "--max_steps", "4", "--eval_steps", "2", *FAST]) == 0
    printed = capsys.readouterr().out
    checkpoint = os.path.join(out_dir, "checkpoint-4")
    assert sorted(os.listdir(out_dir)) == ["checkpoint-4", "metrics.jsonl", "metrics.png", "tensorboard"]
    assert sorted(os.listdir(checkpoint)) == ["adapter", "base", "run.json", "tokenizer", "training_state.pt"]
    assert "per-task routing on eval rows" in printed
    assert all(task in printed for task in ("reverse", "sort", "add", "upper"))
    # the metrics file, read back: a line per step, and the evaluations at steps 2 and 4 on the held-out rows
    records = read_metrics(out_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert all(r["lr"] > 0 and r["grad_norm"] > 0 and 0 < r["routing_entropy"] < math.log(4) for r in steps[1:])
    for r in evals:
        assert 0 <= r["eval_token_accuracy"] <= 1 and 0 <= r["eval_exact_match"] <= 1 and r["eval_loss"] > 0
        assert sorted(r["eval_task_routing"]) == ["add", "reverse", "sort", "upper"]
        assert all(sum(p) == pytest.approx(1, abs=1e-3) for p in r["eval_task_routing"].values())
    # the plot: a PNG of three panels drawn from that file
    image = plt.imread(os.path.join(out_dir, "metrics.png"))
    assert image.shape[0] > image.shape[1] > 500
    # the demo's first line (an eval row), then hmora-generate on its own from the run directory: the same answer
    demo = synthetic_rows(1, seed=1)[0]
    line = next(ln for ln in printed.splitlines() if ln.strip().startswith(repr(demo["source"])))
    answer = ast.literal_eval(line.split(" -> ", 1)[1].rsplit(" (target", 1)[0])
    assert generate_main(["--checkpoint", out_dir, "--prompt", demo["source"], "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out == answer.replace("\n", "\\n") + "\n"


def test_tensorboard_events_hold_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tmp_path / "run"
    assert train_main(["--output_dir", str(out_dir), *SMALL_DEFAULT, "--max_steps", "3", "--eval_steps", "3"]) == 0
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/routing_entropy", "eval/loss"} <= set(events.Tags()["scalars"])
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in read_metrics(out_dir) if "loss" in r]


def test_hmora_plot_draws_a_run_and_says_what_is_missing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "ce": 2.9 / s, "lr": 1e-3,
                                                           "routing_entropy": 1.0}) + "\n" for s in range(1, 5)))
    out = tmp_path / "curves.png"
    assert plot_main([str(run), "--output", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n" and plt.imread(out).ndim == 3
    assert plot_main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


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


# num_experts 2 / r 2 keep it small; the hidden size 32 needs fewer than the default 16 encoder heads
TINY_METHOD_FLAGS = ["--num_experts", "2", "--lora_r", "2", "--num_encoder_heads", "2"]


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
    assert train_main(["--model", model, "--dataset", dataset, "--output_dir", out_dir, "--max_steps", "2",
                       *TINY_METHOD_FLAGS, *FAST, *extra]) == 0
    printed = capsys.readouterr().out
    # the rows carry a 'task' field, so routing is reported per task: the task routers' probabilities, or without
    # task routers the share of tokens each expert gets
    assert ("per-task routing on training rows" if "--no-use_task_router" not in extra else
            "per-task expert usage on training rows (HMoRA token routing: share of real tokens") in printed
    with open(os.path.join(out_dir, "checkpoint-2", "run.json")) as f:
        run = json.load(f)
    assert (run["base_model"], run["template"], run["dataset"]) == (model, template, dataset)
    assert not os.path.exists(os.path.join(out_dir, "checkpoint-2", "base"))  # the base stays where it is
    assert generate_main(["--checkpoint", out_dir, "--prompt", "add: 1+2", "upper: abc",
                          "--max_new_tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 2


def error_of(capsys, main, argv):
    """The one line a bad command line prints, with exit status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def argparse_error_of(capsys, main, argv):
    """The one line argparse prints for a bad flag value (it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_errors_users_meet(tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "run")]
    assert "does not exist" in error_of(capsys, train_main, ["--dataset", str(tmp_path / "nope.parquet"), *out])
    no_target = jsonl(tmp_path, [{"source": "a", "answer": "b"}])
    assert "'target' missing" in error_of(capsys, train_main, ["--dataset", no_target, *out])
    gpt2 = local_model(tmp_path, "gpt2")
    assert "no prompt template for model family 'gpt2'" in error_of(capsys, train_main, ["--model", gpt2, *out])
    assert "expected a local transformers model directory" in error_of(capsys, train_main,
                                                                       ["--model", str(tmp_path), *out])
    assert "neither a checkpoint directory" in error_of(capsys, train_main, ["--resume", *out])
    assert "drop ['lora_r']" in error_of(capsys, train_main, ["--resume", "--lora_r", "4", *out])
    assert "HMoRAConfig.num_experts" in error_of(capsys, train_main, ["--num_experts", "0", *out])
    assert "neither a checkpoint directory" in error_of(capsys, generate_main, ["--checkpoint", str(tmp_path),
                                                                                "--prompt", "hi"])
    damaged = tmp_path / "checkpoint-1"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"base_model": ')
    assert "not valid JSON" in error_of(capsys, generate_main, ["--checkpoint", str(damaged), "--prompt", "hi"])
    (damaged / "run.json").write_text('{"base_model": "base"}')
    assert "not written by hmora-train" in error_of(capsys, generate_main, ["--checkpoint", str(damaged),
                                                                            "--prompt", "hi"])
    # none of these started a run: nothing was written (the tiny default's base/ included)
    assert not os.path.exists(tmp_path / "run")


# each bad flag value, found before anything is loaded or written: (flags, the error line's text)
@pytest.mark.parametrize("flags,message", [
    (["--max_length", "0"], "argument --max_length: expected an integer >= 1, got 0 (see hmora-train --help)"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["--torch_dtype", "int8"], "argument --torch_dtype: invalid choice: 'int8'"),
    (["--gradient_checkpointing", "always"], "argument --gradient_checkpointing: invalid choice: 'always'"),
    (["--eval_steps", "x"], "argument --eval_steps: invalid int value: 'x'"),
    (["--report_to", "wandb"], "argument --report_to: invalid choice: 'wandb'"),
])
def test_bad_flag_values_are_one_line(tmp_path, capsys, flags, message):
    assert message in argparse_error_of(capsys, train_main, ["--output_dir", str(tmp_path / "run"), *flags])
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("flags,message", [
    (["--device", "tpu"], "--device 'tpu': expected cpu, cuda, cuda:N or another torch device type"),
    (["--save_total_limit", "0"], "--save_total_limit must be > 0 when given, got 0"),
    (["--warmup_ratio", "1"], "--warmup_ratio must be in [0, 1), got 1.0"),
    (["--warmup_ratio", "0.1", "--warmup_steps", "3"], "give --warmup_steps or --warmup_ratio, not both"),
    (["--eval_steps", "-1"], "--eval_steps must be an integer >= 0, got -1"),
    (["--target_modules", "foo_proj", "q_proj"], "--target_modules: no linear layer named foo_proj in this qwen2 "
     "model; its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    (["--target_modules_lora", "dense"], "--target_modules_lora: no linear layer named dense in this qwen2 model"),
])
def test_bad_values_of_the_tiny_default_are_one_line_and_leave_nothing(tmp_path, capsys, flags, message):
    assert message in error_of(capsys, train_main, ["--output_dir", str(tmp_path / "run"), *flags])
    assert not os.path.exists(tmp_path / "run")  # a failed start of the default leaves no base/ behind


def test_devices_and_backends_that_are_not_here(tmp_path, capsys, monkeypatch):
    out = ["--output_dir", str(tmp_path / "run")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: no CUDA device here (torch 2" in error_of(capsys, train_main, ["--device", "cuda", *out])
    assert "--device cuda:1: no CUDA device here" in error_of(capsys, generate_main, [
        "--device", "cuda:1", "--checkpoint", str(tmp_path), "--prompt", "hi"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # tests/conftest.py turns the interpreter on
    assert "--backend triton needs a CUDA device, got --device cpu; use --backend torch" in error_of(
        capsys, train_main, ["--backend", "triton", *out])
    monkeypatch.setenv("HMORA_BACKEND", "triton")
    assert "HMORA_BACKEND=triton needs a CUDA device" in error_of(capsys, train_main, out)
    assert not os.path.exists(tmp_path / "run")


def test_output_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert f"--output_dir {str(path)!r} is a file; give a directory" in error_of(
        capsys, train_main, ["--output_dir", str(path)])
    assert path.read_text() == "mine"


def test_a_new_run_never_mixes_with_an_old_one(tmp_path, capsys):
    model, dataset = local_model(tmp_path, "qwen2"), jsonl(tmp_path, synthetic_rows(12, seed=5))
    out_dir = tmp_path / "run"
    common = ["--model", model, "--dataset", dataset, "--output_dir", str(out_dir), *TINY_METHOD_FLAGS, *FAST]
    assert train_main([*common, "--max_steps", "4", "--save_steps", "2"]) == 0
    before = {name: adapter_tensors(out_dir / name) for name in ("checkpoint-2", "checkpoint-4")}
    (out_dir / "my-notes.txt").write_text("not hmora's")
    capsys.readouterr()
    assert "already holds a run (checkpoint-2, checkpoint-4, metrics.jsonl, ...); continue it with --resume, " \
           "replace it with --overwrite_output_dir" in error_of(capsys, train_main, [*common, "--max_steps", "2"])
    for name, tensors in before.items():  # nothing lost
        assert all(torch.equal(t, adapter_tensors(out_dir / name)[k]) for k, t in tensors.items())
    # --overwrite_output_dir: the old run's files go (its checkpoint-4 would otherwise pass for the new run's)
    assert train_main([*common, "--max_steps", "2", "--overwrite_output_dir", "--lr", "0.01"]) == 0
    assert sorted(os.listdir(out_dir)) == ["checkpoint-2", "metrics.jsonl", "metrics.png", "my-notes.txt",
                                           "tensorboard"]
    assert [r["step"] for r in read_metrics(out_dir)] == [1, 2]
    capsys.readouterr()
    assert "--overwrite_output_dir would delete it" in error_of(capsys, train_main, [
        "--output_dir", str(out_dir), "--resume", "--overwrite_output_dir"])


def test_truncated_training_state_on_resume_names_the_file(tmp_path, capsys):
    model, dataset = local_model(tmp_path, "qwen2"), jsonl(tmp_path, synthetic_rows(8, seed=5))
    out = ["--output_dir", str(tmp_path / "run")]
    assert train_main(["--model", model, "--dataset", dataset, *out, *TINY_METHOD_FLAGS, *FAST,
                       "--max_steps", "1"]) == 0
    state = tmp_path / "run" / "checkpoint-1" / "training_state.pt"
    whole = state.read_bytes()
    state.write_bytes(whole[:len(whole) // 2])
    capsys.readouterr()
    assert f"{state} is damaged or truncated" in error_of(capsys, train_main, ["--resume", *out])
    assert len(state.read_bytes()) == len(whole) // 2  # left as it was, for the user to look at


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, capsys, monkeypatch):
    model, dataset = local_model(tmp_path, "qwen2"), jsonl(tmp_path, synthetic_rows(16, seed=5))
    out_dir = tmp_path / "run"
    flags = ["--model", model, "--dataset", dataset, "--output_dir", str(out_dir), *TINY_METHOD_FLAGS, *FAST,
             "--max_steps", "4"]
    ctrl_c_during_step(monkeypatch, 2)
    assert train_main(flags) == 130
    monkeypatch.undo()
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"hmora-train: interrupted at step 2; saved {out_dir / 'checkpoint-2'}; continue with: hmora-train "
        f"--output_dir {out_dir} --resume")
    assert train_main(["--output_dir", str(out_dir), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out_dir) if "loss" in r] == [1, 2, 3, 4]


def test_max_length_shorter_than_the_template_warns_with_the_count(tmp_path, capsys):
    model, dataset = local_model(tmp_path, "qwen2"), jsonl(tmp_path, synthetic_rows(8, seed=5))
    assert train_main(["--model", model, "--dataset", dataset, "--output_dir", str(tmp_path / "run"),
                       *TINY_METHOD_FLAGS, *FAST, "--max_steps", "1", "--max_length", "20"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    # the Qwen2 template alone is 13 tokens + the answer header 3: every row is cut, and most keep no answer
    assert len(lines) == 1 and lines[0].startswith("warning: --max_length 20 truncates 8 of 8 rows (prompt template "
                                                   "included)")


def test_routing_report_leaves_out_rows_without_a_task(tmp_path, capsys):
    rows = synthetic_rows(8, seed=5)
    del rows[3]["task"]
    model, dataset = local_model(tmp_path, "qwen2"), jsonl(tmp_path, rows)
    assert train_main(["--model", model, "--dataset", dataset, "--output_dir", str(tmp_path / "run"),
                       *TINY_METHOD_FLAGS, *FAST, "--max_steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "per-task routing on training rows" in printed
    assert "(1 rows without a 'task' field are not in this report)" in printed


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


def test_thread_count_is_set_for_the_run_and_restored(tmp_path, monkeypatch):
    import hmora.cli as cli

    seen = []
    original_train = cli.train
    monkeypatch.setattr(cli, "train", lambda *a, **k: seen.append(torch.get_num_threads()) or original_train(*a, **k))
    model, dataset = local_model(tmp_path, "qwen2"), jsonl(tmp_path, synthetic_rows(8, seed=5))
    before = torch.get_num_threads()
    flags = ["--model", model, "--dataset", dataset, *TINY_METHOD_FLAGS, *FAST, "--max_steps", "1"]
    assert train_main([*flags, "--output_dir", str(tmp_path / "a"), "--threads", "1"]) == 0
    # the default on a shared machine: $OMP_NUM_THREADS if set, else half the cores this process may use
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert cli.default_threads() == 3
    assert train_main([*flags, "--output_dir", str(tmp_path / "b")]) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli.default_threads() == 2
    assert seen == [1, 3] and torch.get_num_threads() == before


def test_eval_dataset_save_total_limit_and_warmup_ratio(tmp_path, capsys):
    model = local_model(tmp_path, "qwen2")
    train_rows, eval_rows = synthetic_rows(8, seed=5), synthetic_rows(6, seed=9)
    eval_path = tmp_path / "eval.json"
    eval_path.write_text(json.dumps(eval_rows))  # a JSON array
    out_dir = tmp_path / "run"
    assert train_main(["--model", model, "--dataset", jsonl(tmp_path, train_rows), "--eval_dataset", str(eval_path),
                       "--output_dir", str(out_dir), *TINY_METHOD_FLAGS, *FAST, "--max_steps", "4", "--eval_steps", "2",
                       "--eval_generate", "2", "--save_steps", "1", "--save_total_limit", "2", "--warmup_ratio", "0.5",
                       "--lr", "0.01", "--schedule_name", "constant_with_warmup"]) == 0
    printed = capsys.readouterr().out
    assert "per-task routing on eval rows" in printed
    assert sorted(n for n in os.listdir(out_dir) if n.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]
    records = read_metrics(out_dir)
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx([0, 0.005, 0.01, 0.01])  # 2 warmup steps
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert sorted(evals[0]) == ["eval_exact_match", "eval_loss", "eval_task_routing", "eval_token_accuracy", "step"]
    assert sorted(evals[0]["eval_task_routing"]) == sorted({r["task"] for r in eval_rows})
    # the demo answers the eval rows
    assert f"  {eval_rows[0]['source']!r} -> " in printed
    with open(out_dir / "checkpoint-4" / "run.json") as f:
        assert json.load(f)["eval_dataset"] == str(eval_path)


def test_bf16_base_halves_the_base_and_keeps_adapters_and_optimizer_fp32(tmp_path, monkeypatch):
    """--torch_dtype bf16: the frozen base's bytes halve; adapters, routers and optimizer state stay fp32; the loss
    of each of 3 steps stays within 5e-4 of the fp32 run's (measured: 3e-5)."""
    import hmora.cli as cli
    from hmora.model import HMoRAModel

    models = {}
    original_train = cli.train
    monkeypatch.setattr(cli, "train", lambda model, *a, **k: models.setdefault(len(models), model) and
                        original_train(model, *a, **k))
    model, dataset = local_model(tmp_path, "llama"), jsonl(tmp_path, synthetic_rows(12, seed=5))
    flags = ["--model", model, "--dataset", dataset, *TINY_METHOD_FLAGS, *FAST, "--max_steps", "3", "--lr", "0.01"]
    assert train_main([*flags, "--output_dir", str(tmp_path / "fp32")]) == 0
    assert train_main([*flags, "--output_dir", str(tmp_path / "bf16"), "--torch_dtype", "bf16"]) == 0
    fp32, bf16 = models[0], models[1]
    assert isinstance(bf16, HMoRAModel)

    def base_bytes(m):
        adapter = {id(p) for p in m.adapter_named_parameters().values()}
        return sum(p.numel() * p.element_size() for p in m.parameters() if id(p) not in adapter)

    assert base_bytes(bf16) * 2 == base_bytes(fp32)
    assert {p.dtype for p in bf16.adapter_named_parameters().values()} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in bf16.parameters() if p.requires_grad)
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("fp32", "bf16")}
    assert losses["bf16"] != losses["fp32"]  # the base really ran in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=5e-4)
    with open(tmp_path / "bf16" / "checkpoint-3" / "run.json") as f:
        assert json.load(f)["train_args"]["torch_dtype"] == "bf16"  # --resume and hmora-generate load it so


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_gradient_checkpointing_trains_the_same_run(tmp_path, mode):
    model, dataset = local_model(tmp_path, "qwen2"), jsonl(tmp_path, synthetic_rows(8, seed=5))
    flags = ["--model", model, "--dataset", dataset, *TINY_METHOD_FLAGS, *FAST, "--max_steps", "2", "--lr", "0.01"]
    assert train_main([*flags, "--output_dir", str(tmp_path / "plain")]) == 0
    assert train_main([*flags, "--output_dir", str(tmp_path / mode), "--gradient_checkpointing", mode]) == 0
    plain, checkpointed = adapter_tensors(tmp_path / "plain" / "checkpoint-2"), \
        adapter_tensors(tmp_path / mode / "checkpoint-2")
    for name, tensor in plain.items():
        torch.testing.assert_close(checkpointed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_generate_from_a_prompts_file_and_by_sampling(tmp_path, capsys):
    model, dataset = local_model(tmp_path, "qwen2"), jsonl(tmp_path, synthetic_rows(8, seed=5))
    out_dir = str(tmp_path / "run")
    assert train_main(["--model", model, "--dataset", dataset, "--output_dir", out_dir, *TINY_METHOD_FLAGS, *FAST,
                       "--max_steps", "1"]) == 0
    capsys.readouterr()
    sources = ["add: 1+2", "upper: abc", "sort: 321"]
    (tmp_path / "prompts.txt").write_text("\n".join(sources) + "\n\n")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"source": s}) + "\n" for s in sources))
    common = ["--checkpoint", out_dir, "--max_new_tokens", "5"]

    def answers(*flags):
        assert generate_main([*common, *flags]) == 0
        return capsys.readouterr().out.splitlines()

    greedy = answers("--prompt", *sources)
    assert len(greedy) == 3
    assert answers("--prompts_file", str(tmp_path / "prompts.txt"), "--batch_size", "2", "--threads", "1") == greedy
    assert answers("--prompts_file", str(tmp_path / "prompts.jsonl")) == greedy
    sampled = answers("--prompt", *sources, "--do_sample", "--temperature", "1.5", "--top_p", "0.9", "--seed", "3")
    assert sampled == answers("--prompt", *sources, "--do_sample", "--temperature", "1.5", "--top_p", "0.9",
                              "--seed", "3")
    assert sampled != greedy  # a random tiny model at temperature 1.5 does not sample its greedy answers
    for flags, message in [
        (["--prompt", "x", "--temperature", "0"], "--temperature must be > 0, got 0.0"),
        (["--prompt", "x", "--top_p", "1.5"], "--top_p must be in (0, 1], got 1.5"),
        (["--prompts_file", str(tmp_path / "none.txt")], "--prompts_file '" + str(tmp_path / "none.txt")
         + "' does not exist"),
    ]:
        assert message in error_of(capsys, generate_main, [*common, *flags])
    (tmp_path / "empty.txt").write_text("\n")
    assert "holds no prompt" in error_of(capsys, generate_main, [*common, "--prompts_file",
                                                                 str(tmp_path / "empty.txt")])
    assert "not allowed with argument" in argparse_error_of(capsys, generate_main, [
        *common, "--prompt", "x", "--prompts_file", str(tmp_path / "prompts.txt")])
    assert "--max_new_tokens: expected an integer >= 1" in argparse_error_of(capsys, generate_main, [
        "--checkpoint", out_dir, "--prompt", "x", "--max_new_tokens", "0"])


@pytest.mark.parametrize("parser", ["train", "generate", "plot"])
def test_every_flag_says_what_it_does(parser, capsys):
    from hmora.cli import generate_parser, train_parser

    if parser == "plot":
        with pytest.raises(SystemExit):
            plot_main(["--help"])
        assert "RUN_DIR" in capsys.readouterr().out
        return
    actions = (train_parser if parser == "train" else generate_parser)()._actions
    for action in actions:
        text = (action.help or "").split(" (default")[0]
        assert len(text.split()) >= 3, action.option_strings  # more than a default


def test_report_to_tensorboard_without_the_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    assert "--report_to tensorboard: the tensorboard package is not installed; pip install 'hmora[tensorboard]'" in \
        error_of(capsys, train_main, ["--output_dir", str(tmp_path / "run"), "--report_to", "tensorboard"])
    assert not os.path.exists(tmp_path / "run")


# ---- routing variants (--routing) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    # the recipe, then the flags given: --balance_loss_coef overrides, switch's capacity follows --max_length
    (["--routing", "switch", "--max_length", "64", "--balance_loss_coef", "0.01"],
     dict(routing_variant="switch", use_div_loss=False, router_bias=False, router_init_std=0.02,
          balance_loss_coef=0.01, max_sequence_length=64, num_experts=4)),
    (["--routing", "switch", "--max_sequence_length", "128"], dict(max_sequence_length=128)),
    (["--routing", "switch"], dict(max_sequence_length=1024)),  # the default --max_length
    (["--routing", "mixlora", "--top_k", "1"], dict(renorm="sum", top_k=1, router_init_std=0.02)),
    (["--routing", "top_p", "--top_p", "0.5", "--routing_variant", "top_p"], dict(top_p=0.5, router_bias=False)),
    (["--routing", "rank_wise", "--lora_alpha", "8"], dict(use_task_router=False, use_hydra_lora=False, lora_alpha=8)),
    (["--routing", "default"], dict(routing_variant=None, use_div_loss=True, lora_alpha=16)),  # the tiny default's
])
def test_routing_starts_from_the_recipe_and_flags_given_win(argv, expected):
    from hmora import HMoRAConfig
    from hmora.cli import method_config_flags, train_parser

    config = HMoRAConfig(**method_config_flags(train_parser().parse_args(argv), tiny=True))
    assert {name: getattr(config, name) for name in expected} == expected


def test_routing_flag_errors(tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "run")]
    assert "--routing switch and --routing_variant top_p disagree" in error_of(
        capsys, train_main, ["--routing", "switch", "--routing_variant", "top_p", *out])
    assert "drop ['routing']" in error_of(capsys, train_main, ["--resume", "--routing", "switch", *out])
    assert "argument --routing: invalid choice: 'moe'" in argparse_error_of(capsys, train_main, ["--routing", "moe"])
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("variant, flags, terms", [
    ("switch", ["--expert_capacity", "3"], ["aux_balance", "aux_z"]),  # 3 tokens per expert and sequence: drops
    ("top_p", [], ["aux_balance", "aux_entropy"]),
])
def test_routing_variant_trains_the_default_and_reports_its_expert_usage(tmp_path, capsys, variant, flags, terms):
    out_dir = tmp_path / "run"
    assert train_main(["--routing", variant, *flags, "--output_dir", str(out_dir), "--max_steps", "2",
                       *SMALL_DEFAULT]) == 0
    printed = capsys.readouterr().out
    with open(out_dir / "checkpoint-2" / "adapter" / "hmora_config.json") as f:
        assert json.load(f)["routing_variant"] == variant
    steps = [r for r in read_metrics(out_dir) if "loss" in r]
    # the variant's own losses, unweighted, beside out.aux_loss (weighted by their coefficients under a variant)
    assert all(r[t] > 0 for r in steps for t in terms) and all(r["task_aux"] == 0 for r in steps)
    assert f"step     2/2  loss {steps[1]['loss']:.4f}  {terms[0]} {steps[1][terms[0]]:.4f}" in printed
    usage = [r for r in read_metrics(out_dir) if "eval_loss" in r][-1]["eval_expert_usage"]
    assert sorted(usage) == ["add", "reverse", "sort", "upper"]
    assert f"per-task expert usage on eval rows ({variant}: share of real tokens" in printed
    if variant == "switch":
        # top-1 with a capacity: each real token has one expert or none
        dropped = [r for r in read_metrics(out_dir) if "eval_loss" in r][-1]["eval_dropped"]
        assert all(sum(usage[t]) + dropped[t] == pytest.approx(1, abs=1e-3) for t in usage)
        assert all(0.5 < d < 1 for d in dropped.values())  # ~30 real tokens a sequence, at most 4 x 3 kept
        assert "dropped: routed to no expert by the capacity" in printed
    else:
        # top-p keeps at least keep_top_k = 2 experts a token
        assert all(sum(shares) >= 2 - 1e-3 and max(shares) <= 1 for shares in usage.values())
