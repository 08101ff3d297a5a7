"""Simulate a training process killed right after it wrote a given checkpoint."""
import pytest

import hmora.train as train_module


class Interrupted(Exception):
    pass


def run_interrupted_after(monkeypatch, checkpoint_name, run):
    """Call run() with checkpoint saving patched to raise Interrupted once `checkpoint_name` is on disk."""
    original_save = train_module.save_checkpoint

    def save_then_die(directory, *args, **kwargs):
        original_save(directory, *args, **kwargs)
        if directory.endswith(checkpoint_name):
            raise Interrupted

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        run()
    monkeypatch.undo()


def ctrl_c_during_step(monkeypatch, step):
    """Make the `step`-th optimizer step send this process a SIGINT (as Ctrl-C would) before it updates."""
    import os
    import signal

    import torch

    original_step, calls = torch.optim.AdamW.step, []

    def step_with_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_with_ctrl_c)
