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
