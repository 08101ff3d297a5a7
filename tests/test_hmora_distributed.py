"""Data-parallel and sharded training with 2 processes on CPU (gloo): after a few steps the adapter weights equal the
single-process run on the same global batch (tests/distributed.py says what that run is) within fp32 round-off, and
every rank holds the same weights."""
import pytest
import torch

import distributed_workers
from distributed import (adapter_state, data_parallel_model, load_ranks, max_relative_difference, single_process_run,
                         spawn)

pytestmark = pytest.mark.distributed

FP32_ROUNDOFF = 1e-5  # relative; sums of the two shards' gradients in another order, over 3 SGD steps


@pytest.fixture(scope="module")
def single_process():
    """engine -> the single-process run it must equal; each run moved every adapter tensor."""
    initial = adapter_state(data_parallel_model())
    runs = {"batch": single_process_run(), "window": single_process_run(window=True)}
    for run in runs.values():
        assert sum(not torch.equal(run[n], t) for n, t in initial.items()) == len(initial)
    return runs


@pytest.mark.parametrize("engine", ["ddp", "ddp-window", "fsdp2"])
def test_torch_engines_equal_the_single_process_run(tmp_path, single_process, engine):
    """ddp-window: the reference recipe (task-router loss once per window, over its sources) under DDP."""
    spawn(distributed_workers.torch_engine, engine, str(tmp_path))
    ranks = load_ranks(tmp_path)
    for name, tensor in ranks[0].items():  # the task-router loss is all-reduced with the rest: no drift
        assert torch.equal(tensor, ranks[1][name]), name
    expected = single_process["window" if engine == "ddp-window" else "batch"]
    difference = max_relative_difference(ranks[0], expected)
    print(f"{engine}: max relative difference to the single-process run {difference:.3g}")
    assert difference <= FP32_ROUNDOFF
