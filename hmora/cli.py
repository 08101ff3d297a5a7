"""Console scripts `hmora-train` and `hmora-generate`.

`hmora-train` with no --model and no --dataset trains the embedded default (hmora.tiny: a tiny random Qwen2 on
synthetic tasks), prints the loss falling and the per-task routing, saves a checkpoint, reloads it and generates.
The HMoRA flags keep the reference script's names; booleans also take a `--no-` form and default to the paper
setting of `HMoRAConfig`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import torch

from hmora_kernels import BACKENDS

from .config import LORA_SCALINGS, RENORMS, HMoRAConfig
from .data import (DEFAULT_MAX_LENGTH, TEMPLATES, PromptTemplate, encode_prompt, encode_rows, left_pad, load_rows,
                   task_tokens, template_for)
from .model import HMoRAModel, get_hmora_model
from .optim import SCHEDULES
from .tiny import build_tiny_base, build_tiny_tokenizer, synthetic_rows
from .train import (ADAPTER_DIR, RUN_INFO_FILE, TOKENIZER_DIR, TrainArgs, latest_checkpoint, seed_everything,
                    train)

TINY_BASE_DIR = "base"
TINY_NUM_ROWS = 4000
# the embedded default's settings; flags given on the command line win. The cosine decay matters: at a constant
# 3e-3 the tiny model's loss climbs again after about 550 steps.
TINY_METHOD = dict(num_experts=4, lora_r=8, lora_alpha=16, dropout=0.0)
TINY_TRAINING = dict(max_steps=500, num_epochs=10, batch_size=16, accumulation_steps=1, lr=3e-3, eta_b=1.2,
                     warmup_steps=20, schedule_name="cosine", log_steps=25)
# HMoRAConfig fields that are not command-line flags: filled from the base model or family tables
NOT_FLAGS = ("max_llm_layer", "hidden_size", "model_type", "padding_side", "task_token_id", "qkv_modules",
             "w_i_modules")
FLAG_CHOICES = {"schedule_name": SCHEDULES, "lora_scaling": LORA_SCALINGS, "renorm": RENORMS, "backend": BACKENDS}


def _add_dataclass_flags(group, cls, skip) -> None:
    """One flag `--<field>` per field of dataclass `cls` (booleans with a `--no-` form); an absent flag is
    absent from the parsed namespace, so the dataclass default (or the tiny default's setting) applies."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(default=argparse.SUPPRESS, help=f"default {default}")
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "List" in str(f.type):
            kwargs["nargs"] = "+"
        elif f.name in FLAG_CHOICES:
            kwargs["choices"] = FLAG_CHOICES[f.name]
        else:
            kwargs["type"] = _flag_type(str(f.type))
        group.add_argument(f"--{f.name}", **kwargs)


def _flag_type(annotation: str):
    """int / float / str from a dataclass field's annotation (a string: the modules postpone annotations)."""
    for name, type_ in (("float", float), ("int", int)):
        if name in annotation:
            return type_
    return str


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hmora-train", description="Train an HMoRA adapter. With no --model and no --dataset: the embedded "
        "tiny default (random Qwen2, synthetic tasks, about a minute on 2 CPU cores), whose own settings "
        "(hmora.cli.TINY_METHOD, TINY_TRAINING) replace the defaults below unless a flag is given.")
    parser.add_argument("--model", help="a local transformers causal-LM directory (default: the tiny model)")
    parser.add_argument("--dataset", help="a .parquet or .jsonl file of rows with 'source' and 'target' "
                        "(default: the synthetic tasks; rows with a 'task' field also get a per-task routing report)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), help="prompt template (default: by model family)")
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--output_dir", "--save_dir", default="hmora-output")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue a run exactly: from CHECKPOINT, or from the latest checkpoint-N of "
                        "--output_dir; the method config, dataset and training flags come from the checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="for the generation demo at the end")
    _add_dataclass_flags(parser.add_argument_group("training (reference script names)"), TrainArgs,
                         skip=("output_dir",))
    _add_dataclass_flags(parser.add_argument_group("HMoRA method (HMoRAConfig fields; default: the paper setting)"),
                         HMoRAConfig, skip=NOT_FLAGS)
    return parser


# ---- loading -----------------------------------------------------------------------------------------------
def load_base(path: str, device: str):
    """The causal LM of a local transformers model directory, in fp32 (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model {path!r}: expected a local transformers model directory with a "
                                "config.json (nothing is downloaded)")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).float().to(device)


def load_tokenizer(path: str):
    """The tokenizer of a local directory, padding on the left (the pad token falls back to eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_checkpoint(path: str) -> str:
    """A checkpoint-N directory: `path` itself, or the latest checkpoint in the run directory `path`."""
    if os.path.isfile(os.path.join(path, RUN_INFO_FILE)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint directory (no {RUN_INFO_FILE}) nor a run "
                                "directory holding checkpoint-N directories")
    return latest


RUN_INFO_KEYS = ("base_model", "dataset", "template", "max_length", "train_args")


def read_run_info(checkpoint: str) -> Dict:
    path = os.path.join(checkpoint, RUN_INFO_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None
    missing = [k for k in RUN_INFO_KEYS if k not in run]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it was not written by hmora-train")
    if run["template"] not in TEMPLATES:
        raise ValueError(f"{path}: unknown prompt template {run['template']!r}; known: {sorted(TEMPLATES)}")
    return run


def load_checkpoint(checkpoint: str, device: str, model_path: Optional[str] = None):
    """(HMoRA model, tokenizer, template, run info) of a checkpoint written by hmora-train, nothing downloaded.

    The base model is the checkpoint's own copy (the tiny default) or the one its run was trained on, unless
    `model_path` names another directory holding the same model.
    """
    run = read_run_info(checkpoint)
    base = load_base(model_path or os.path.join(checkpoint, run["base_model"]), device)
    model = HMoRAModel.from_pretrained(base, os.path.join(checkpoint, ADAPTER_DIR))
    return model, load_tokenizer(os.path.join(checkpoint, TOKENIZER_DIR)), TEMPLATES[run["template"]], run


# ---- reports -----------------------------------------------------------------------------------------------
@torch.no_grad()
def task_routing(model: HMoRAModel, tokenizer, rows: Sequence[Dict[str, str]], max_length: int):
    """task -> mean task-router probabilities (E,), averaged over the task's rows and every task router."""
    by_task: Dict[str, List[str]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row["source"])
    model.eval()
    report = {}
    for task, sources in by_task.items():
        ids, mask = left_pad([task_tokens(tokenizer, s, max_length) for s in sources], tokenizer.pad_token_id)
        device = model.device
        probs = model.task_router_probs(model.task_representation(task_input_ids=ids.to(device),
                                                                  task_attention_mask=mask.to(device)))
        if not probs:
            return {}
        report[task] = torch.stack([p.float().mean(0) for p in probs.values()]).mean(0).cpu()
    return report


def format_task_routing(report: Dict[str, torch.Tensor]) -> str:
    experts = len(next(iter(report.values())))
    lines = ["per-task routing (mean task-router probability per expert):",
             "  task     " + "".join(f"  expert{e}" for e in range(experts))]
    for task, probs in report.items():
        lines.append(f"  {task:<8} " + "".join(f"  {p:7.3f}" for p in probs.tolist()))
    return "\n".join(lines)


@torch.no_grad()
def generate_answers(model: HMoRAModel, tokenizer, template: PromptTemplate, sources: Sequence[str],
                     max_new_tokens: int, max_length: int = DEFAULT_MAX_LENGTH) -> List[str]:
    """Greedy answers: prompt = template prompt + answer header; the task router reads the raw source."""
    encoded = [encode_prompt(tokenizer, template, s, max_length) for s in sources]
    pad = tokenizer.pad_token_id
    ids, mask = left_pad([prompt for prompt, _ in encoded], pad)
    task_ids, task_mask = left_pad([task for _, task in encoded], pad)
    device = model.device
    model.eval()
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         task_input_ids=task_ids.to(device), task_attention_mask=task_mask.to(device),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                         eos_token_id=tokenizer.convert_tokens_to_ids(template.end_token(tokenizer)))
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


# ---- hmora-train -------------------------------------------------------------------------------------------
def method_flags(args: argparse.Namespace) -> Dict:
    """The HMoRAConfig fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(HMoRAConfig) if hasattr(args, f.name)}


def training_args(args: argparse.Namespace, defaults: Dict) -> TrainArgs:
    """TrainArgs from `defaults` overridden by the training flags given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainArgs)
             if f.name != "output_dir" and hasattr(args, f.name)}
    return TrainArgs(output_dir=args.output_dir, **{**defaults, **given})


def _quiet_transformers() -> None:
    """Our own bar and log lines are the report; transformers' save/load progress bars only add noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    args = train_parser().parse_args(argv)
    _quiet_transformers()
    try:
        run_training(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"hmora-train: error: {err}", file=sys.stderr)
        return 2
    return 0


@dataclasses.dataclass
class Run:
    """What a training run is made of, new or resumed."""

    model: HMoRAModel
    tokenizer: object
    template: PromptTemplate
    train_args: TrainArgs
    dataset: Optional[str]   # None: the synthetic tasks
    max_length: int
    base_model: str          # TINY_BASE_DIR (a copy inside each checkpoint) or the model directory
    resume_from: Optional[str] = None

    @property
    def tiny(self) -> bool:
        return self.base_model == TINY_BASE_DIR


def new_run(args: argparse.Namespace) -> Run:
    dataset = None if args.dataset is None else os.path.abspath(args.dataset)
    tiny = args.model is None
    train_args = training_args(args, TINY_TRAINING if tiny and dataset is None else {})
    if tiny:
        tokenizer = build_tiny_tokenizer()
        base = build_tiny_base(tokenizer, seed=train_args.seed)
        base.save_pretrained(os.path.join(args.output_dir, TINY_BASE_DIR))  # the pristine base, before injection
        base, base_model = base.to(args.device), TINY_BASE_DIR
    else:
        base, tokenizer = load_base(args.model, args.device), load_tokenizer(args.model)
        base_model = os.path.abspath(args.model)
    template = template_for(base.config.model_type, tokenizer, args.template)
    seed_everything(train_args.seed)  # the adapter's initialisation
    config = HMoRAConfig(**{**(TINY_METHOD if tiny else {}), **method_flags(args)})
    model = get_hmora_model(base, config, tokenizer=tokenizer)
    return Run(model, tokenizer, template, train_args, dataset, args.max_length, base_model)


def resumed_run(args: argparse.Namespace) -> Run:
    """The run of the checkpoint --resume names: its model, config, dataset and training flags (flags given
    again override the training ones, --model and --dataset say where the same base and data now live)."""
    if method_flags(args):
        raise ValueError(f"--resume continues the checkpoint's method config; drop {sorted(method_flags(args))}")
    checkpoint = resolve_checkpoint(args.output_dir if args.resume == "latest" else args.resume)
    model, tokenizer, template, info = load_checkpoint(checkpoint, args.device, args.model)
    train_args = training_args(args, {k: v for k, v in info["train_args"].items() if k != "output_dir"})
    base_model = info["base_model"] if args.model is None else os.path.abspath(args.model)
    base_copy = os.path.join(args.output_dir, TINY_BASE_DIR)
    if base_model == TINY_BASE_DIR and not os.path.isdir(base_copy):
        shutil.copytree(os.path.join(checkpoint, TINY_BASE_DIR), base_copy)
    return Run(model, tokenizer, template, train_args, args.dataset or info["dataset"], info["max_length"],
               base_model, resume_from=checkpoint)


def run_training(args: argparse.Namespace) -> str:
    """Build or resume the run, train it, report per-task routing, reload the checkpoint and generate."""
    run = new_run(args) if args.resume is None else resumed_run(args)
    seed = run.train_args.seed
    rows = synthetic_rows(TINY_NUM_ROWS, seed=seed) if run.dataset is None else load_rows(run.dataset)
    examples = encode_rows(run.tokenizer, run.template, rows, run.max_length)
    run.model.print_trainable_parameters()

    def write_base(directory: str) -> None:
        shutil.copytree(os.path.join(args.output_dir, TINY_BASE_DIR), os.path.join(directory, TINY_BASE_DIR))

    info = {"base_model": run.base_model, "dataset": run.dataset, "template": run.template.name,
            "max_length": run.max_length}
    result = train(run.model, examples, run.train_args, pad_id=run.tokenizer.pad_token_id, tokenizer=run.tokenizer,
                   run_info=info, write_extra=write_base if run.tiny else None, resume_from=run.resume_from)
    if result.history:
        first, window = result.history[0], result.history[-min(len(result.history), run.train_args.log_steps):]
        print(f"loss {first.loss:.4f} at step {first.step} -> {sum(h.loss for h in window) / len(window):.4f} "
              f"(mean of steps {window[0].step}-{window[-1].step})")
    print(f"saved {result.checkpoint}")

    held_out = synthetic_rows(64, seed=seed + 1) if run.dataset is None else rows[:256]
    if all("task" in row for row in held_out):
        report = task_routing(run.model, run.tokenizer, held_out, run.max_length)
        if report:
            print(format_task_routing(report))

    reloaded, tokenizer, template, _ = load_checkpoint(result.checkpoint, args.device, args.model)
    demo = synthetic_rows(4, seed=seed + 2) if run.dataset is None else rows[:4]
    answers = generate_answers(reloaded, tokenizer, template, [r["source"] for r in demo], args.max_new_tokens,
                               run.max_length)
    print(f"reloaded {result.checkpoint} and generated:")
    for row, answer in zip(demo, answers):
        print(f"  {row['source']!r} -> {answer!r} (target {row['target']!r})")
    return result.checkpoint


# ---- hmora-generate ----------------------------------------------------------------------------------------
def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmora-generate", description="Generate with a checkpoint of hmora-train.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint-N directory, or a run's --output_dir (its latest checkpoint)")
    parser.add_argument("--prompt", required=True, nargs="+", help="one or more sources (raw, no template)")
    parser.add_argument("--model", help="the base model directory, if not where the run found it")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def generate_main(argv: Optional[Sequence[str]] = None) -> int:
    args = generate_parser().parse_args(argv)
    _quiet_transformers()
    try:
        model, tokenizer, template, _ = load_checkpoint(resolve_checkpoint(args.checkpoint), args.device,
                                                        args.model)
        answers = generate_answers(model, tokenizer, template, args.prompt, args.max_new_tokens, args.max_length)
    except (ValueError, FileNotFoundError) as err:
        print(f"hmora-generate: error: {err}", file=sys.stderr)
        return 2
    for answer in answers:
        print(answer)
    return 0
