"""2-process data-parallel runs on CPU with gloo, and the single-process run each must equal.

The single-process equivalent of W ranks, each taking its shard of a global batch: one process, one model, that
takes the W shards one after another as W micro-batches, backpropagates each shard's `out.loss / W` (the ranks'
mean, which DDP / FSDP form by all-reducing and dividing) and steps once. Every loss term of ours is a function of one
micro-batch (the CE mean, the routers' GJS over its tokens, the task routers' GJS over its sequences), so the rank
and the micro-batch compute the same function of the same rows; dropout draws the same masks because every forward
seeds the generator with its step. Only the order of fp32 sums differs.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_hmora_model import batch, tiny_model

WORLD = 2
STEPS = 3
ROWS_PER_RANK = 2
LR = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable, *args, world: int = WORLD) -> None:
    """Run worker(rank, world, *args) in `world` processes joined by a gloo process group on this machine.

    Forked, not spawned: the children start with torch and transformers already imported (a spawned pair spends
    ~10 s importing them); the parent never creates a process group, so nothing distributed is inherited."""
    mp.start_processes(_entry, args=(world, free_port(), worker, args), nprocs=world, join=True,
                       start_method="fork")


def _entry(rank: int, world: int, port: int, worker: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        worker(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def data_parallel_model(dropout: float = 0.1):
    """The model every run starts from: paper routing (hybrid layers, top-2, task router)."""
    return tiny_model("qwen2", dropout=dropout)


def global_batch(step: int, world: int = WORLD) -> Dict[str, torch.Tensor]:
    ids, mask, labels = batch(seed=100 + step, rows=world * ROWS_PER_RANK)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shard(rows: Dict[str, torch.Tensor], rank: int) -> Dict[str, torch.Tensor]:
    return {k: v[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK] for k, v in rows.items()}


def adapter_state(model) -> Dict[str, torch.Tensor]:
    """Full adapter tensors (FSDP2's DTensors gathered; a collective, so every rank calls it)."""
    state = {}
    for name, p in model.adapter_named_parameters().items():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        state[name] = full.detach().clone()
    return state


def window_forwards(rows: Dict[str, torch.Tensor]):
    """The reference recipe on one rank's rows as an accumulation window of one-row micro-batches: the keyword
    arguments of each micro-batch's forward; the last one carries the task-router loss over the whole window's
    sources (its prompt parts), the others leave it out."""
    from hmora.model import prompt_part

    sources = prompt_part(rows["input_ids"], rows["attention_mask"], rows["labels"])
    micro = [{k: v[i:i + 1] for k, v in rows.items()} for i in range(rows["input_ids"].shape[0])]
    for forward in micro[:-1]:
        forward["with_task_loss"] = False
    micro[-1].update(task_loss_input_ids=sources[0], task_loss_attention_mask=sources[1])
    return micro


def single_process_run(world: int = WORLD, steps: int = STEPS, window: bool = False,
                       dropout: float = 0.1) -> Dict[str, torch.Tensor]:
    """`window`: each rank's shard is an accumulation window (`window_forwards`), its micro-batch losses summed."""
    model = data_parallel_model(dropout).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(steps):
        rows = global_batch(step, world)
        for rank in range(world):
            for micro in window_forwards(shard(rows, rank)) if window else [shard(rows, rank)]:
                torch.manual_seed(1000 + step)
                (model(**micro).loss / world).backward()
        optimizer.step()
        optimizer.zero_grad()
    return adapter_state(model)


def max_relative_difference(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max|b|."""
    assert set(state) == set(expected)
    return max(((state[n] - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for n, e in expected.items())


def load_ranks(directory: Path, world: int = WORLD):
    return [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(world)]
