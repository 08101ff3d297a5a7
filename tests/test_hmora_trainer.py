"""HF Trainer trains the wrapped model unchanged: its loss is `outputs.loss` (CE + lambda_aux * aux)."""
import dataclasses

import torch
from transformers import Trainer, TrainingArguments

from test_hmora_model import batch, tiny_model


def test_hf_trainer_trains_a_few_steps(tmp_path):
    """With activation checkpointing switched on by the Trainer (reentrant, the transformers 4.x default)."""
    model = tiny_model("qwen2", perturb=False, dropout=0.1)
    ids, mask, labels = batch(rows=2)
    rows = [{"input_ids": ids[i % 2], "attention_mask": mask[i % 2], "labels": labels[i % 2],
             "task_input_ids": ids[i % 2, :5], "task_attention_mask": mask[i % 2, :5]} for i in range(8)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing
    prefix = "activation" if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)} \
        else "gradient"
    checkpointing = {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": True}}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                             disable_tqdm=True, **checkpointing)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    assert model.is_activation_checkpointing
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(model.trainable_parameter_names())  # every adapter tensor trained, the base frozen
