"""Console scripts `hmora-train`, `hmora-generate` and `hmora-plot`.

`hmora-train` with no --model and no --dataset trains the embedded default (hmora.tiny: a tiny random Qwen2 on
synthetic tasks), evaluates it on held-out rows, prints the loss falling and the per-task routing, writes
metrics.jsonl and its plot, saves a checkpoint, reloads it and generates. The HMoRA flags keep the reference
script's names; booleans also take a `--no-` form and default to the paper setting of `HMoRAConfig`.

Bad input is one line on stderr and exit status 2 (Ctrl-C: 130), never a traceback, and it is found before
anything is loaded or written where it can be.

(Why argparse and not transformers' HfArgumentParser: the tiny default replaces some defaults, so a flag that is
absent must stay distinguishable from one given with the default value, and the README promises the
`--no-<flag>` booleans of the reference command lines; HfArgumentParser fills defaults in and spells `--no_<flag>`.)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import sys
from typing import Dict, Iterator, List, NoReturn, Optional, Sequence

import torch

from hmora_kernels import BACKENDS
from hmora_kernels.dispatch import interpreter_enabled, resolve as resolve_backend

from .config import LORA_SCALINGS, MODEL_FAMILIES, POSITION_FREQUENCIES, RENORMS, ROUTING_RECIPES, HMoRAConfig
from .data import (DEFAULT_MAX_LENGTH, TEMPLATES, PromptTemplate, encode_rows, load_rows, template_for,
                   truncation_warning)
from .evaluation import Sampling, evaluate, generate_answers, routing_report_lines
from .model import HMoRAModel, get_hmora_model
from .optim import SCHEDULES
from .plot import PLOT_FILE, matplotlib_available, plot_run
from .tiny import build_tiny_base, build_tiny_tokenizer, synthetic_rows
from .train import (ADAPTER_DIR, CHECKPOINT_PATTERN, DTYPES, METRICS_FILE, RUN_INFO_FILE, TENSORBOARD_DIR,
                    TOKENIZER_DIR, TrainArgs, TrainingInterrupted, latest_checkpoint, read_training_state,
                    remove_stale_temporaries, seed_everything, this_process, train)

TINY_BASE_DIR = "base"
TINY_NUM_ROWS = 4000
TINY_EVAL_ROWS = 64
# the embedded default's settings; flags given on the command line win. The cosine decay matters: at a constant
# 3e-3 the tiny model's loss climbs again after about 550 steps.
TINY_METHOD = dict(num_experts=4, lora_r=8, lora_alpha=16, dropout=0.0)
TINY_TRAINING = dict(max_steps=500, num_epochs=10, batch_size=16, accumulation_steps=1, lr=3e-3, eta_b=1.2,
                     warmup_steps=20, schedule_name="cosine", log_steps=25, eval_steps=100)
# HMoRAConfig fields that are not command-line flags: filled from the base model or family tables
NOT_FLAGS = ("max_llm_layer", "hidden_size", "model_type", "padding_side", "task_token_id", "qkv_modules",
             "w_i_modules")
FLAG_CHOICES = {"schedule_name": SCHEDULES, "lora_scaling": LORA_SCALINGS, "renorm": RENORMS, "backend": BACKENDS,
                "position_frequencies": POSITION_FREQUENCIES}
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
METHOD_FLAG_HELP = {
    "target_modules": "the linear layers to adapt, by the last part of their name (default: the model family's, "
                      "e.g. q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)",
    "target_modules_lora": "adapted layers that get one plain LoRA and no router (default: o_proj down_proj, or "
                           "those of them in --target_modules)",
    "lora_r": "LoRA rank r of every expert",
    "lora_alpha": "LoRA alpha; the scaling is alpha / sqrt(r) (see --lora_scaling)",
    "lora_scaling": "rslora: alpha / sqrt(r) (the reference); standard: alpha / r",
    "num_experts": "experts E per routed layer",
    "use_hydra_lora": "one A shared by a layer's experts (Hydra); --no-use_hydra_lora: one A per expert",
    "dropout": "dropout probability of every adapter and router input (paper: 0.1)",
    "top_k_routing_strategy": "keep each token's top-k experts (--no-top_k_routing_strategy: soft routing)",
    "top_k": "experts kept per token under top-k routing",
    "renorm": "top-k gates renormalised by a softmax over the kept probabilities (the reference) or by their sum",
    "use_task_router": "route by task too: a task encoder reads the raw source and task routers mix in",
    "task_router_only": "every layer routes by task only",
    "share_router_for_qkv": "q, k and v share one router",
    "share_router_for_w_i": "gate and up share one router",
    "num_router_mlp_layers": "layers of each token router (1: one linear layer)",
    "router_hidden_dim": "hidden width of a multi-layer router",
    "epsilon_alpha": "spread of the layer schedule of token vs task routing (SPEC 3.3)",
    "alpha_shift": "shift of the layer schedule of token vs task routing",
    "alpha_low_bound": "layers whose sigmoid(alpha) is below this route by token only",
    "alpha_up_bound": "layers whose sigmoid(alpha) is above this route by task only",
    "use_div_loss": "the constrained generalised Jensen-Shannon auxiliary loss on the routers",
    "gamma_div_certain_t": "token routers' certainty floor gamma_c of the GJS loss",
    "gamma_div_balance_t": "token routers' balance cap gamma_b of the GJS loss",
    "gamma_div_certain_s": "task routers' certainty floor of the GJS loss",
    "gamma_div_balance_s": "task routers' balance cap of the GJS loss",
    "use_load_balancing_loss": "the load-balancing loss instead of GJS (needs --no-use_div_loss)",
    "lambda_auxiliary": "weight of the routers' auxiliary losses",
    "lambda_lm": "weight of the language-model cross-entropy",
    "label_smoothing": "label smoothing of the cross-entropy (paper: 0.1)",
    "trainable_encoder": "train the task encoder (--no-trainable_encoder freezes it)",
    "num_encoder_layer": "transformer layers of the task encoder",
    "num_encoder_heads": "attention heads of the task encoder (must divide the hidden size)",
    "position_frequencies": "task-encoder sinusoid frequencies: the reference's fp32 formula, or correctly rounded",
    "task_token": "the token whose embedding starts the learned task token",
    "backend": "kernel implementation: auto (triton on CUDA, else torch), reference, torch or triton",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def _add_dataclass_flags(group, cls, skip, helps: Dict[str, str]) -> None:
    """One flag `--<field>` per field of dataclass `cls` (booleans with a `--no-` form); an absent flag is
    absent from the parsed namespace, so the dataclass default (or the tiny default's setting) applies. The help
    is the field's metadata "help" or helps[name]; `choices` and `const` (optional value) come from the metadata."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(default=argparse.SUPPRESS, help=f"{f.metadata.get('help') or helps.get(f.name, '')} (default {default})")
        choices = f.metadata.get("choices") or FLAG_CHOICES.get(f.name)
        if "const" in f.metadata:
            kwargs.update(nargs="?", const=f.metadata["const"])
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "List" in str(f.type):
            kwargs["nargs"] = "+"
        elif choices:
            kwargs["choices"] = choices
        else:
            kwargs["type"] = _flag_type(str(f.type))
        group.add_argument(f"--{f.name}", **kwargs)


def _flag_type(annotation: str):
    """int / float / str from a dataclass field's annotation (a string: the modules postpone annotations)."""
    for name, type_ in (("float", float), ("int", int)):
        if name in annotation:
            return type_
    return str


def default_threads() -> int:
    """$OMP_NUM_THREADS when set, else half the cores this process may run on (at least 1).

    torch's own default, a thread per core, oversubscribes a machine that others use too: the 500-step default
    took 54 minutes that way on a busy 2-core machine, 67 seconds with one thread."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="torch device: cpu, cuda, cuda:N, ... (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=_at_least(1), default=None,
                        help="CPU threads for torch (default: $OMP_NUM_THREADS if set, else half of this machine's "
                        f"cores, here {default_threads()}; torch's own one-per-core oversubscribes a shared machine)")


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="hmora-train", description="Train an HMoRA adapter. With no --model and no --dataset: the embedded "
        "tiny default (random Qwen2, synthetic tasks, about a minute on one CPU core), whose own settings "
        "(hmora.cli.TINY_METHOD, TINY_TRAINING) replace the defaults below unless a flag is given.")
    parser.add_argument("--model", help="a local transformers causal-LM directory with its tokenizer (default: the "
                        "tiny model; nothing is downloaded)")
    parser.add_argument("--dataset", help="a .parquet, .jsonl or .json file of rows with string 'source' and "
                        "'target' fields (default: the synthetic tasks); rows with a 'task' field also get a "
                        "per-task routing report")
    parser.add_argument("--eval_dataset", help="held-out rows in the same formats, evaluated every --eval_steps and "
                        "at the end: loss, answer token accuracy, exact match of generated answers, per-task routing "
                        f"(default: {TINY_EVAL_ROWS} held-out synthetic rows for the tiny default, else none)")
    parser.add_argument("--eval_generate", type=_at_least(0), default=16,
                        help="eval rows whose answers are generated for the exact-match score (default 16)")
    parser.add_argument("--template", choices=sorted(TEMPLATES),
                        help="the prompt template rows are formatted with (default: by model family)")
    parser.add_argument("--max_length", type=_at_least(1), default=None,
                        help=f"tokens per sequence, prompt template included; longer rows are cut, longest part "
                        f"first (default {DEFAULT_MAX_LENGTH}; a resumed run keeps its own)")
    parser.add_argument("--output_dir", "--save_dir", default="hmora-output",
                        help="the run directory: checkpoint-N/, metrics.jsonl, metrics.png, tensorboard/ "
                        "(default hmora-output)")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="replace the run already in --output_dir (its checkpoints and metrics are deleted when "
                        "training starts)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue a run exactly: from CHECKPOINT, or from the latest checkpoint-N of "
                        "--output_dir; the method config, dataset and training flags come from the checkpoint")
    parser.add_argument("--report_to", choices=("auto", "tensorboard", "none"), default="auto",
                        help="TensorBoard event files in OUTPUT_DIR/tensorboard (auto: when the tensorboard package "
                        "is installed; metrics.jsonl is always written)")
    parser.add_argument("--max_new_tokens", type=_at_least(1), default=16,
                        help="answer length for the exact-match evaluation and the demo at the end (default 16)")
    parser.add_argument("--routing", choices=("default", *ROUTING_RECIPES), default=None,
                        help="a routing strategy's recipe as the starting point of the method flags (README "
                        "'Routing variants'; hmora.config.ROUTING_RECIPES): default is HMoRA's own; every method "
                        "flag given on the command line overrides the recipe. switch computes its expert capacity "
                        "for --max_length unless --max_sequence_length is given")
    _add_common_flags(parser)
    _add_dataclass_flags(parser.add_argument_group("training (reference script names)"), TrainArgs,
                         skip=("output_dir",), helps={})
    _add_dataclass_flags(parser.add_argument_group("HMoRA method (HMoRAConfig fields; default: the paper setting)"),
                         HMoRAConfig, skip=NOT_FLAGS, helps=METHOD_FLAG_HELP)
    return parser


# ---- checks made before anything is loaded ---------------------------------------------------------------
def check_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N or another torch device type "
                         "(mps, xpu, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"--device {name}: no CUDA device here (torch {torch.__version__}, {build}); use "
                             "--device cpu, or on a GPU machine install a CUDA build of torch (README)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: there are {count} CUDA devices (cuda:0 .. cuda:{count - 1})")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"--device {name}: this torch has no usable {device.type} device; use --device cpu")
    return device


def check_backend(backend: str, device: torch.device) -> None:
    """The triton backend needs a CUDA device (or Triton's interpreter): say so before loading the model."""
    if resolve_backend(backend, device) == "triton" and device.type != "cuda" and not interpreter_enabled():
        via = "HMORA_BACKEND=triton" if backend == "auto" else "--backend triton"
        raise ValueError(f"{via} needs a CUDA device, got --device {device}; use --backend torch (or auto) on a "
                         "CPU, or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter")


def run_files(output_dir: str) -> List[str]:
    """What a run writes into its directory: checkpoint-N/, metrics.jsonl, metrics.png, tensorboard/."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if CHECKPOINT_PATTERN.match(name) or name in (METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR))


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> List[str]:
    """Refuse a file, an unwritable place, or (for a new run) a directory holding another run unless
    --overwrite_output_dir; returns the old run's files to delete when training starts."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is a file; give a directory (new, or the run's own)")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {output_dir!r}: cannot write there ({existing!r} is not a writable "
                         "directory)")
    if resuming:
        if overwrite:
            raise ValueError("--resume continues the run in --output_dir; --overwrite_output_dir would delete it")
        return []
    found = run_files(output_dir)
    if found and not overwrite:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(f"--output_dir {output_dir!r} already holds a run ({shown}); continue it with --resume, "
                         "replace it with --overwrite_output_dir, or choose another --output_dir")
    return found


def check_target_modules(base, config_flags: Dict) -> Dict:
    """Name the --target_modules / --target_modules_lora that match no linear layer of the base; when only
    --target_modules is given, --target_modules_lora defaults to the family's plain-LoRA layers among them."""
    linear = sorted({name.rpartition(".")[2] for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
    for flag in ("target_modules", "target_modules_lora"):
        unknown = sorted(set(config_flags.get(flag) or ()) - set(linear))
        if unknown:
            raise ValueError(f"--{flag}: no linear layer named {', '.join(unknown)} in this "
                             f"{base.config.model_type} model; its linear layers: {', '.join(linear)}")
    family = MODEL_FAMILIES.get(base.config.model_type)
    if config_flags.get("target_modules") and "target_modules_lora" not in config_flags and family:
        config_flags = {**config_flags, "target_modules_lora": [
            m for m in family["target_modules_lora"] if m in config_flags["target_modules"]]}
    return config_flags


# ---- loading -----------------------------------------------------------------------------------------------
# transformers 4.56 renamed from_pretrained's torch_dtype to dtype (5.x warns about the old name)
def _dtype_kwarg() -> str:
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_base(path: str, device, dtype: str = "fp32"):
    """The causal LM of a local transformers model directory, its weights in `dtype` (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model {path!r}: expected a local transformers model directory with a "
                                "config.json (nothing is downloaded)")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                **{_dtype_kwarg(): DTYPES[dtype]}).to(device)


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


def load_checkpoint(checkpoint: str, device, model_path: Optional[str] = None, dtype: Optional[str] = None):
    """(HMoRA model, tokenizer, template, run info) of a checkpoint written by hmora-train, nothing downloaded.

    The base model is the checkpoint's own copy (the tiny default) or the one its run was trained on, unless
    `model_path` names another directory holding the same model; its dtype is the run's unless `dtype` is given.
    """
    run = read_run_info(checkpoint)
    dtype = dtype or run["train_args"].get("torch_dtype", "fp32")
    base = load_base(model_path or os.path.join(checkpoint, run["base_model"]), device, dtype)
    model = HMoRAModel.from_pretrained(base, os.path.join(checkpoint, ADAPTER_DIR))
    return model, load_tokenizer(os.path.join(checkpoint, TOKENIZER_DIR)), TEMPLATES[run["template"]], run


def _quiet_transformers() -> None:
    """Our own bar and log lines are the report; transformers' save/load progress bars only add noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()


# ---- hmora-train -------------------------------------------------------------------------------------------
def method_flags(args: argparse.Namespace) -> Dict:
    """The HMoRAConfig fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(HMoRAConfig) if hasattr(args, f.name)}


def method_config_flags(args: argparse.Namespace, tiny: bool) -> Dict:
    """The HMoRAConfig fields of a new run: the tiny default's settings (for the tiny default), then the --routing
    recipe, then every method flag given on the command line. Switch's capacity is computed for the run's
    --max_length unless --max_sequence_length is given."""
    given = method_flags(args)
    recipe = ROUTING_RECIPES.get(args.routing, {})
    if args.routing is not None and given.get("routing_variant", recipe.get("routing_variant")) != \
            recipe.get("routing_variant"):
        raise ValueError(f"--routing {args.routing} and --routing_variant {given['routing_variant']} disagree; give "
                         "one of them")
    flags = {**(TINY_METHOD if tiny else {}), **recipe, **given}
    if flags.get("routing_variant") == "switch" and "max_sequence_length" not in given:
        flags["max_sequence_length"] = args.max_length or DEFAULT_MAX_LENGTH
    return flags


def training_args(args: argparse.Namespace, defaults: Dict) -> TrainArgs:
    """TrainArgs from `defaults` overridden by the training flags given on the command line (a --warmup_ratio
    given replaces the defaults' warmup_steps)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainArgs)
             if f.name != "output_dir" and hasattr(args, f.name)}
    if "warmup_ratio" in given and "warmup_steps" not in given:
        defaults = {k: v for k, v in defaults.items() if k != "warmup_steps"}
    return TrainArgs(output_dir=args.output_dir, **{**defaults, **given})


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    args = train_parser().parse_args(argv)
    _quiet_transformers()
    with torch_threads(args.threads):
        try:
            run_training(args)
        except TrainingInterrupted as stop:
            saved = (f"saved {stop.checkpoint}; continue with: hmora-train --output_dir {args.output_dir} --resume"
                     if stop.checkpoint else "no step was complete, nothing saved")
            if os.environ.get("RANK", "0") == "0":  # under a launcher, every process stopped at this step
                print(f"hmora-train: interrupted at step {stop.step}; {saved}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except KeyboardInterrupt:
            print("hmora-train: interrupted before training started; nothing saved", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (ValueError, OSError) as err:
            print(f"hmora-train: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return 0


@dataclasses.dataclass
class Run:
    """What a training run is made of, new or resumed."""

    model: HMoRAModel
    tokenizer: object
    template: PromptTemplate
    train_args: TrainArgs
    dataset: Optional[str]       # None: the synthetic tasks
    eval_dataset: Optional[str]  # None: the held-out synthetic tasks for the tiny default, else no evaluation
    max_length: int
    base_model: str              # TINY_BASE_DIR (a copy inside each checkpoint) or the model directory
    tiny_base: Optional[torch.nn.Module] = None  # the tiny default's pristine base, written into each checkpoint
    resume_from: Optional[str] = None


def _prepare_base(base, train_args: TrainArgs, device) -> torch.nn.Module:
    return base.to(device=device, dtype=DTYPES[train_args.torch_dtype])


def _apply_checkpointing(model: HMoRAModel, train_args: TrainArgs) -> None:
    if train_args.gradient_checkpointing is not None:
        model.activation_checkpointing_enable({"use_reentrant": train_args.gradient_checkpointing == "reentrant"})


def new_run(args: argparse.Namespace, device) -> Run:
    dataset = None if args.dataset is None else os.path.abspath(args.dataset)
    eval_dataset = None if args.eval_dataset is None else os.path.abspath(args.eval_dataset)
    tiny = args.model is None
    train_args = training_args(args, TINY_TRAINING if tiny and dataset is None else {})
    config_flags = method_config_flags(args, tiny)
    HMoRAConfig(**config_flags)  # a bad value fails here, before a model is built or loaded
    tiny_base = None
    if tiny:
        tokenizer = build_tiny_tokenizer()
        tiny_base = build_tiny_base(tokenizer, seed=train_args.seed)
        base, base_model = _prepare_base(copy.deepcopy(tiny_base), train_args, device), TINY_BASE_DIR
    else:
        base, base_model = load_base(args.model, device, train_args.torch_dtype), os.path.abspath(args.model)
        tokenizer = load_tokenizer(args.model)
    template = template_for(base.config.model_type, tokenizer, args.template)
    seed_everything(train_args.seed)  # the adapter's initialisation
    model = get_hmora_model(base, HMoRAConfig(**check_target_modules(base, config_flags)), tokenizer=tokenizer)
    _apply_checkpointing(model, train_args)
    return Run(model, tokenizer, template, train_args, dataset, eval_dataset, args.max_length or DEFAULT_MAX_LENGTH,
               base_model, tiny_base)


def resumed_run(args: argparse.Namespace, device) -> Run:
    """The run of the checkpoint --resume names: its model, config, datasets and training flags (flags given
    again override the training ones, --model and --dataset say where the same base and data now live)."""
    given = sorted(method_flags(args)) + (["routing"] if args.routing is not None else [])
    if given:
        raise ValueError(f"--resume continues the checkpoint's method config; drop {given}")
    if args.max_length is not None:
        raise ValueError("--resume keeps the run's --max_length; drop --max_length")
    checkpoint = resolve_checkpoint(args.output_dir if args.resume == "latest" else args.resume)
    info = read_run_info(checkpoint)
    read_training_state(checkpoint)  # a damaged file fails here, before the model is loaded
    train_args = training_args(args, {k: v for k, v in info["train_args"].items() if k != "output_dir"})
    dataset = os.path.abspath(args.dataset) if args.dataset else info["dataset"]
    eval_dataset = os.path.abspath(args.eval_dataset) if args.eval_dataset else info.get("eval_dataset")
    model, tokenizer, template, _ = load_checkpoint(checkpoint, device, args.model, train_args.torch_dtype)
    _apply_checkpointing(model, train_args)
    base_model = info["base_model"] if args.model is None else os.path.abspath(args.model)
    tiny_base = load_base(os.path.join(checkpoint, TINY_BASE_DIR), "cpu") if base_model == TINY_BASE_DIR else None
    return Run(model, tokenizer, template, train_args, dataset, eval_dataset, info["max_length"], base_model,
               tiny_base, resume_from=checkpoint)


def _tensorboard(report_to: str) -> bool:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package)
    except ImportError:
        if report_to == "tensorboard":
            raise ValueError("--report_to tensorboard: the tensorboard package is not installed; "
                             "pip install 'hmora[tensorboard]'") from None
        return False
    return report_to != "none"


@contextlib.contextmanager
def launched_processes(device: torch.device) -> Iterator[torch.device]:
    """Inside: this process joined to the others a launcher started (torchrun or accelerate launch put WORLD_SIZE > 1
    in the environment), on the CUDA device of its LOCAL_RANK when it trains on CUDA; yields its device. A single
    process (or one whose process group is already initialised) is left as it is."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1 or torch.distributed.is_initialized():
        yield device
        return
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device}: under a launcher every process trains on the GPU of its LOCAL_RANK; "
                             "give --device cuda")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
        torch.distributed.barrier()  # the processes end together (the main one reports, plots and generates last)
    finally:
        torch.distributed.destroy_process_group()


def run_training(args: argparse.Namespace) -> str:
    """Check the flags, build or resume the run, train and evaluate it, report, plot, reload and generate; in
    every process a launcher started, each training its share of the data (only the main one writes and prints)."""
    device = check_device(args.device)
    check_backend(getattr(args, "backend", "auto"), device)
    with launched_processes(device) as device:
        return _run_training(args, device)


def _silent(*_args, **_kwargs) -> None:
    """print for a process other than the main one."""


def _run_training(args: argparse.Namespace, device: torch.device) -> str:
    main = this_process()[0] == 0
    say = print if main else _silent
    stale_run = check_output_dir(args.output_dir, args.resume is not None, args.overwrite_output_dir)
    tensorboard = _tensorboard(args.report_to)
    loaded: Dict[str, List[Dict]] = {}

    def rows_of(path: str) -> List[Dict]:  # each file read once
        key = os.path.abspath(path)
        if key not in loaded:
            loaded[key] = load_rows(path)
        return loaded[key]

    for path in (args.dataset, args.eval_dataset):  # a bad data file fails before a model is built or loaded
        if path is not None:
            rows_of(path)
    run = new_run(args, device) if args.resume is None else resumed_run(args, device)
    seed = run.train_args.seed
    rows = synthetic_rows(TINY_NUM_ROWS, seed=seed) if run.dataset is None else rows_of(run.dataset)
    examples = encode_rows(run.tokenizer, run.template, rows, run.max_length)
    eval_rows = (synthetic_rows(TINY_EVAL_ROWS, seed=seed + 1) if run.tiny_base is not None and run.dataset is None
                 else None) if run.eval_dataset is None else rows_of(run.eval_dataset)
    eval_examples = encode_rows(run.tokenizer, run.template, eval_rows, run.max_length) if eval_rows else []
    for warning in (truncation_warning(examples, run.max_length), truncation_warning(eval_examples, run.max_length,
                                                                                    "eval rows")):
        if warning:
            say(warning)
    if main:
        run.model.print_trainable_parameters()

    def evaluate_model() -> Dict:
        return evaluate(run.model, run.tokenizer, run.template, eval_rows, eval_examples,
                        batch_size=run.train_args.batch_size, max_length=run.max_length,
                        max_new_tokens=args.max_new_tokens, generate_rows=args.eval_generate, bf16=run.train_args.bf16)

    def write_base(directory: str) -> None:
        run.tiny_base.save_pretrained(os.path.join(directory, TINY_BASE_DIR))

    if main:
        for name in stale_run:  # --overwrite_output_dir: the old run goes once the new one is ready to train
            path = os.path.join(args.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        remove_stale_temporaries(args.output_dir)
    info = {"base_model": run.base_model, "dataset": run.dataset, "eval_dataset": run.eval_dataset,
            "template": run.template.name, "max_length": run.max_length}
    result = train(run.model, examples, run.train_args, pad_id=run.tokenizer.pad_token_id, tokenizer=run.tokenizer,
                   run_info=info, write_extra=write_base if run.tiny_base is not None else None,
                   resume_from=run.resume_from, evaluate=evaluate_model if eval_rows else None,
                   tensorboard=tensorboard)
    if not main:  # the main process reports, plots and generates
        return result.checkpoint
    if result.history:
        first, window = result.history[0], result.history[-min(len(result.history), run.train_args.log_steps):]
        print(f"loss {first.loss:.4f} at step {first.step} -> {sum(h.loss for h in window) / len(window):.4f} "
              f"(mean of steps {window[0].step}-{window[-1].step})")
    print(f"saved {result.checkpoint}")

    report_rows, what = (eval_rows, "eval rows") if eval_rows else (rows[:256], "training rows")
    report = routing_report_lines(run.model, run.tokenizer, run.template, report_rows, run.max_length, what,
                                  run.train_args.batch_size)
    if report:
        print(report)
    if matplotlib_available():
        print(f"plotted {plot_run(args.output_dir)}")
    else:
        print(f"metrics in {os.path.join(args.output_dir, METRICS_FILE)} (pip install 'hmora[plot]' for hmora-plot)")

    reloaded, tokenizer, template, _ = load_checkpoint(result.checkpoint, device, args.model)
    demo = report_rows[:4]
    answers = generate_answers(reloaded, tokenizer, template, [r["source"] for r in demo], args.max_new_tokens,
                               run.max_length)
    print(f"reloaded {result.checkpoint} and generated:")
    for row, answer in zip(demo, answers):
        print(f"  {row['source']!r} -> {answer!r} (target {row['target']!r})")
    return result.checkpoint


# ---- hmora-generate ----------------------------------------------------------------------------------------
def generate_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hmora-generate", description="Generate with a checkpoint of hmora-train: one "
                           "answer per prompt, one line each.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint-N directory, or a run's --output_dir (its latest checkpoint)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", nargs="+", help="one or more sources (raw, no template)")
    prompts.add_argument("--prompts_file", help="sources from a file: .txt (one per line), or .jsonl / .json / "
                         ".parquet rows with a 'source' field")
    parser.add_argument("--model", help="the base model directory, if not where the run found it")
    parser.add_argument("--torch_dtype", choices=tuple(DTYPES), help="dtype of the base (default: the run's)")
    parser.add_argument("--max_new_tokens", type=_at_least(1), default=32, help="answer length limit (default 32)")
    parser.add_argument("--max_length", type=_at_least(1), default=DEFAULT_MAX_LENGTH,
                        help=f"prompt tokens kept, from the end (default {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--batch_size", type=_at_least(1), default=16, help="prompts per generate call (default 16)")
    parser.add_argument("--do_sample", action="store_true", help="sample the answers with --temperature and --top_p (default: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default 1.0)")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="nucleus sampling: keep the most likely tokens up to this probability, in (0, 1] "
                        "(default 1.0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    _add_common_flags(parser)
    return parser


def read_prompts(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts_file {path!r} does not exist")
    if os.path.splitext(path)[1].lower() in (".jsonl", ".json", ".parquet"):
        return [row["source"] for row in load_rows(path, fields=("source",))]
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts_file {path!r} holds no prompt (one per line)")
    return prompts


def generate_main(argv: Optional[Sequence[str]] = None) -> int:
    args = generate_parser().parse_args(argv)
    _quiet_transformers()
    with torch_threads(args.threads):
        try:
            sampling = Sampling(args.do_sample, args.temperature, args.top_p)
            device = check_device(args.device)
            prompts = args.prompt or read_prompts(args.prompts_file)
            model, tokenizer, template, _ = load_checkpoint(resolve_checkpoint(args.checkpoint), device, args.model,
                                                            args.torch_dtype)
            torch.manual_seed(args.seed)
            answers = []
            for start in range(0, len(prompts), args.batch_size):
                answers += generate_answers(model, tokenizer, template, prompts[start:start + args.batch_size],
                                            args.max_new_tokens, args.max_length, sampling)
        except (ValueError, OSError) as err:
            print(f"hmora-generate: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    for answer in answers:
        print(answer.replace("\n", "\\n"))  # one answer per line
    return 0
