"""The training loop against a small stand-in model (the loop's contract only): the reference recipe's gradient
(micro-batch losses summed, task-router loss once per window), optimizer groups, schedules, atomic checkpoints and
exact resume."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hmora.data import Example, collate, left_pad
from hmora.optim import build_optimizer, build_scheduler
from hmora.train import TrainArgs, latest_checkpoint, train, write_directory_atomically
from interruption import run_interrupted_after

VOCAB, HIDDEN, EXPERTS, PAD = 12, 8, 3, 0


class StandIn(torch.nn.Module):
    """A bag-of-embeddings LM with one token router, one task router and a dropout: the model API the loop uses."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.embed.weight.requires_grad_(False)  # frozen base
        self.head_lora_A = torch.nn.Parameter(torch.randn(4, HIDDEN) * 0.3)
        self.head_lora_B = torch.nn.Parameter(torch.randn(VOCAB, 4) * 0.3)
        self.router = torch.nn.Linear(HIDDEN, EXPERTS)
        self.task_router = torch.nn.Linear(HIDDEN, EXPERTS)
        self.dropout = dropout

    def forward(self, input_ids, attention_mask, labels, task_input_ids, task_attention_mask, with_task_loss=True):
        h = F.dropout(self.embed(input_ids), self.dropout, self.training)
        logits = h @ self.head_lora_A.T @ self.head_lora_B.T
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        probs = self.router(h).softmax(-1)
        aux = (probs.pow(2).sum(-1) * attention_mask).sum() / attention_mask.sum()
        return SimpleNamespace(loss=ce + 0.1 * aux, aux_loss=aux.detach(), router_probs={"r": probs})

    def task_aux_loss(self, task_input_ids, task_attention_mask):
        pooled = (self.embed(task_input_ids) * task_attention_mask[..., None]).sum(1)
        return 0.1 * self.task_router(pooled).softmax(-1).pow(2).sum(-1).mean()

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
    total = sum(expected_model(**collate(micro, PAD)).loss for micro in window)
    task_ids, task_mask = left_pad([e.task_ids for micro in window for e in micro], PAD)
    total = total + expected_model.task_aux_loss(task_ids, task_mask)
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
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-3", "checkpoint-6", "checkpoint-7"]


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


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="--accumulation_steps must be >= 1"):
        TrainArgs("out", accumulation_steps=0)
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        TrainArgs("out", batch_size=4, accumulation_steps=8).total_steps(num_rows=5)
    assert TrainArgs("out", num_epochs=2, batch_size=4, accumulation_steps=2).total_steps(num_rows=10) == 3
