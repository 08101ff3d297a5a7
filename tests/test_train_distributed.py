"""hmora-train data-parallel in 2 processes (gloo on CPU, forked ranks in the environment torchrun gives each process):
the run equals one process accumulating both ranks' micro-batches (hmora.train's docstring says exactly what it
equals), the ranks stay bit-identical, only rank 0 writes, and a resumed 2-process run continues exactly."""
import json
import os
from pathlib import Path

import pytest
import torch

from hmora.cli import train_main
from hmora.tiny import synthetic_rows
from distributed import max_relative_difference, spawn
from interruption import ctrl_c_during_step
from test_train_cli import TINY_METHOD_FLAGS, adapter_tensors, jsonl, local_model, read_metrics

pytestmark = pytest.mark.distributed

# relative, of the weights after 3 AdamW steps: fp32 sums in another order (the ranks' gradients are added, one
# process accumulates them one by one), which Adam's g / sqrt(v) amplifies where a gradient is near 0. Measured
# 2e-6 to 1.3e-5 over random bases; a task-router loss taken in every process instead of once gives 7e-2, averaged
# instead of summed gradients 0.26 (and half the gradient norm, which is checked too)
FP32_ROUNDOFF = 5e-5


def train_rank(rank, world, argv, out_dir, ctrl_c_at_step=None):
    """hmora-train in this rank; saves what the rank returned, the checkpoints it wrote and its adapter weights to
    out_dir/rank{rank}.pt. `ctrl_c_at_step`: rank 0 gets a SIGINT (Ctrl-C) during that optimizer step."""
    import hmora.cli as cli
    import hmora.train as train_module

    trained, saved = [], []
    train, save = cli.train, train_module.save_checkpoint
    cli.train = lambda model, *args, **kwargs: trained.append(model) or train(model, *args, **kwargs)
    train_module.save_checkpoint = lambda directory, *a, **k: saved.append(directory) or save(directory, *a, **k)
    if ctrl_c_at_step is not None and rank == 0:
        ctrl_c_during_step(pytest.MonkeyPatch(), ctrl_c_at_step)  # this forked process's own patch
    status = cli.train_main(argv)
    adapter = {n: p.detach().clone() for n, p in trained[0].adapter_named_parameters().items()}
    torch.save({"status": status, "saved": saved, "adapter": adapter}, Path(out_dir) / f"rank{rank}.pt")


def run_ranks(tmp_path, name, argv, **kwargs):
    """Both ranks' results of `hmora-train argv` in 2 processes."""
    results = tmp_path / f"{name}-ranks"
    results.mkdir()
    spawn(train_rank, argv, str(results), kwargs.get("ctrl_c_at_step"))
    return [torch.load(results / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    torch.manual_seed(0)  # the same random base in every session
    return ["--model", local_model(directory, "qwen2"), "--dataset", jsonl(directory, synthetic_rows(24, seed=5)),
            *TINY_METHOD_FLAGS, "--batch_size", "2", "--threads", "1", "--log_steps", "1", "--max_new_tokens", "2",
            "--report_to", "none"]


def test_two_processes_equal_one_accumulating_their_micro_batches(tmp_path, data, capfd):
    """2 processes with --accumulation_steps 2 = one process with 4 over the same micro-batches (dropout off: each
    process draws its own masks); the ranks end bit-identical and only rank 0 writes, each checkpoint once."""
    common = [*data, "--dropout", "0", "--max_steps", "3", "--save_steps", "2", "--lr", "0.01"]
    assert train_main([*common, "--output_dir", str(tmp_path / "one"), "--accumulation_steps", "4"]) == 0
    capfd.readouterr()
    out_dir = tmp_path / "two"
    ranks = run_ranks(tmp_path, "two", [*common, "--output_dir", str(out_dir), "--accumulation_steps", "2"])
    printed = capfd.readouterr().out

    assert [r["status"] for r in ranks] == [0, 0]
    for name, tensor in ranks[0]["adapter"].items():
        assert torch.equal(tensor, ranks[1]["adapter"][name]), name
    checkpoint = adapter_tensors(out_dir / "checkpoint-3")
    assert all(torch.equal(checkpoint[n], t) for n, t in ranks[0]["adapter"].items())
    single = adapter_tensors(tmp_path / "one" / "checkpoint-3")
    before = adapter_tensors(tmp_path / "one" / "checkpoint-2")
    assert all(not torch.equal(single[n], t) for n, t in before.items())  # the last step moved every tensor
    difference = max_relative_difference(checkpoint, single)
    print(f"2 processes vs one: max relative difference {difference:.3g}")
    assert difference <= FP32_ROUNDOFF

    # rank 0 alone wrote, each checkpoint once, and printed the run once
    assert ranks[0]["saved"] == [str(out_dir / "checkpoint-2"), str(out_dir / "checkpoint-3")]
    assert ranks[1]["saved"] == []
    assert sorted(os.listdir(out_dir)) == ["checkpoint-2", "checkpoint-3", "metrics.jsonl", "metrics.png"]
    assert printed.count("trainable params:") == 1 and printed.count(f"saved {out_dir / 'checkpoint-3'}") == 1
    # metrics.jsonl: one line per step, over both processes' micro-batches (4 micro-batches of 2 rows each)
    two, one = read_metrics(out_dir), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one):
        assert a["epoch"] == b["epoch"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-5)
    with open(out_dir / "checkpoint-3" / "run.json") as f:
        assert json.load(f)["train_args"]["accumulation_steps"] == 2


def test_resumed_two_process_run_continues_exactly(tmp_path, data):
    """Ctrl-C in rank 0 stops both processes after the same step and saves it; a 2-process --resume then ends with
    the weights of an uninterrupted run, bit for bit (dropout on: each rank restores its own random state)."""
    common = [*data, "--dropout", "0.1", "--max_steps", "4", "--accumulation_steps", "2", "--lr", "0.01"]
    straight = run_ranks(tmp_path, "straight", [*common, "--output_dir", str(tmp_path / "a")])
    out = ["--output_dir", str(tmp_path / "b")]
    stopped = run_ranks(tmp_path, "stopped", [*common, *out], ctrl_c_at_step=2)
    assert [r["status"] for r in stopped] == [130, 130]
    assert stopped[0]["saved"] == [str(tmp_path / "b" / "checkpoint-2")]
    resumed = run_ranks(tmp_path, "resumed", [*out, "--resume", "--threads", "1"])
    assert [r["status"] for r in resumed] == [0, 0]
    expected = adapter_tensors(tmp_path / "a" / "checkpoint-4")
    for name, tensor in adapter_tensors(tmp_path / "b" / "checkpoint-4").items():
        assert torch.equal(tensor, expected[name]), name
    assert all(torch.equal(resumed[1]["adapter"][n], t) for n, t in straight[1]["adapter"].items())
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4]
