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
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from statistics import fmean
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

import hmora_kernels

from .checkpoint import umask_mode
from .data import BatchPosition, Example, batch_order, collate, left_pad
from .optim import build_optimizer, build_scheduler

TRAINING_STATE_FILE = "training_state.pt"
RUN_INFO_FILE = "run.json"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STALE_TEMPORARY_PATTERN = re.compile(r"^\.checkpoint-\d+\.(tmp|old)-")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINTING_MODES = ("reentrant", "non_reentrant")


def _flag(default, help: str, **extra):
    """A TrainArgs field whose `help` is what `hmora-train --help` shows."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainArgs:
    """The training flags of `hmora-train` (the reference script's names, plus HF Trainer's for what the reference
    script lacks). `torch_dtype` and `gradient_checkpointing` are applied by hmora-train when it loads the base; they
    live here so that a checkpoint records them and --resume restores them."""

    output_dir: str = _flag("hmora-output", "the run directory: checkpoint-N/ directories, metrics.jsonl, "
                            "metrics.png and tensorboard/")
    max_steps: Optional[int] = _flag(None, "optimizer steps to train; wins over --num_epochs, as in HF Trainer "
                                     "(the data is repeated as often as needed). Default: what --num_epochs give")
    num_epochs: int = _flag(1, "passes over the dataset when --max_steps is not given")
    batch_size: int = _flag(4, "sequences per micro-batch")
    accumulation_steps: int = _flag(1, "micro-batches per optimizer step; their losses are summed, not divided "
                                    "(the reference recipe)")
    lr: float = _flag(1e-4, "peak learning rate (the B matrices get --eta_b times it)")
    eta_b: float = _flag(1.0, "learning-rate factor of the B matrices (paper: 1.2)")
    weight_decay: float = _flag(0.01, "AdamW weight decay, on every trainable parameter")
    warmup_steps: int = _flag(0, "linear warmup steps (the 'constant' schedule ignores warmup)")
    warmup_ratio: float = _flag(0.0, "warmup as a fraction of the run's steps, in [0, 1); instead of --warmup_steps")
    schedule_name: str = _flag("constant", "learning-rate schedule, from transformers.get_scheduler (the paper: "
                               "constant_with_warmup with 500 warmup steps)")
    polynomial_power: float = _flag(2.0, "power of the 'polynomial' schedule")
    num_cycles: int = _flag(5, "hard restarts of the 'cosine_with_restarts' schedule")
    max_grad_norm: Optional[float] = _flag(None, "clip the gradient norm to this (default: no clipping, as the "
                                           "reference)")
    seed: int = _flag(0, "seed of the adapter's initialisation, the data order and the dropout masks")
    save_steps: int = _flag(0, "write a checkpoint every N optimizer steps (0: only at the end)")
    save_total_limit: Optional[int] = _flag(None, "keep only the newest N checkpoints (default: keep all)")
    log_steps: int = _flag(10, "print a log line every N optimizer steps (metrics.jsonl gets every step)")
    eval_steps: int = _flag(0, "evaluate on the eval rows every N optimizer steps (0: only at the end)")
    bf16: bool = _flag(False, "run forward passes under bfloat16 autocast (weights and optimizer state stay fp32)")
    torch_dtype: str = _flag("fp32", "dtype of the frozen base model's weights: bf16 or fp16 halve its memory; "
                             "adapters, routers and the optimizer state stay fp32", choices=tuple(DTYPES))
    gradient_checkpointing: Optional[str] = _flag(
        None, "recompute the base's decoder layers in backward to save activation memory (no value: "
        "non_reentrant)", choices=CHECKPOINTING_MODES, const="non_reentrant")

    def __post_init__(self):
        for name in ("num_epochs", "batch_size", "accumulation_steps", "log_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_grad_norm", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0 when given, got {getattr(self, name)}")
        for name in ("save_steps", "eval_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be an integer >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError(f"give --warmup_steps or --warmup_ratio, not both (got {self.warmup_steps} and "
                             f"{self.warmup_ratio})")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"--torch_dtype: expected one of {sorted(DTYPES)}, got {self.torch_dtype!r}")
        if self.gradient_checkpointing not in (None, *CHECKPOINTING_MODES):
            raise ValueError(f"--gradient_checkpointing: expected one of {CHECKPOINTING_MODES}, got "
                             f"{self.gradient_checkpointing!r}")

    def batches_per_epoch(self, num_rows: int) -> int:
        return math.ceil(num_rows / self.batch_size)

    def total_steps(self, num_rows: int) -> int:
        """Optimizer steps of the run: --max_steps if given (as in HF Trainer, it wins over --num_epochs), else
        what --num_epochs of data give."""
        if self.max_steps is not None:
            return self.max_steps
        available = self.num_epochs * self.batches_per_epoch(num_rows) // self.accumulation_steps
        if available < 1:
            raise ValueError(f"{num_rows} rows in batches of {self.batch_size} give "
                             f"{self.num_epochs * self.batches_per_epoch(num_rows)} micro-batches, fewer than one "
                             f"optimizer step of --accumulation_steps {self.accumulation_steps}")
        return available

    def epochs_needed(self, num_rows: int) -> int:
        """Passes over the data that total_steps takes."""
        micro_batches = self.total_steps(num_rows) * self.accumulation_steps
        return math.ceil(micro_batches / self.batches_per_epoch(num_rows))

    def warmup(self, total_steps: int) -> int:
        return math.ceil(self.warmup_ratio * total_steps) if self.warmup_ratio else self.warmup_steps


@dataclass
class StepLog:
    """One optimizer step, as metrics.jsonl records it."""

    step: int
    epoch: float           # passes over the data so far
    loss: float            # mean micro-batch loss (lambda_lm * CE + lambda_aux * aux) plus the task-router loss
    ce: float              # mean micro-batch cross-entropy (label smoothing included)
    aux: float             # mean micro-batch token-router auxiliary loss (unweighted)
    task_aux: float        # the task-router loss of the step (lambda_aux included)
    lr: float              # learning rate of this step (the B matrices: eta_b times it)
    grad_norm: float       # L2 norm of every trainable gradient, before clipping
    routing_entropy: float  # mean routing entropy (nats) over token routers and real tokens
    tokens_per_s: float    # real (non-padding) tokens of the step / its wall time


@dataclass
class TrainResult:
    checkpoint: str
    history: List[StepLog] = field(default_factory=list)
    evaluations: List[Dict] = field(default_factory=list)


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training after a complete step; `checkpoint` holds it (None: no step was complete)."""

    def __init__(self, step: int, checkpoint: Optional[str]):
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint = step, checkpoint


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


def checkpoint_steps(output_dir: str) -> List[int]:
    """Steps N of the complete `checkpoint-N` directories in output_dir, ascending."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))
                  and os.path.isfile(os.path.join(output_dir, name, TRAINING_STATE_FILE)))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete `checkpoint-N` directory with the highest N in output_dir, or None."""
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def remove_stale_temporaries(output_dir: str) -> List[str]:
    """Remove what interrupted checkpoint writes left in output_dir (`.checkpoint-N.tmp-*`, `.checkpoint-N.old-*`);
    returns their names. Call it before a run writes there (one run per directory)."""
    if not os.path.isdir(output_dir):
        return []
    stale = sorted(name for name in os.listdir(output_dir) if STALE_TEMPORARY_PATTERN.match(name))
    for name in stale:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return stale


def write_directory_atomically(directory: str, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary sibling of `directory`, which then replaces `directory` by renames. Everything
    in it gets the permissions the umask gives (mkdtemp makes 0700, and some writers, safetensors among them, 0600)."""
    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        write(tmp)
        _apply_umask(tmp)
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


def _apply_umask(top: str) -> None:
    directory_mode, file_mode = umask_mode(0o777), umask_mode(0o666)
    os.chmod(top, directory_mode)
    for root, directories, files in os.walk(top):
        for name in directories:
            os.chmod(os.path.join(root, name), directory_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


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


def rotate_checkpoints(output_dir: str, keep: int) -> List[str]:
    """Delete all but the newest `keep` complete checkpoints; returns the deleted directories."""
    doomed = [os.path.join(output_dir, f"checkpoint-{n}") for n in checkpoint_steps(output_dir)[:-keep]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def read_training_state(checkpoint: str) -> Dict:
    """The training state of `checkpoint` (optimizer, scheduler, RNG states, data position), with a one-line error
    naming the file when it is missing, truncated or not ours."""
    path = os.path.join(checkpoint, TRAINING_STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint!r} is not a training checkpoint: {TRAINING_STATE_FILE} is missing "
                                "(pass --resume a checkpoint-N directory or the run's --output_dir)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError or UnpicklingError for a damaged file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is damaged or truncated ({reason}); resume from an earlier checkpoint-N of the "
                         "run instead") from None
    missing = [k for k in ("step", "position", "optimizer", "scheduler", "rng") if not isinstance(state, dict)
               or k not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it was not written by hmora-train")
    return state


def load_training_state(checkpoint: str, optimizer, scheduler) -> tuple:
    """Restore optimizer, scheduler and RNG states from `checkpoint`; returns (step, next data position)."""
    state = read_training_state(checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], BatchPosition(**state["position"])


@dataclass
class WindowLog:
    loss: float
    ce: float
    aux: float
    task_aux: float
    routing_entropy: float
    tokens: int


def accumulate_window(model, micro_batches: Sequence[Sequence[Example]], pad_id: int, bf16: bool) -> WindowLog:
    """Backward of every micro-batch loss (summed, not divided), then of the task-router loss over all
    sequences of the window. Means are over the window's micro-batches.

    (Why not HF Trainer or accelerate's accumulate(): they divide the micro-batch losses, and the recipe's
    task-router loss is one extra backward per optimizer step over the whole window.)"""
    device = next(model.parameters()).device
    losses, ces, aux_losses, entropies, tokens = [], [], [], [], 0
    for micro in micro_batches:
        batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch, with_task_loss=False)  # the task-router loss comes once per window, below
        out.loss.backward()
        losses.append(out.loss.item())
        ces.append(out.ce_loss.item())
        aux_losses.append(out.aux_loss.item())
        entropies.append(routing_entropy(out.router_probs, batch["attention_mask"]))
        tokens += int(batch["attention_mask"].sum())
    task_ids, task_mask = left_pad([e.task_ids for micro in micro_batches for e in micro], pad_id)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        task_loss = model.task_aux_loss(task_ids.to(device), task_mask.to(device))
    if task_loss.requires_grad:  # no task routers: a constant zero
        task_loss.backward()
    return WindowLog(fmean(losses) + task_loss.item(), fmean(ces), fmean(aux_losses), task_loss.item(),
                     fmean(entropies), tokens)


class MetricsLog:
    """`metrics.jsonl` in the run directory, one JSON object per line (every optimizer step; every evaluation,
    its keys prefixed `eval_`), and TensorBoard event files under `tensorboard/` when asked for.

    A resumed run first drops the lines (and TensorBoard events) of steps after its checkpoint, which the
    interrupted run wrote but did not save, so the file tells one history."""

    def __init__(self, output_dir: str, resume_step: Optional[int] = None, tensorboard: bool = False):
        self.output_dir, self.resume_step, self.tensorboard = output_dir, resume_step, tensorboard
        self.path = os.path.join(output_dir, METRICS_FILE)
        if resume_step is None:
            if os.path.isfile(self.path):
                os.remove(self.path)
        elif os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and _step_of(line) <= resume_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        self.file = self.writer = None  # opened at the first record: a run that fails before its first step leaves none

    def write(self, record: Dict) -> None:
        if self.file is None:
            os.makedirs(self.output_dir, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
            if self.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(self.output_dir, TENSORBOARD_DIR),
                                            purge_step=None if self.resume_step is None else self.resume_step + 1)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    tag = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"
                    self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 0  # a line cut short by a crash: keep it out of the step order's way


class StopOnCtrlC:
    """Within `with`: the first Ctrl-C (SIGINT) asks training to stop after the step it is in (and save it); a
    second one interrupts at once. Only the main thread can handle signals; elsewhere Ctrl-C is as usual."""

    def __init__(self, log: Callable[[str], None]):
        self.requested, self.log, self.previous = False, log, None

    def __enter__(self) -> "StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again: stop at once, unsaved)")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(model, examples: Sequence[Example], args: TrainArgs, *, pad_id: int, tokenizer=None,
          run_info: Optional[Dict] = None, write_extra: Optional[Callable[[str], None]] = None,
          resume_from: Optional[str] = None, evaluate: Optional[Callable[[], Dict]] = None,
          tensorboard: bool = False, log: Callable[[str], None] = tqdm.write) -> TrainResult:
    """Train `model` (an HMoRA model whose adapter weights are already those of `resume_from`, if given).

    The model must return `loss`, `ce_loss`, `aux_loss` and `router_probs` from `model(**batch)` and offer
    `task_aux_loss(task_input_ids, task_attention_mask)` and `save_pretrained(dir)`. `evaluate()` (optional)
    returns eval metrics (names without the `eval_` prefix); it runs every `eval_steps` steps and at the end,
    under its own RNG state, so that evaluating never changes the training run.
    """
    total_steps = args.total_steps(len(examples))
    epochs = args.epochs_needed(len(examples))
    if args.max_steps is not None and epochs > args.num_epochs:
        log(f"--max_steps {args.max_steps} takes {epochs} passes over the {len(examples)} rows, more than "
            f"--num_epochs {args.num_epochs}: --max_steps wins (as in HF Trainer)")
    optimizer = build_optimizer(model, args.lr, args.eta_b, args.weight_decay)
    scheduler = build_scheduler(optimizer, args.schedule_name, args.warmup(total_steps), total_steps,
                                args.polynomial_power, args.num_cycles)
    trainable = [p for p in model.parameters() if p.requires_grad]
    run_info = dict(run_info or {}, train_args=asdict(args))
    for name in remove_stale_temporaries(args.output_dir):
        log(f"removed {os.path.join(args.output_dir, name)}, left by an interrupted checkpoint write")
    step, position = 0, BatchPosition()
    seed_everything(args.seed)
    if resume_from is not None:
        step, position = load_training_state(resume_from, optimizer, scheduler)
        log(f"resumed from {resume_from} at step {step}")
    metrics = MetricsLog(args.output_dir, resume_step=step if resume_from is not None else None,
                         tensorboard=tensorboard)
    batches_per_epoch = args.batches_per_epoch(len(examples))

    def checkpoint() -> str:
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        save_checkpoint(path, model, tokenizer, optimizer, scheduler, step, position, run_info, write_extra)
        if args.save_total_limit is not None:
            rotate_checkpoints(args.output_dir, args.save_total_limit)
        return path

    def run_evaluation() -> None:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            python_state = random.getstate()
            scores = evaluate()
            random.setstate(python_state)
        model.train()
        record = {"step": step, **{f"eval_{k}": v for k, v in scores.items()}}
        metrics.write(record)
        result.evaluations.append(record)
        log(f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()
                                                  if isinstance(v, float)))

    result = TrainResult(checkpoint=resume_from or "")
    stream = batch_order(len(examples), args.batch_size, args.seed, epochs, start=position)
    bar = tqdm(total=total_steps, initial=step, desc="hmora-train", dynamic_ncols=True)
    model.train()
    saved_step = step if resume_from is not None else None
    try:
        with StopOnCtrlC(log) as stop:
            while step < total_steps and not stop.requested:
                started = time.perf_counter()
                micro_batches = []
                for _ in range(args.accumulation_steps):
                    at, indices = next(stream)
                    micro_batches.append([examples[i] for i in indices])
                window = accumulate_window(model, micro_batches, pad_id, args.bf16)
                grads = [p.grad for p in trainable if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
                if args.max_grad_norm is not None:
                    torch.nn.utils.clip_grads_with_norm_(trainable, args.max_grad_norm, grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                position = BatchPosition(at.epoch, at.batch + 1)
                entry = StepLog(step, at.epoch + (at.batch + 1) / batches_per_epoch, window.loss, window.ce,
                                window.aux, window.task_aux, lr, grad_norm.item(), window.routing_entropy,
                                window.tokens / (time.perf_counter() - started))
                result.history.append(entry)
                metrics.write(asdict(entry))
                bar.update(1)
                bar.set_postfix(loss=f"{entry.loss:.4f}", lr=f"{lr:.2e}", entropy=f"{entry.routing_entropy:.3f}")
                if step % args.log_steps == 0 or step == total_steps:
                    log(f"step {step:>5}/{total_steps}  loss {entry.loss:.4f}  aux {entry.aux:.4f}  lr {lr:.3e}  "
                        f"routing entropy {entry.routing_entropy:.3f}")
                if evaluate is not None and (step == total_steps or (args.eval_steps and step % args.eval_steps == 0)):
                    run_evaluation()
                if step == total_steps or (args.save_steps and step % args.save_steps == 0):
                    result.checkpoint, saved_step = checkpoint(), step
            if stop.requested and step < total_steps:
                if step and saved_step != step:
                    result.checkpoint, saved_step = checkpoint(), step
                raise TrainingInterrupted(step, result.checkpoint if saved_step == step else None)
    finally:
        bar.close()
        metrics.close()
    return result
