"""What hmora-train and hmora-generate measure and show: eval loss and answer accuracy, generated answers, and the
per-task routing report."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, DEFAULT_MAX_LENGTH, Example, PromptTemplate, collate, encode_prompt, encode_rows, \
    left_pad, task_tokens


@dataclass(frozen=True)
class Sampling:
    """How answers are generated: greedy, or sampled with a temperature and nucleus (top-p) cut."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> Dict:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


GREEDY = Sampling()


@torch.no_grad()
def generate_answers(model, tokenizer, template: PromptTemplate, sources: Sequence[str], max_new_tokens: int,
                     max_length: int = DEFAULT_MAX_LENGTH, sampling: Sampling = GREEDY) -> List[str]:
    """One answer per source: prompt = template prompt + answer header; the task router reads the raw source."""
    encoded = [encode_prompt(tokenizer, template, s, max_length) for s in sources]
    pad = tokenizer.pad_token_id
    ids, mask = left_pad([prompt for prompt, _ in encoded], pad)
    task_ids, task_mask = left_pad([task for _, task in encoded], pad)
    device = model.device
    model.eval()
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         task_input_ids=task_ids.to(device), task_attention_mask=task_mask.to(device),
                         max_new_tokens=max_new_tokens, pad_token_id=pad,
                         eos_token_id=tokenizer.convert_tokens_to_ids(template.end_token(tokenizer)),
                         **sampling.generate_kwargs())
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def rows_by_task(rows: Sequence[Dict[str, str]]) -> Dict[str, List[Dict[str, str]]]:
    """task -> its rows, in order of first appearance; rows without a `task` field are left out."""
    by_task: Dict[str, List[Dict[str, str]]] = {}
    for row in rows:
        if "task" in row:
            by_task.setdefault(str(row["task"]), []).append(row)
    return by_task


@torch.no_grad()
def task_routing(model, tokenizer, rows: Sequence[Dict[str, str]], max_length: int) -> Dict[str, torch.Tensor]:
    """task -> mean task-router probabilities (E,), averaged over the task's rows and every task router. Rows
    without a `task` field are left out; {} when no row has one or the model has no task routers."""
    model.eval()
    report = {}
    for task, task_rows in rows_by_task(rows).items():
        ids, mask = left_pad([task_tokens(tokenizer, r["source"], max_length) for r in task_rows],
                             tokenizer.pad_token_id)
        device = model.device
        probs = model.task_router_probs(model.task_representation(task_input_ids=ids.to(device),
                                                                  task_attention_mask=mask.to(device)))
        if not probs:
            return {}
        report[task] = torch.stack([p.float().mean(0) for p in probs.values()]).mean(0).cpu()
    return report


@torch.no_grad()
def expert_usage(model, tokenizer, template: PromptTemplate, rows: Sequence[Dict[str, str]], max_length: int,
                 batch_size: int = 16) -> Dict[str, Tuple[torch.Tensor, float]]:
    """task -> (usage, dropped) over the task's rows (prompt and answer, dropout off): usage (experts,) the share
    of real tokens whose gate for each expert is non-zero, dropped the share routed to no expert at all (switch's
    capacity), both averaged over the token-routed layers (token and hybrid; each shared router once). Rank-wise
    routing: its E * r rank-1 experts. {} when no row has a `task` field or no layer routes by token."""
    model.eval()
    layers = [name for name, kind in model.layer_kinds().items() if kind != "task"]
    if not layers:
        return {}
    report = {}
    for task, task_rows in rows_by_task(rows).items():
        active = dropped = tokens = 0
        for start in range(0, len(task_rows), batch_size):
            batch = collate(encode_rows(tokenizer, template, task_rows[start:start + batch_size], max_length),
                            tokenizer.pad_token_id)
            batch.pop("labels")
            out = model(**{k: v.to(model.device) for k, v in batch.items()})
            real = batch["attention_mask"].to(model.device) != 0
            for name in layers:
                nonzero = out.router_gates[name][real] != 0  # (real tokens, experts)
                active = active + nonzero.sum(0).cpu()
                dropped += int((~nonzero.any(-1)).sum())
            tokens += int(real.sum())
        count = tokens * len(layers)
        report[task] = (active.double() / count, dropped / count)
    return report


def routing_report(model, tokenizer, template: PromptTemplate, rows: Sequence[Dict[str, str]], max_length: int,
                   batch_size: int = 16) -> Dict:
    """The per-task routing of `rows`, as metrics (JSON-ready): HMoRA's own routing with task routers gives
    {"task_routing": task -> mean task-router probability per expert}; any other (a routing variant, or token routing
    only) {"expert_usage": task -> share of real tokens per expert, "dropped": task -> share routed to no expert
    (switch only)}. {} when no row has a `task` field."""
    config = model.hmora_config
    if config.routing_variant is None and model.task_encoder is not None:
        routing = task_routing(model, tokenizer, rows, max_length)
        return {"task_routing": {task: [round(p, 4) for p in probs.tolist()] for task, probs in routing.items()}} \
            if routing else {}
    usage = expert_usage(model, tokenizer, template, rows, max_length, batch_size)
    if not usage:
        return {}
    report = {"expert_usage": {task: [round(u, 4) for u in shares.tolist()] for task, (shares, _) in usage.items()}}
    if config.routing_variant == "switch":
        report["dropped"] = {task: round(dropped, 4) for task, (_, dropped) in usage.items()}
    return report


def format_routing_report(model, report: Dict, rows_without_task: int = 0, what: str = "rows") -> str:
    """The lines hmora-train prints for a `routing_report`."""
    config = model.hmora_config
    if "task_routing" in report:
        title = f"per-task routing on {what} (mean task-router probability per expert):"
        columns, extra = report["task_routing"], {}
    elif config.routing_variant == "rank_wise":
        r, experts = config.lora_r, config.num_experts
        title = (f"per-task expert usage on {what} (rank_wise: {experts * r} rank-1 experts, {config.rank_top_k} "
                 f"active per token; per expert, the mean number of its {r} ranks active per token; used: rank-1 "
                 f"experts active for at least 1% of the task's tokens; mean over the token-routed layers):")
        columns = {task: [sum(shares[e * r:(e + 1) * r]) for e in range(experts)]
                   for task, shares in report["expert_usage"].items()}
        extra = {"used": {task: f"{sum(u >= 0.01 for u in shares)}/{experts * r}"
                          for task, shares in report["expert_usage"].items()}}
    else:
        variant = config.routing_variant or "HMoRA token routing"
        title = (f"per-task expert usage on {what} ({variant}: share of real tokens whose gate for each expert is "
                 f"non-zero, mean over the token-routed layers"
                 + ("; dropped: routed to no expert by the capacity):" if "dropped" in report else "):"))
        columns = report["expert_usage"]
        extra = {"dropped": {task: f"{d:.3f}" for task, d in report["dropped"].items()}} if "dropped" in report else {}
    headers = [f"expert{e}" for e in range(config.num_experts)]  # rank-wise: per expert's block of r ranks
    width = max(8, *(len(task) for task in columns))
    lines = [title, "  " + "task".ljust(width) + " " + "".join(f"  {h:>7}" for h in [*headers, *extra])]
    for task, values in columns.items():
        lines.append(f"  {task:<{width}} " + "".join(f"  {v:7.3f}" for v in values)
                     + "".join(f"  {column[task]:>7}" for column in extra.values()))
    if rows_without_task:
        lines.append(f"  ({rows_without_task} rows without a 'task' field are not in this report)")
    return "\n".join(lines)


@torch.no_grad()
def answer_scores(model, examples: Sequence[Example], pad_id: int, batch_size: int, bf16: bool = False) -> Dict:
    """Cross-entropy per answer token (no label smoothing) and the share of answer tokens whose greedy prediction
    is right, over `examples`, with dropout off."""
    model.eval()
    device = model.device
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        answer = targets != IGNORE_INDEX
        loss_sum += F.cross_entropy(logits[answer], targets[answer], reduction="sum").item()
        correct += int((logits.argmax(-1)[answer] == targets[answer]).sum())
        count += int(answer.sum())
    return {"loss": loss_sum / max(count, 1), "token_accuracy": correct / max(count, 1)}


def exact_match(answers: Sequence[str], targets: Sequence[str]) -> float:
    """Share of answers equal to their target, surrounding whitespace ignored."""
    return sum(a.strip() == t.strip() for a, t in zip(answers, targets)) / max(len(targets), 1)


def evaluate(model, tokenizer, template: PromptTemplate, rows: Sequence[Dict[str, str]],
             examples: Sequence[Example], *, batch_size: int, max_length: int, max_new_tokens: int,
             generate_rows: int, bf16: bool = False) -> Dict:
    """Eval metrics on held-out rows: loss, token_accuracy (answer tokens), exact_match (greedy answers of the
    first `generate_rows` rows) and the per-task routing (`routing_report`: task_routing, or expert_usage and
    dropped)."""
    scores = answer_scores(model, examples, tokenizer.pad_token_id, batch_size, bf16)
    sample = rows[:generate_rows]
    if sample:
        answers = []
        for start in range(0, len(sample), batch_size):
            answers += generate_answers(model, tokenizer, template, [r["source"] for r in sample[start:start + batch_size]],
                                        max_new_tokens, max_length)
        scores["exact_match"] = exact_match(answers, [r["target"] for r in sample])
    scores.update(routing_report(model, tokenizer, template, rows, max_length, batch_size))
    return scores


def routing_report_lines(model, tokenizer, template: PromptTemplate, rows: Sequence[Dict[str, str]],
                         max_length: int, what: str, batch_size: int = 16) -> Optional[str]:
    """The per-task routing report of `rows` as hmora-train prints it, or None when no row has a `task`."""
    report = routing_report(model, tokenizer, template, rows, max_length, batch_size)
    if not report:
        return None
    return format_routing_report(model, report, sum("task" not in row for row in rows), what)
