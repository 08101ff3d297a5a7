"""TRL's SFTTrainer (a test extra) trains an HMoRAModel with task routing through `hmora.trainer_class`: the model's
own forward and loss (CE + token and task routers' losses), adapter-only checkpoints. With TRL >= 0.20 on
prompt-completion rows (the prompt masked in the labels, so the task router reads it); with the TRL that pairs with
transformers 4.44 (0.11) on text rows (nothing masked: the task router reads the whole sequence)."""
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from hmora import HMoRAConfig, get_hmora_model, trainer_class  # noqa: E402
from hmora.checkpoint import WEIGHTS_NAME  # noqa: E402
from hmora.tiny import build_tiny_base, build_tiny_tokenizer, synthetic_rows  # noqa: E402


def test_sft_trainer_trains_routers_task_encoder_and_adapters(tmp_path):
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = get_hmora_model(build_tiny_base(tokenizer), HMoRAConfig(num_experts=4, lora_r=2, dropout=0.1),
                            tokenizer=tokenizer)
    fields = set(trl.SFTConfig.__dataclass_fields__)
    prompt_completion = "completion_only_loss" in fields  # TRL >= 0.20; the TRL of transformers 4.44 trains on text
    if prompt_completion:
        rows = [{"prompt": r["source"], "completion": r["target"]} for r in synthetic_rows(8, seed=0)]
        extra = {"max_length": 64}
    else:
        rows = [{"text": f"{r['source']} {r['target']}"} for r in synthetic_rows(8, seed=0)]
        extra = {"max_seq_length": 64, "dataset_text_field": "text"}
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], use_cpu=True, disable_tqdm=True, save_steps=2, **extra)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    import inspect

    takes = "processing_class" if "processing_class" in inspect.signature(trl.SFTTrainer).parameters else "tokenizer"
    trainer = trainer_class(trl.SFTTrainer)(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                            **{takes: tokenizer})
    seen = []
    model.register_forward_hook(lambda module, args, kwargs, out: seen.append(
        (not prompt_completion or (kwargs["labels"] == -100).any().item()) and out.task_aux_loss is not None),
        with_kwargs=True)
    result = trainer.train()
    assert seen and all(seen)  # our forward (labels masking the prompt), the task routers' loss in the loss
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(model.trainable_parameter_names())
    assert any(".task_mlp." in n for n in changed) and any(n.startswith("task_encoder.") for n in changed)
    assert (tmp_path / "checkpoint-2" / WEIGHTS_NAME).is_file()
