"""The training loop against a small stand-in model (the loop's contract only): the reference recipe's gradient
(micro-batch losses summed, task-router loss once per window), optimizer groups, schedules, atomic checkpoints and
exact resume."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hmora.data import Example, collate, left_pad
from hmora.optim import build_optimizer, build_scheduler
from hmora.train import TrainArgs, TrainingInterrupted, latest_checkpoint, train, write_directory_atomically
from interruption import ctrl_c_during_step, run_interrupted_after

VOCAB, HIDDEN, EXPERTS, PAD = 12, 8, 3, 0


class StandIn(torch.nn.Module):
    """A bag-of-embeddings LM with one token router, one task router and a dropout: the model API the loop uses
    (the task routers' loss inside the forward, over this batch's sources or `task_loss_input_ids`)."""

    hmora_config = SimpleNamespace(lambda_auxiliary=0.1, routing_variant=None)

    def __init__(self, dropout=0.0):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.embed.weight.requires_grad_(False)  # frozen base
        self.head_lora_A = torch.nn.Parameter(torch.randn(4, HIDDEN) * 0.3)
        self.head_lora_B = torch.nn.Parameter(torch.randn(VOCAB, 4) * 0.3)
        self.router = torch.nn.Linear(HIDDEN, EXPERTS)
        self.task_router = torch.nn.Linear(HIDDEN, EXPERTS)
        self.dropout = dropout

    def forward(self, input_ids, attention_mask, labels, task_input_ids, task_attention_mask, with_task_loss=True,
                task_loss_input_ids=None, task_loss_attention_mask=None):
        h = F.dropout(self.embed(input_ids), self.dropout, self.training)
        logits = h @ self.head_lora_A.T @ self.head_lora_B.T
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        probs = self.router(h).softmax(-1)
        aux = (probs.pow(2).sum(-1) * attention_mask).sum() / attention_mask.sum()
        loss, task = ce + 0.1 * aux, None
        if with_task_loss:
            given = task_loss_input_ids is not None
            task = self.task_loss(task_loss_input_ids if given else task_input_ids,
                                  task_loss_attention_mask if given else task_attention_mask)
            loss = loss + 0.1 * task
        return SimpleNamespace(loss=loss, ce_loss=ce.detach(), aux_loss=aux.detach(),
                               task_aux_loss=None if task is None else task.detach(), router_probs={"r": probs})

    def task_loss(self, task_input_ids, task_attention_mask):
        pooled = (self.embed(task_input_ids) * task_attention_mask[..., None]).sum(1)
        return self.task_router(pooled).softmax(-1).pow(2).sum(-1).mean()

    def update_routing_bias(self):
        return {}

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(directory, "w.safetensors"))


def stand_in(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return StandIn(dropout)


def examples(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length, prompt = torch.randint(4, 9, (1,), generator=g).item(), torch.randint(1, 3, (1,), generator=g).item()
        ids = tuple(torch.randint(1, VOCAB, (length,), generator=g).tolist())
        out.append(Example(ids, prompt, ids[:prompt + 1]))
    return out


def quiet(_msg):
    pass


def test_step_gradient_is_the_reference_recipe(monkeypatch, tmp_path):
    """One optimizer step: sum of the micro-batch loss gradients + the task loss over the whole window."""
    model, data = stand_in(), examples(6)
    args = TrainArgs(str(tmp_path), max_steps=1, batch_size=2, accumulation_steps=3, seed=4)
    seen = {}
    original_step = torch.optim.AdamW.step

    def capture(self, *a, **k):
        seen.update({id(p): p.grad.clone() for group in self.param_groups for p in group["params"]})
        return original_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", capture)
    expected_model = stand_in()
    train(model, data, args, pad_id=PAD, log=quiet)

    # the window: the first three batches of the seed-4 order
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(4)).tolist()
    window = [[data[i] for i in order[b * 2:(b + 1) * 2]] for b in range(3)]
    total = sum(expected_model(**collate(micro, PAD), with_task_loss=False).loss for micro in window)
    task_ids, task_mask = left_pad([e.task_ids for micro in window for e in micro], PAD)
    total = total + 0.1 * expected_model.task_loss(task_ids, task_mask)
    total.backward()
    for (name, p), p_expected in zip(model.named_parameters(), expected_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(seen[id(p)], p_expected.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_optimizer_groups_train_b_faster_with_weight_decay():
    model = stand_in()
    optimizer = build_optimizer(model, lr=1e-3, eta_b=1.2)
    (others, b_matrices) = [(g["lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups]
    assert b_matrices == (pytest.approx(1.2e-3), {id(model.head_lora_B)})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert others == (1e-3, trainable - {id(model.head_lora_B)})  # the frozen embedding is in neither
    assert all(g["weight_decay"] == 0.01 for g in optimizer.param_groups)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(torch.nn.Linear(2, 2).requires_grad_(False), lr=1e-3)


# constant_with_warmup: the paper's schedule; linear: decays to 0 at max_steps; constant: ignores warmup
@pytest.mark.parametrize("name,expected", [
    ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 2 / 3, 1 / 3]),
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_schedules(name, expected):
    optimizer = build_optimizer(stand_in(), lr=1.0, eta_b=2.0)
    scheduler = build_scheduler(optimizer, name, warmup_steps=2, max_steps=5)
    lrs = []
    for _ in range(5):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert lrs == [pytest.approx([f, 2 * f]) for f in expected]
    with pytest.raises(ValueError, match="unknown schedule 'cosine_forever'"):
        build_scheduler(optimizer, "cosine_forever")


def test_interrupted_and_resumed_run_ends_with_the_same_weights(monkeypatch, tmp_path):
    # 10 rows, batches of 3 (a short last batch), 2 per step: the stream crosses epochs, dropout draws from the RNG
    data = examples(10)
    common = dict(max_steps=7, num_epochs=5, batch_size=3, accumulation_steps=2, lr=0.05, eta_b=1.5, seed=3,
                  save_steps=3, warmup_steps=2, schedule_name="linear")
    straight = stand_in(dropout=0.3)
    train(straight, data, TrainArgs(str(tmp_path / "a"), **common), pad_id=PAD, log=quiet)

    run_interrupted_after(monkeypatch, "checkpoint-3", lambda: train(
        stand_in(dropout=0.3), data, TrainArgs(str(tmp_path / "b"), **common), pad_id=PAD, log=quiet))

    checkpoint = latest_checkpoint(str(tmp_path / "b"))
    assert checkpoint.endswith("checkpoint-3")
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    resumed = stand_in(seed=99, dropout=0.3)
    resumed.load_state_dict(load_file(os.path.join(checkpoint, "adapter", "w.safetensors")))
    result = train(resumed, data, TrainArgs(str(tmp_path / "b"), **common), pad_id=PAD, log=quiet,
                   resume_from=checkpoint)
    assert [h.step for h in result.history] == [4, 5, 6, 7]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-3", "checkpoint-6", "checkpoint-7", "metrics.jsonl"]
    # the resumed run's metrics continue the interrupted run's: one line per step, as the straight run's
    assert without_speed(metrics(tmp_path / "b")) == without_speed(metrics(tmp_path / "a"))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_speed(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_metrics_file_records_every_step(tmp_path):
    args = TrainArgs(str(tmp_path), max_steps=4, batch_size=2, accumulation_steps=2, lr=0.05, warmup_ratio=0.5,
                     schedule_name="linear", max_grad_norm=0.5)
    result = train(stand_in(), examples(8), args, pad_id=PAD, log=quiet)
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) == {"step", "epoch", "loss", "ce", "aux", "task_aux", "lr", "grad_norm",
                               "routing_entropy", "tokens_per_s"}
    # --warmup_ratio 0.5 of 4 steps: 2 warmup steps, then linear decay to 0 at step 4
    assert [r["lr"] for r in records] == pytest.approx([0.0, 0.025, 0.05, 0.025])
    assert [r["epoch"] for r in records] == [0.5, 1.0, 1.5, 2.0]  # 4 batches of 2 rows per epoch, 2 per step
    for record, entry in zip(records, result.history):
        assert record["loss"] == entry.loss and record["grad_norm"] > 0 and record["tokens_per_s"] > 0
        # loss = mean micro-batch (CE + 0.1 aux) + the task loss of the step
        assert record["loss"] == pytest.approx(record["ce"] + 0.1 * record["aux"] + record["task_aux"], rel=1e-6)


def test_grad_norm_is_measured_before_clipping(tmp_path, monkeypatch):
    norms = []
    original_step = torch.optim.AdamW.step

    def capture(self, *a, **k):
        norms.append(torch.nn.utils.get_total_norm([p.grad for g in self.param_groups for p in g["params"]
                                                    if p.grad is not None]).item())
        return original_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", capture)
    train(stand_in(), examples(4), TrainArgs(str(tmp_path), max_steps=1, max_grad_norm=1e-3), pad_id=PAD, log=quiet)
    assert norms[0] == pytest.approx(1e-3, rel=1e-3)  # clipped (torch adds 1e-6 to the norm)
    assert metrics(tmp_path)[0]["grad_norm"] > 1e-2  # the norm before clipping


def test_max_steps_wins_over_num_epochs(tmp_path):
    lines = []
    # 10 rows in batches of 4: 3 batches per epoch; 5 steps take 2 epochs
    result = train(stand_in(), examples(10), TrainArgs(str(tmp_path), max_steps=5, num_epochs=1, batch_size=4),
                   pad_id=PAD, log=lines.append)
    assert [h.step for h in result.history] == [1, 2, 3, 4, 5]
    assert "--max_steps 5 takes 2 passes over the 10 rows, more than --num_epochs 1: --max_steps wins" in lines[0]


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path):
    train(stand_in(), examples(8), TrainArgs(str(tmp_path), max_steps=5, save_steps=1, save_total_limit=2),
          pad_id=PAD, log=quiet)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]


def test_evaluation_never_changes_the_training_run(tmp_path):
    """Evaluation draws random numbers (here on purpose) under its own RNG state: the weights stay those of a run
    without evaluation, and its scores land in metrics.jsonl."""
    common = dict(max_steps=4, batch_size=2, lr=0.05, eval_steps=2)
    plain = stand_in(dropout=0.3)
    train(plain, examples(8), TrainArgs(str(tmp_path / "plain"), **common), pad_id=PAD, log=quiet)
    evaluated = stand_in(dropout=0.3)

    def evaluate():
        evaluated.eval()
        return {"loss": float(torch.rand(()))}

    result = train(evaluated, examples(8), TrainArgs(str(tmp_path / "eval"), **common), pad_id=PAD, log=quiet,
                   evaluate=evaluate)
    for a, b in zip(plain.state_dict().values(), evaluated.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["step"] for r in result.evaluations] == [2, 4]
    eval_lines = [r for r in metrics(tmp_path / "eval") if "eval_loss" in r]
    assert eval_lines == result.evaluations and evaluated.training  # back in training mode


def test_ctrl_c_saves_the_current_step_and_stops(tmp_path, monkeypatch):
    """The first SIGINT lets the step finish, saves it and stops; resuming from it ends where a straight run does."""
    import signal

    common = dict(max_steps=5, batch_size=2, lr=0.05, seed=1)
    straight = stand_in(dropout=0.3)
    train(straight, examples(8), TrainArgs(str(tmp_path / "a"), **common), pad_id=PAD, log=quiet)

    ctrl_c_during_step(monkeypatch, 2)
    lines = []
    handler = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN when a shell started the tests in background
    with pytest.raises(TrainingInterrupted) as stop:
        train(stand_in(dropout=0.3), examples(8), TrainArgs(str(tmp_path / "b"), **common), pad_id=PAD,
              log=lines.append)
    monkeypatch.undo()
    assert stop.value.step == 2 and stop.value.checkpoint == os.path.join(str(tmp_path / "b"), "checkpoint-2")
    assert lines[-1].startswith("Ctrl-C: stopping after this step and saving a checkpoint")
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    resumed = stand_in(seed=7, dropout=0.3)
    resumed.load_state_dict(load_file(os.path.join(stop.value.checkpoint, "adapter", "w.safetensors")))
    train(resumed, examples(8), TrainArgs(str(tmp_path / "b"), **common), pad_id=PAD, log=quiet,
          resume_from=stop.value.checkpoint)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_truncated_training_state_names_the_file(tmp_path):
    train(stand_in(), examples(4), TrainArgs(str(tmp_path), max_steps=1), pad_id=PAD, log=quiet)
    state = tmp_path / "checkpoint-1" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"^{state} is damaged or truncated .*resume from an earlier checkpoint"):
        train(stand_in(), examples(4), TrainArgs(str(tmp_path), max_steps=2), pad_id=PAD, log=quiet,
              resume_from=str(tmp_path / "checkpoint-1"))


def test_stale_temporaries_are_removed_and_permissions_follow_the_umask(tmp_path):
    stale = [tmp_path / ".checkpoint-3.tmp-abc", tmp_path / ".checkpoint-2.old-xyz"]
    for path in stale:
        (path / "adapter").mkdir(parents=True)
    (tmp_path / ".keep-me").mkdir()  # not ours
    old = os.umask(0o022)
    try:
        lines = []
        train(stand_in(), examples(4), TrainArgs(str(tmp_path), max_steps=1), pad_id=PAD, log=lines.append)
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == [".keep-me", "checkpoint-1", "metrics.jsonl"]
    assert sum("left by an interrupted checkpoint write" in line for line in lines) == 2
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint.stat().st_mode & 0o777) == 0o755
    for root, dirs, files in os.walk(checkpoint):
        for name in dirs:
            assert (os.stat(os.path.join(root, name)).st_mode & 0o777) == 0o755, name
        for name in files:
            assert (os.stat(os.path.join(root, name)).st_mode & 0o777) == 0o644, name


def test_loss_falls_and_is_logged(tmp_path):
    lines = []
    result = train(stand_in(), examples(8), TrainArgs(str(tmp_path), max_steps=30, num_epochs=30, batch_size=8,
                                                      lr=0.05, log_steps=10), pad_id=PAD, log=lines.append)
    assert result.history[-1].loss < 0.8 * result.history[0].loss
    assert len(lines) == 3 and lines[0].startswith("step    10/30  loss")
    assert result.checkpoint == os.path.join(str(tmp_path), "checkpoint-30")


def test_failed_write_keeps_the_last_good_directory(tmp_path):
    target = tmp_path / "checkpoint-1"
    write_directory_atomically(str(target), lambda d: open(os.path.join(d, "ok"), "w").write("v1"))

    def broken(d):
        open(os.path.join(d, "ok"), "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_directory_atomically(str(target), broken)
    assert (target / "ok").read_text() == "v1"
    assert os.listdir(tmp_path) == ["checkpoint-1"]  # no temporary left behind
    write_directory_atomically(str(target), lambda d: open(os.path.join(d, "ok"), "w").write("v2"))
    assert (target / "ok").read_text() == "v2" and os.listdir(tmp_path) == ["checkpoint-1"]


def test_latest_checkpoint_skips_incomplete_directories(tmp_path):
    assert latest_checkpoint(str(tmp_path / "nothing")) is None
    for name, complete in [("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-11", False),
                           (".checkpoint-12.tmp-x", True)]:
        os.makedirs(tmp_path / name)
        if complete:
            (tmp_path / name / "training_state.pt").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)) == os.path.join(str(tmp_path), "checkpoint-10")


# each flag's bad value, and the one line that says so
@pytest.mark.parametrize("flags,message", [
    (dict(accumulation_steps=0), "--accumulation_steps must be an integer >= 1, got 0"),
    (dict(save_total_limit=0), "--save_total_limit must be > 0 when given, got 0"),
    (dict(eval_steps=-1), "--eval_steps must be an integer >= 0, got -1"),
    (dict(warmup_ratio=1.5), r"--warmup_ratio must be in \[0, 1\), got 1.5"),
    (dict(warmup_ratio=0.1, warmup_steps=5), "give --warmup_steps or --warmup_ratio, not both"),
    (dict(torch_dtype="int8"), "--torch_dtype: expected one of \\['bf16', 'fp16', 'fp32'\\], got 'int8'"),
    (dict(gradient_checkpointing="sometimes"), "--gradient_checkpointing: expected one of"),
])
def test_bad_training_arguments(flags, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        TrainArgs("out", **flags)


def test_steps_an_epoch_gives():
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        TrainArgs("out", batch_size=4, accumulation_steps=8).total_steps(num_rows=5)
    assert TrainArgs("out", num_epochs=2, batch_size=4, accumulation_steps=2).total_steps(num_rows=10) == 3


def test_a_run_that_fails_before_its_first_step_leaves_nothing(tmp_path):
    model = stand_in()
    model.forward = lambda **batch: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        train(model, examples(4), TrainArgs(str(tmp_path / "run"), max_steps=2), pad_id=PAD, log=quiet,
              tensorboard=True)
    assert not os.path.exists(tmp_path / "run")  # no metrics.jsonl or tensorboard/ to pass for a run
