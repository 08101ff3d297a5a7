"""hmora: hierarchical mixture of LoRA experts (HMoRA, ICLR 2025) on transformers causal LMs.

    from hmora import HMoRAConfig, get_hmora_model, HMoRAModel
    model = get_hmora_model(base_causal_lm, HMoRAConfig(...))
    model = HMoRAModel.from_pretrained(base_causal_lm, directory)
    model = import_reference_checkpoint(base_causal_lm, reference_adapter_directory)
    HMoRATrainer(model=model, args=...)   # transformers.Trainer with adapter-only checkpoints and exact resume

B matrices are the parameters whose names end in `lora_B` (`HMoRAModel.is_b_matrix`).
"""
from .config import HMoRAConfig
from .hf_trainer import HMoRATrainer, HMoRATrainerMixin, trainer_class
from .importer import import_reference_checkpoint
from .model import HMoRAModel, HMoRAOutput, get_hmora_model

__all__ = ["HMoRAConfig", "HMoRAModel", "HMoRAOutput", "HMoRATrainer", "HMoRATrainerMixin", "get_hmora_model",
           "import_reference_checkpoint", "trainer_class"]
