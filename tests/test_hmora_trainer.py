"""HF Trainer trains the wrapped model unchanged: its loss is `outputs.loss` (CE + lambda_aux * aux)."""
import dataclasses
import os

import safetensors.torch
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


def test_trainer_optimises_the_task_router_loss(tmp_path):
    """lambda_lm = 0 and B = 0: neither the LM loss nor the token routers' loss reaches a task router, so whatever
    gradient the task routers get under Trainer is the task-router loss's. It must equal d out.loss / d params."""
    model = tiny_model("qwen2", perturb=False, lambda_lm=0.0, lambda_auxiliary=1.0)
    ids, mask, labels = batch(rows=2)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(2)]
    expected = model(input_ids=ids, attention_mask=mask, labels=labels)
    expected.loss.backward()
    task_side = {n: p.grad.clone() for n, p in model.named_parameters() if "task_mlp" in n}
    assert task_side and all(g.abs().sum() > 0 for g in task_side.values())
    model.zero_grad()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=0.0)  # no clipping
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    seen = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: seen.update({n: p.grad.clone() for n, p in model.named_parameters() if n in task_side}))
    trainer.train()
    for name, grad in task_side.items():
        torch.testing.assert_close(seen[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def _trainer_rows():
    ids, mask, labels = batch(rows=2)
    return [{"input_ids": ids[i % 2], "attention_mask": mask[i % 2], "labels": labels[i % 2]} for i in range(8)]


def _args(tmp_path, max_steps, **extra):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, save_steps=2,
                             seed=7, data_seed=7, **extra)


def test_trainer_checkpoints_are_adapter_only_and_resume_exactly(tmp_path):
    """HMoRATrainer writes hmora_adapter.safetensors + hmora_config.json (no frozen base) that
    HMoRAModel.from_pretrained loads; a run resumed from checkpoint-2 ends bit-identical to an uninterrupted one."""
    from hmora import HMoRAModel, HMoRATrainer
    from hmora.checkpoint import CONFIG_NAME, WEIGHTS_NAME
    from test_hmora_model import tiny_base

    full = tiny_model("qwen2", dropout=0.1)
    HMoRATrainer(model=full, args=_args(tmp_path / "full", 4), train_dataset=_trainer_rows()).train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {WEIGHTS_NAME, CONFIG_NAME} <= files and not {"model.safetensors", "pytorch_model.bin"} & files
    stored = safetensors.torch.load_file(str(checkpoint / WEIGHTS_NAME))
    assert set(stored) == set(full.adapter_named_parameters())  # the adapter only
    reloaded = HMoRAModel.from_pretrained(tiny_base("qwen2"), checkpoint)
    assert reloaded.hmora_config == full.hmora_config

    resumed = tiny_model("qwen2", dropout=0.1)
    trainer = HMoRATrainer(model=resumed, args=_args(tmp_path / "full", 4), train_dataset=_trainer_rows())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for name, param in full.adapter_named_parameters().items():
        assert torch.equal(resumed.adapter_named_parameters()[name], param), name
