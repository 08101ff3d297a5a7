"""Worker functions of the 2-process tests (importable by name in the spawned processes)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from distributed import (LR, ROWS_PER_RANK, STEPS, adapter_state, data_parallel_model, global_batch, shard,
                         window_forwards)


def torch_engine(rank: int, world: int, engine: str, steps: int, out_dir: str) -> None:
    """`steps` steps of SGD on this rank's shard under DDP or FSDP2 (fully_shard per decoder layer, then the root).

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
    for step in range(steps):
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


def trainer_arguments(out_dir: str, world: int, **extra):
    """SGD at a constant LR, no clipping, no dropout (Trainer draws the same dropout seeds on every rank, a
    single process other ones): the data-parallel run and its single-process equivalent differ only in sum order."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=ROWS_PER_RANK,
                             optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=0.0, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                             seed=3, data_seed=3, dataloader_drop_last=True, **extra)


def trainer_rows(world: int):
    rows = []
    for step in range(STEPS):
        batch = global_batch(step, world)
        rows += [{k: v[i] for k, v in batch.items()} for i in range(world * ROWS_PER_RANK)]
    return rows


def trainer_engine(rank: int, world: int, out_dir: str) -> None:
    """HMoRATrainer in the environment `accelerate launch` / torchrun give each process (RANK, WORLD_SIZE, ...):
    accelerate's multi-CPU DDP."""
    from hmora import HMoRATrainer

    model = data_parallel_model(dropout=0.0)
    trainer = HMoRATrainer(model=model, args=trainer_arguments(out_dir, world), train_dataset=trainer_rows(world))
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    torch.save(adapter_state(model), Path(out_dir) / f"rank{rank}.pt")


def trainer_single_process(out_dir: str, world: int) -> dict:
    """The single-process equivalent of `trainer_engine`: one process, the same seed and so the same shuffled batches
    of ROWS_PER_RANK rows, `world` of them accumulated per step (Trainer divides each by the accumulation steps, as
    DDP averages the ranks)."""
    from hmora import HMoRATrainer

    model = data_parallel_model(dropout=0.0)
    args = trainer_arguments(out_dir, world, gradient_accumulation_steps=world)
    HMoRATrainer(model=model, args=args, train_dataset=trainer_rows(world)).train()
    return adapter_state(model)


def deepspeed_engine(rank: int, world: int, stage: int, steps: int, out_dir: str) -> None:
    """`steps` steps of SGD on this rank's shard under DeepSpeed ZeRO-`stage` on the CPU with gloo, every parameter
    partitioned (ZeRO-3: none kept whole for being small). DeepSpeed clips the gradient norm to 1.0 unless told
    otherwise; the single-process run does not clip."""
    import deepspeed

    # gloo reduces on the CPU; DeepSpeed's shared-memory all-reduce would first JIT-compile its C++ op for minutes
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed("gloo")
    model = data_parallel_model().train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    config = {"train_micro_batch_size_per_gpu": ROWS_PER_RANK, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for step in range(steps):
        torch.manual_seed(1000 + step)
        engine.backward(engine(**shard(global_batch(step, world), rank)).loss)
        engine.step()
    with deepspeed.zero.GatheredParameters(list(model.adapter_named_parameters().values())):  # no-op below ZeRO-3
        state = adapter_state(model)
    torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    model.save_pretrained(Path(out_dir) / "adapter", is_main_process=rank == 0)  # gathers ZeRO-3's partitions
