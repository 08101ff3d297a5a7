"""The training loop of the reference recipe (SPEC 5), with atomic checkpoints and exact resume, in one process or
data-parallel in several (torch DDP, under torchrun or accelerate launch).

Per optimizer step: a window of `accumulation_steps` micro-batches per process, each `out.loss.backward()` on its
own (the losses are summed, not divided); the task-router auxiliary loss once per step over every sequence of the
window, inside the last micro-batch's forward (`task_loss_input_ids`); optional clipping; AdamW; schedule; the
rank-wise routing bias update.

Across W processes the recipe's sums stay sums: W processes with accumulation A take, per step, the next W * A
micro-batches of the one data stream (process r the micro-batches r, r + W, r + 2W, ...), their gradients are
summed (not averaged) and the main process's last forward carries the task-router loss over all W * A micro-batches'
sources. So a W-process run equals one process with accumulation W * A over the same micro-batches, up to the
order of float sums and the dropout masks (each process draws its own, from seed + rank).

A checkpoint directory `checkpoint-N/` holds `adapter/` (model.save_pretrained), `tokenizer/`, `run.json` (what
the caller says the run is, plus the step) and `training_state.pt` (optimizer, scheduler, RNG states, data
position). It is written to a temporary directory and renamed into place, so a crash never leaves a half-written
`checkpoint-N/` and never damages the previous one.
"""
from __future__ import annotations

import contextlib
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
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

    def total_steps(self, num_rows: int, processes: int = 1) -> int:
        """Optimizer steps of the run: --max_steps if given (as in HF Trainer, it wins over --num_epochs), else
        what --num_epochs of data give (a step takes accumulation_steps micro-batches in each of `processes`)."""
        if self.max_steps is not None:
            return self.max_steps
        available = self.num_epochs * self.batches_per_epoch(num_rows) // (self.accumulation_steps * processes)
        if available < 1:
            across = f" in each of {processes} processes" if processes > 1 else ""
            raise ValueError(f"{num_rows} rows in batches of {self.batch_size} give "
                             f"{self.num_epochs * self.batches_per_epoch(num_rows)} micro-batches, fewer than one "
                             f"optimizer step of --accumulation_steps {self.accumulation_steps}{across}")
        return available

    def epochs_needed(self, num_rows: int, processes: int = 1) -> int:
        """Passes over the data that total_steps takes."""
        micro_batches = self.total_steps(num_rows, processes) * self.accumulation_steps * processes
        return math.ceil(micro_batches / self.batches_per_epoch(num_rows))

    def warmup(self, total_steps: int) -> int:
        return math.ceil(self.warmup_ratio * total_steps) if self.warmup_ratio else self.warmup_steps


@dataclass
class StepLog:
    """One optimizer step, as metrics.jsonl records it (over every process's micro-batches)."""

    step: int
    epoch: float           # passes over the data so far
    loss: float            # mean micro-batch loss (out.loss without the task-router loss) plus the task-router loss
    ce: float              # mean micro-batch cross-entropy (label smoothing included)
    aux: float             # mean micro-batch out.aux_loss: HMoRA's token-router loss unweighted (lambda_aux weighs it
    #                        in the loss); under a routing variant its losses times their coefficients, as in the loss
    task_aux: float        # the task-router loss of the step, as in the loss (lambda_aux included; 0 under a variant)
    lr: float              # learning rate of this step (the B matrices: eta_b times it)
    grad_norm: float       # L2 norm of every trainable gradient, before clipping
    routing_entropy: float  # mean routing entropy (nats) over token routers and real tokens
    tokens_per_s: float    # real (non-padding) tokens of the step / its wall time
    # a routing variant's losses (out.aux_loss_terms: "balance", "z", "entropy"), each unweighted, mean micro-batch
    aux_terms: Dict[str, float] = field(default_factory=dict)

    def record(self) -> Dict:
        """The metrics.jsonl line: the fields, aux_terms flattened to aux_<name>."""
        record = asdict(self)
        record.update({f"aux_{name}": value for name, value in record.pop("aux_terms").items()})
        return record

    def summary(self) -> str:
        """The auxiliary losses for the log line: aux, or a variant's own losses by name."""
        if self.aux_terms:
            return "  ".join(f"aux_{name} {value:.4f}" for name, value in self.aux_terms.items())
        return f"aux {self.aux:.4f}"


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
    """This process's random state: Python's, torch's CPU generator and, when CUDA is in use, the current device's
    (under a launcher each process owns one device)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        # a list: every device's state, as checkpoints before data-parallel training saved it
        torch.cuda.set_rng_state_all(cuda) if isinstance(cuda, (list, tuple)) else torch.cuda.set_rng_state(cuda)


def this_process() -> Tuple[int, int]:
    """(rank, number of processes) of torch.distributed's default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def every_rng_state(processes: int) -> List[Dict]:
    """Every process's `rng_state()`, in rank order (a collective when there are several)."""
    if processes == 1:
        return [rng_state()]
    states: List[Optional[Dict]] = [None] * processes
    dist.all_gather_object(states, rng_state())
    return states


def sum_over_processes(values: List[float], processes: int) -> List[float]:
    """Element-wise sums of `values` over the processes (float64, one all-reduce)."""
    if processes == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def _sum_gradients(state, bucket):
    """DDP communication hook: the processes' gradients summed, not averaged (DDP's default divides by their
    number): the recipe sums its micro-batch losses, and a step's micro-batches are spread over the processes."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda done: done.value()[0])


def routing_entropy(router_probs: Dict[str, torch.Tensor], attention_mask: torch.Tensor) -> float:
    """Mean over routers of the mean entropy (nats) of their (B, S, E) routing probabilities on real tokens
    (rank-wise routing: of its sigmoid scores normalised to sum 1)."""
    if not router_probs:
        return float("nan")
    mask = attention_mask.to(torch.float32)
    entropies = []
    for probs in router_probs.values():
        p = probs.detach().float()
        p = p / p.sum(-1, keepdim=True)  # rank-wise routers give sigmoid scores, not a distribution
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
                    run_info: Dict, write_extra: Optional[Callable[[str], None]] = None,
                    rng_states: Optional[List[Dict]] = None) -> str:
    """Write checkpoint `directory` atomically; `write_extra(tmp_dir)` adds the caller's files (e.g. the base).
    `rng_states`: every process's RNG state in rank order (default: this process's)."""
    def write(tmp: str) -> None:
        model.save_pretrained(os.path.join(tmp, ADAPTER_DIR))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
        torch.save({"step": step, "position": asdict(position), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_states or [rng_state()]},
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


def load_training_state(checkpoint: str, optimizer, scheduler, rank: int = 0) -> Tuple[int, BatchPosition, int]:
    """Restore optimizer, scheduler and process `rank`'s RNG state from `checkpoint` (a process the saved run did not
    have keeps its own); returns (step, next data position, number of processes the run was saved by)."""
    state = read_training_state(checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older: one process's
    if rank < len(rng_states):
        set_rng_state(rng_states[rank])
    return state["step"], BatchPosition(**state["position"]), len(rng_states)


@dataclass
class WindowLog:
    """Sums over the micro-batches of a window (one process's, or, after `over_processes`, the whole step's)."""

    micro_batches: int = 0
    loss: float = 0.0      # out.loss without the task-router loss
    ce: float = 0.0
    aux: float = 0.0
    task_aux: float = 0.0  # the task-router loss as it is in out.loss (only in the forward that takes it)
    routing_entropy: float = 0.0
    tokens: int = 0
    aux_terms: Dict[str, float] = field(default_factory=dict)

    def add(self, out, attention_mask: torch.Tensor, task_aux: float) -> None:
        self.micro_batches += 1
        self.loss += out.loss.item() - task_aux
        self.ce += out.ce_loss.item()
        self.aux += out.aux_loss.item()
        self.task_aux += task_aux
        self.routing_entropy += routing_entropy(out.router_probs, attention_mask)
        self.tokens += int(attention_mask.sum())
        for name, term in (getattr(out, "aux_loss_terms", None) or {}).items():
            self.aux_terms[name] = self.aux_terms.get(name, 0.0) + term.item()

    def over_processes(self, processes: int, stop: bool) -> Tuple["WindowLog", bool]:
        """The sums over every process's window, and whether any process was asked to stop (one all-reduce)."""
        names = list(self.aux_terms)
        totals = sum_over_processes([self.micro_batches, self.loss, self.ce, self.aux, self.task_aux,
                                     self.routing_entropy, self.tokens, float(stop),
                                     *(self.aux_terms[n] for n in names)], processes)
        count, loss, ce, aux, task_aux, entropy, tokens, stops, *terms = totals
        return WindowLog(int(count), loss, ce, aux, task_aux, entropy, int(tokens), dict(zip(names, terms))), stops > 0

    def step_log(self, step: int, epoch: float, lr: float, grad_norm: float, seconds: float) -> StepLog:
        n = self.micro_batches
        return StepLog(step, epoch, self.loss / n + self.task_aux, self.ce / n, self.aux / n, self.task_aux, lr,
                       grad_norm, self.routing_entropy / n, self.tokens / seconds,
                       {name: value / n for name, value in self.aux_terms.items()})


def task_loss_weight(model) -> float:
    """The weight of out.task_aux_loss inside out.loss: lambda_auxiliary, or 0 under a routing variant (its task
    routers have no loss)."""
    config = model.hmora_config
    return 0.0 if config.routing_variant is not None else config.lambda_auxiliary


def accumulate_window(model, micro_batches: Sequence[Sequence[Example]], pad_id: int, bf16: bool,
                      task_sources: Optional[Sequence[Sequence[int]]] = None, data_parallel=None) -> WindowLog:
    """Backward of every micro-batch loss (summed, not divided). The last forward also takes the task-router loss
    over `task_sources`, the task ids of every sequence of the optimizer step (None: no task-router loss in this
    process's forwards). `data_parallel`: the DDP wrapper of `model`, whose gradients are synchronised in the last
    backward only.

    (Why not HF Trainer or accelerate's accumulate(): they divide the micro-batch losses, and the recipe's
    task-router loss is one term per optimizer step over the whole window.)"""
    device = next(model.parameters()).device
    forward = data_parallel or model
    weight = task_loss_weight(model)
    log = WindowLog()
    for index, micro in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
        task_loss = {"with_task_loss": False}
        if last and task_sources is not None:
            ids, mask = left_pad(task_sources, pad_id)
            task_loss = {"task_loss_input_ids": ids.to(device), "task_loss_attention_mask": mask.to(device)}
        with contextlib.nullcontext() if last or data_parallel is None else data_parallel.no_sync():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = forward(**batch, **task_loss)
            out.loss.backward()
        log.add(out, batch["attention_mask"], 0.0 if out.task_aux_loss is None else weight * out.task_aux_loss.item())
    return log


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


def wrap_data_parallel(model, processes: int):
    """`model` in torch's DistributedDataParallel with summed gradients (`_sum_gradients`), or None in one process.

    (Why DDP itself and not accelerate's Accelerator: the loop needs only DDP's no_sync and gradient all-reduce;
    accelerate's backward divides by its accumulation steps and its prepared optimizer and dataloader would stand
    between the loop and the recipe's summed losses, window task loss and exact resume. Both launchers, torchrun
    and accelerate launch, start processes with the same environment, which is all this needs.)"""
    if processes == 1:
        return None
    device = next(model.parameters()).device
    # no buffer broadcast before each forward: the only buffer that changes, rank-wise routing's selection bias,
    # moves identically in every process (update_routing_bias all-reduces its counts)
    wrapped = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=None if device.type == "cpu" else [device.index], forward_sync_buffers=False)
    wrapped.register_comm_hook(None, _sum_gradients)
    return wrapped


def train(model, examples: Sequence[Example], args: TrainArgs, *, pad_id: int, tokenizer=None,
          run_info: Optional[Dict] = None, write_extra: Optional[Callable[[str], None]] = None,
          resume_from: Optional[str] = None, evaluate: Optional[Callable[[], Dict]] = None,
          tensorboard: bool = False, log: Callable[[str], None] = tqdm.write) -> TrainResult:
    """Train `model` (an HMoRA model whose adapter weights are already those of `resume_from`, if given), in this
    process or, when torch.distributed's default group is initialised, data-parallel with every process of it
    (each calls train with the same arguments; see the module docstring for what the run then equals).

    The model must take `with_task_loss` / `task_loss_input_ids` / `task_loss_attention_mask` and return `loss`,
    `ce_loss`, `aux_loss`, `task_aux_loss` and `router_probs` from `model(**batch)`, and have `hmora_config` and
    `save_pretrained(dir)`. `evaluate()` (optional) returns eval metrics (names without the `eval_` prefix); it runs
    every `eval_steps` steps and at the end, in the main process only, under its own RNG state, so that evaluating
    never changes the training run. Only the main process (rank 0) writes checkpoints, metrics and log lines.
    """
    rank, processes = this_process()
    main = rank == 0
    if not main:
        log = _quiet
    total_steps = args.total_steps(len(examples), processes)
    epochs = args.epochs_needed(len(examples), processes)
    if args.max_steps is not None and epochs > args.num_epochs:
        log(f"--max_steps {args.max_steps} takes {epochs} passes over the {len(examples)} rows, more than "
            f"--num_epochs {args.num_epochs}: --max_steps wins (as in HF Trainer)")
    optimizer = build_optimizer(model, args.lr, args.eta_b, args.weight_decay)
    scheduler = build_scheduler(optimizer, args.schedule_name, args.warmup(total_steps), total_steps,
                                args.polynomial_power, args.num_cycles)
    trainable = [p for p in model.parameters() if p.requires_grad]
    run_info = dict(run_info or {}, train_args=asdict(args))
    if main:
        for name in remove_stale_temporaries(args.output_dir):
            log(f"removed {os.path.join(args.output_dir, name)}, left by an interrupted checkpoint write")
    step, position = 0, BatchPosition()
    seed_everything(args.seed + rank)  # every process its own dropout masks
    if resume_from is not None:
        step, position, saved_by = load_training_state(resume_from, optimizer, scheduler, rank)
        log(f"resumed from {resume_from} at step {step}")
        if saved_by != processes:
            log(f"the run was saved by {saved_by} processes and continues in {processes}: its steps now take "
                f"{args.accumulation_steps * processes} micro-batches, and the dropout masks are not those the "
                "interrupted run would have drawn")
    metrics = MetricsLog(args.output_dir, resume_step=step if resume_from is not None else None,
                         tensorboard=tensorboard) if main else None
    batches_per_epoch = args.batches_per_epoch(len(examples))
    data_parallel = wrap_data_parallel(model, processes)

    def checkpoint() -> str:
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        rng_states = every_rng_state(processes)
        if main:
            save_checkpoint(path, model, tokenizer, optimizer, scheduler, step, position, run_info, write_extra,
                            rng_states)
            if args.save_total_limit is not None:
                rotate_checkpoints(args.output_dir, args.save_total_limit)
        if processes > 1:
            dist.barrier()  # the checkpoint is on disk before any process goes on (and may read it)
        return path

    def run_evaluation() -> None:
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
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
    # without end: the steps say when to stop (a run resumed in fewer processes than it was saved by needs more
    # passes than its own count says)
    stream = batch_order(len(examples), args.batch_size, args.seed, None, start=position)
    bar = tqdm(total=total_steps, initial=step, desc="hmora-train", dynamic_ncols=True, disable=not main)
    model.train()
    saved_step = step if resume_from is not None else None
    try:
        with StopOnCtrlC(log) as stop:
            stopping = False
            while step < total_steps and not stopping:
                started = time.perf_counter()
                # the step's W * A micro-batches in stream order; process r takes r, r + W, ...
                window = [next(stream) for _ in range(args.accumulation_steps * processes)]
                at = window[-1][0]
                mine = [[examples[i] for i in indices] for _, indices in window[rank::processes]]
                sources = [examples[i].task_ids for _, indices in window for i in indices] if main else None
                own = accumulate_window(model, mine, pad_id, args.bf16, sources, data_parallel)
                grads = [p.grad for p in trainable if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
                if args.max_grad_norm is not None:
                    torch.nn.utils.clip_grads_with_norm_(trainable, args.max_grad_norm, grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                model.update_routing_bias()  # rank-wise routing's selection bias, every process alike; else no-op
                totals, stopping = own.over_processes(processes, stop.requested)  # all stop after the same step
                step += 1
                position = BatchPosition(at.epoch, at.batch + 1)
                entry = totals.step_log(step, at.epoch + (at.batch + 1) / batches_per_epoch, lr, grad_norm.item(),
                                        time.perf_counter() - started)
                result.history.append(entry)
                if main:
                    metrics.write(entry.record())
                bar.update(1)
                bar.set_postfix_str(f"loss {entry.loss:.4f}  {entry.summary()}  lr {lr:.2e}  "
                                    f"entropy {entry.routing_entropy:.3f}")
                if step % args.log_steps == 0 or step == total_steps:
                    log(f"step {step:>5}/{total_steps}  loss {entry.loss:.4f}  {entry.summary()}  lr {lr:.3e}  "
                        f"routing entropy {entry.routing_entropy:.3f}")
                if main and evaluate is not None and (step == total_steps or
                                                      (args.eval_steps and step % args.eval_steps == 0)):
                    run_evaluation()
                if step == total_steps or (args.save_steps and step % args.save_steps == 0):
                    result.checkpoint, saved_step = checkpoint(), step
            if stopping and step < total_steps:
                if step and saved_step != step:
                    result.checkpoint, saved_step = checkpoint(), step
                raise TrainingInterrupted(step, result.checkpoint if saved_step == step else None)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return result


def _quiet(message: str) -> None:
    """The log of a process other than the main one: it says nothing."""
