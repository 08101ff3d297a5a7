"""The training loop of the reference recipe (SPEC 5), with atomic checkpoints and exact resume.

Per optimizer step: `accumulation_steps` micro-batches, each `out.loss.backward()` on its own (the losses are
summed, not divided); then the task-router auxiliary loss once over every sequence of the window
(`model.task_aux_loss` on the concatenated task batch, its own backward); optional clipping; AdamW; schedule.

A checkpoint directory `checkpoint-N/` holds `adapter/` (model.save_pretrained), `tokenizer/`, `run.json` (what
the caller says the run is, plus the step) and `training_state.pt` (optimizer, scheduler, RNG states, data
position). It is written to a temporary directory and renamed into place, so a crash never leaves a half-written
`checkpoint-N/` and never damages the previous one.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from statistics import fmean
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

import hmora_kernels

from .data import BatchPosition, Example, batch_order, collate, left_pad
from .optim import build_optimizer, build_scheduler

TRAINING_STATE_FILE = "training_state.pt"
RUN_INFO_FILE = "run.json"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainArgs:
    """The training flags of `hmora-train` (the reference script's names). max_steps None: as many optimizer
    steps as `num_epochs` epochs give. save_steps 0: checkpoint only at the end."""

    output_dir: str
    max_steps: Optional[int] = None
    num_epochs: int = 1
    batch_size: int = 4
    accumulation_steps: int = 1
    lr: float = 1e-4
    eta_b: float = 1.0
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule_name: str = "constant"
    polynomial_power: float = 2.0
    num_cycles: int = 5
    max_grad_norm: Optional[float] = None
    seed: int = 0
    save_steps: int = 0
    log_steps: int = 10
    bf16: bool = False

    def __post_init__(self):
        for name in ("num_epochs", "batch_size", "accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_grad_norm"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0 when given, got {getattr(self, name)}")
        if self.save_steps < 0 or self.log_steps < 1:
            raise ValueError(f"--save_steps must be >= 0 and --log_steps >= 1, got {self.save_steps}, "
                             f"{self.log_steps}")

    def total_steps(self, num_rows: int) -> int:
        """Optimizer steps of the run: max_steps, capped by what num_epochs of data can feed."""
        micro_batches = self.num_epochs * math.ceil(num_rows / self.batch_size)
        available = micro_batches // self.accumulation_steps
        if available < 1:
            raise ValueError(f"{num_rows} rows in batches of {self.batch_size} give {micro_batches} micro-batches, "
                             f"fewer than one optimizer step of --accumulation_steps {self.accumulation_steps}")
        return available if self.max_steps is None else min(self.max_steps, available)


@dataclass
class StepLog:
    step: int
    loss: float       # mean micro-batch loss (CE + lambda_aux * aux) plus the task-router loss of the step
    aux_loss: float   # mean micro-batch token-router auxiliary loss
    entropy: float    # mean routing entropy (nats) over routers and real tokens


@dataclass
class TrainResult:
    checkpoint: str
    history: List[StepLog] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> Dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def routing_entropy(router_probs: Dict[str, torch.Tensor], attention_mask: torch.Tensor) -> float:
    """Mean over routers of the mean entropy (nats) of their (B, S, E) routing probabilities on real tokens."""
    if not router_probs:
        return float("nan")
    mask = attention_mask.to(torch.float32)
    entropies = []
    for probs in router_probs.values():
        p = probs.detach().float()
        token_entropy = hmora_kernels.entropy(p)
        entropies.append((token_entropy * mask).sum() / mask.sum().clamp_min(1.0))
    return torch.stack(entropies).mean().item()


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete `checkpoint-N` directory with the highest N in output_dir, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = [int(m.group(1)) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))
             and os.path.isfile(os.path.join(output_dir, name, TRAINING_STATE_FILE))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def write_directory_atomically(directory: str, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary sibling of `directory`, which then replaces `directory` by renames."""
    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(directory):
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.replace(directory, os.path.join(old, name))
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(directory: str, model, tokenizer, optimizer, scheduler, step: int, position: BatchPosition,
                    run_info: Dict, write_extra: Optional[Callable[[str], None]] = None) -> str:
    """Write checkpoint `directory` atomically; `write_extra(tmp_dir)` adds the caller's files (e.g. the base)."""
    def write(tmp: str) -> None:
        model.save_pretrained(os.path.join(tmp, ADAPTER_DIR))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
        torch.save({"step": step, "position": asdict(position), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   os.path.join(tmp, TRAINING_STATE_FILE))
        with open(os.path.join(tmp, RUN_INFO_FILE), "w", encoding="utf-8") as f:
            json.dump({**run_info, "step": step}, f, indent=1)
        if write_extra is not None:
            write_extra(tmp)

    write_directory_atomically(directory, write)
    return directory


def load_training_state(checkpoint: str, optimizer, scheduler) -> tuple:
    """Restore optimizer, scheduler and RNG states from `checkpoint`; returns (step, next data position)."""
    path = os.path.join(checkpoint, TRAINING_STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint!r} is not a training checkpoint: {TRAINING_STATE_FILE} is missing "
                                "(pass --resume a checkpoint-N directory or the run's --output_dir)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], BatchPosition(**state["position"])


def accumulate_window(model, micro_batches: Sequence[Sequence[Example]], pad_id: int, bf16: bool) -> tuple:
    """Backward of every micro-batch loss (summed, not divided), then of the task-router loss over all
    sequences of the window. Returns (mean micro-batch loss + task loss, mean aux loss, mean routing entropy)."""
    device = next(model.parameters()).device
    losses, aux_losses, entropies = [], [], []
    for micro in micro_batches:
        batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch, with_task_loss=False)  # the task-router loss comes once per window, below
        out.loss.backward()
        losses.append(out.loss.item())
        aux_losses.append(out.aux_loss.item())
        entropies.append(routing_entropy(out.router_probs, batch["attention_mask"]))
    task_ids, task_mask = left_pad([e.task_ids for micro in micro_batches for e in micro], pad_id)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        task_loss = model.task_aux_loss(task_ids.to(device), task_mask.to(device))
    if task_loss.requires_grad:  # no task routers: a constant zero
        task_loss.backward()
    return fmean(losses) + task_loss.item(), fmean(aux_losses), fmean(entropies)


def train(model, examples: Sequence[Example], args: TrainArgs, *, pad_id: int, tokenizer=None,
          run_info: Optional[Dict] = None, write_extra: Optional[Callable[[str], None]] = None,
          resume_from: Optional[str] = None, log: Callable[[str], None] = tqdm.write) -> TrainResult:
    """Train `model` (an HMoRA model whose adapter weights are already those of `resume_from`, if given).

    The model must return `loss`, `aux_loss` and `router_probs` from `model(**batch)` and offer
    `task_aux_loss(task_input_ids, task_attention_mask)` and `save_pretrained(dir)`.
    """
    total_steps = args.total_steps(len(examples))
    optimizer = build_optimizer(model, args.lr, args.eta_b, args.weight_decay)
    scheduler = build_scheduler(optimizer, args.schedule_name, args.warmup_steps, total_steps,
                                args.polynomial_power, args.num_cycles)
    trainable = [p for p in model.parameters() if p.requires_grad]
    run_info = dict(run_info or {}, train_args=asdict(args))
    step, position = 0, BatchPosition()
    seed_everything(args.seed)
    if resume_from is not None:
        step, position = load_training_state(resume_from, optimizer, scheduler)
        log(f"resumed from {resume_from} at step {step}")

    def checkpoint() -> str:
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        return save_checkpoint(path, model, tokenizer, optimizer, scheduler, step, position, run_info, write_extra)

    result = TrainResult(checkpoint=resume_from or "")
    stream = batch_order(len(examples), args.batch_size, args.seed, args.num_epochs, start=position)
    bar = tqdm(total=total_steps, initial=step, desc="hmora-train", dynamic_ncols=True)
    model.train()
    while step < total_steps:
        micro_batches = []
        for _ in range(args.accumulation_steps):
            at, indices = next(stream)
            micro_batches.append([examples[i] for i in indices])
        entry = accumulate_window(model, micro_batches, pad_id, args.bf16)
        if args.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        position = BatchPosition(at.epoch, at.batch + 1)
        entry = StepLog(step, *entry)
        result.history.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry.loss:.4f}", aux=f"{entry.aux_loss:.4f}", entropy=f"{entry.entropy:.3f}")
        if step % args.log_steps == 0 or step == total_steps:
            log(f"step {step:>5}/{total_steps}  loss {entry.loss:.4f}  aux {entry.aux_loss:.4f}  "
                f"routing entropy {entry.entropy:.3f}")
        if step == total_steps or (args.save_steps and step % args.save_steps == 0):
            result.checkpoint = checkpoint()
    bar.close()
    return result
