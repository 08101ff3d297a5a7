"""What hmora-train and hmora-generate measure and show: eval loss and answer accuracy, generated answers, and the
per-task routing report."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, DEFAULT_MAX_LENGTH, Example, PromptTemplate, collate, encode_prompt, left_pad, \
    task_tokens


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


@torch.no_grad()
def task_routing(model, tokenizer, rows: Sequence[Dict[str, str]], max_length: int) -> Dict[str, torch.Tensor]:
    """task -> mean task-router probabilities (E,), averaged over the task's rows and every task router. Rows
    without a `task` field are left out; {} when no row has one or the model has no task routers."""
    by_task: Dict[str, List[str]] = {}
    for row in rows:
        if "task" in row:
            by_task.setdefault(str(row["task"]), []).append(row["source"])
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


def format_task_routing(report: Dict[str, torch.Tensor], rows_without_task: int = 0, what: str = "rows") -> str:
    experts = len(next(iter(report.values())))
    width = max(8, *(len(task) for task in report))
    lines = [f"per-task routing on {what} (mean task-router probability per expert):",
             "  " + "task".ljust(width) + " " + "".join(f"  expert{e}" for e in range(experts))]
    for task, probs in report.items():
        lines.append(f"  {task:<{width}} " + "".join(f"  {p:7.3f}" for p in probs.tolist()))
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
    first `generate_rows` rows) and task_routing (per task: the mean task-router probability per expert)."""
    scores = answer_scores(model, examples, tokenizer.pad_token_id, batch_size, bf16)
    sample = rows[:generate_rows]
    if sample:
        answers = []
        for start in range(0, len(sample), batch_size):
            answers += generate_answers(model, tokenizer, template, [r["source"] for r in sample[start:start + batch_size]],
                                        max_new_tokens, max_length)
        scores["exact_match"] = exact_match(answers, [r["target"] for r in sample])
    routing = task_routing(model, tokenizer, rows, max_length)
    if routing:
        scores["task_routing"] = {task: [round(p, 4) for p in probs.tolist()] for task, probs in routing.items()}
    return scores


def routing_report_lines(model, tokenizer, rows: Sequence[Dict[str, str]], max_length: int,
                         what: str) -> Optional[str]:
    """The per-task routing report of `rows`, or None when no row has a `task` or there are no task routers."""
    report = task_routing(model, tokenizer, rows, max_length)
    if not report:
        return None
    return format_task_routing(report, sum("task" not in row for row in rows), what)
