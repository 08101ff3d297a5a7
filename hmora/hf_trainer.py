"""HF Trainer (and TRL trainers) with HMoRA checkpoints: adapter-only, loadable by `HMoRAModel.from_pretrained`.

`transformers.Trainer` saves a model that is neither a `PreTrainedModel` nor a PEFT model as its whole state dict,
frozen base included, and resumes only from files it knows. `HMoRATrainerMixin` saves `hmora_adapter.safetensors`
+ `hmora_config.json` (plus Trainer's own optimizer, scheduler, RNG and trainer state) and resumes from them; under
FSDP it takes the adapter from the full state dict Trainer gathers. Its `compute_loss` is the model's own
`out.loss` (cross-entropy + routers' losses): TRL's `SFTTrainer` would otherwise compute a fused-head loss that skips
both the routers' losses and HMoRAModel's forward.

    from hmora import HMoRATrainer                       # transformers.Trainer with HMoRA checkpoints
    SFT = hmora.trainer_class(trl.SFTTrainer)            # any Trainer subclass
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from transformers import Trainer

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, is_checkpoint, read_checkpoint

# Trainer writes the arguments it ran with under this name (transformers.trainer.TRAINING_ARGS_NAME)
TRAINING_ARGS_NAME = "training_args.bin"


class HMoRATrainerMixin:
    """Put before a `transformers.Trainer` subclass: `class T(HMoRATrainerMixin, Trainer)`."""

    def _hmora_model(self):
        from .model import HMoRAModel

        model = self.accelerator.unwrap_model(self.model)
        return model if isinstance(model, HMoRAModel) else None

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        model = self._hmora_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)  # < 4.46: tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self._hmora_model() if model is None else self.accelerator.unwrap_model(model)
        if target is None or not is_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_hmora_checkpoint(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        target = self._hmora_model()
        if target is None or best is None or not is_checkpoint(best):
            return super()._load_best_model()
        self._load_hmora_checkpoint(target, best)

    def _load_rng_state(self, checkpoint) -> None:
        # transformers < 4.49 reads its own rng_state.pth with torch.load's default, which torch >= 2.6 made
        # weights_only: allow the numpy RNG state that Trainer itself wrote there
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return super()._load_rng_state(checkpoint)

    @staticmethod
    def _load_hmora_checkpoint(model, directory: str) -> None:
        config, tensors = read_checkpoint(directory)
        if config.to_dict() != model.hmora_config.to_dict():
            raise ValueError(f"{os.path.join(directory, CONFIG_NAME)} differs from the model's HMoRA config; resume "
                             f"with the config the checkpoint was trained with")
        model.load_adapter_state_dict(tensors, source=os.path.join(directory, WEIGHTS_NAME))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._hmora_model() is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def _numpy_rng_globals() -> list:
    import importlib

    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # numpy 2
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")  # numpy 1
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@functools.lru_cache(maxsize=None)
def trainer_class(base: type) -> type:
    """`base` (transformers.Trainer or a subclass such as trl.SFTTrainer) with HMoRA checkpoints and loss."""
    return type(f"HMoRA{base.__name__}", (HMoRATrainerMixin, base), {"__module__": __name__})


HMoRATrainer = trainer_class(Trainer)
