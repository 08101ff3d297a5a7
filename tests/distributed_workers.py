"""Worker functions of the 2-process tests (importable by name in the spawned processes)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from distributed import LR, STEPS, adapter_state, data_parallel_model, global_batch, shard, window_forwards


def torch_engine(rank: int, world: int, engine: str, out_dir: str) -> None:
    """STEPS steps of SGD on this rank's shard under DDP or FSDP2 (fully_shard per decoder layer, then the root).

    "ddp-window": the shard as an accumulation window of the reference recipe (`window_forwards`), every
    micro-batch but the last under `no_sync`, the last carrying the window's task-router loss."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = data_parallel_model().train()
    if engine.startswith("ddp"):
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        rows = shard(global_batch(step, world), rank)
        if engine == "ddp-window":
            *accumulated, last = window_forwards(rows)
            with wrapped.no_sync():
                for micro in accumulated:
                    torch.manual_seed(1000 + step)
                    wrapped(**micro).loss.backward()
        else:
            last = rows
        torch.manual_seed(1000 + step)
        wrapped(**last).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = adapter_state(model)
    torch.save(state, Path(out_dir) / f"rank{rank}.pt")
