"""`accelerate launch ... accelerate_train.py OUT_DIR`: the data-parallel Trainer run of tests/distributed_workers.py
in the process accelerate started (it sets RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
import os
import sys

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py
torch.set_num_threads(1)

from distributed_workers import trainer_engine  # noqa: E402

if __name__ == "__main__":
    trainer_engine(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1])
