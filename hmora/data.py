"""Training data: rows with `source` and `target`, prompt templates, tokenisation, left-padded batches.

One training example is `prompt + answer` where `prompt = template.format_source(source)` (tokenised with the
tokenizer's special tokens, e.g. a LLaMA BOS) and `answer = template.format_target(target)` (tokenised without
them), exactly as the reference script tokenises the pair. Labels are the answer tokens (the assistant header, the
target and the end-of-text token); padding and prompt get -100. Labels are not shifted: the causal LM shifts them.
The task router reads the raw `source` tokens (no template), left padded.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 1024
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class PromptTemplate:
    """source -> `source_prefix + source + source_suffix`; target -> `answer_prefix + target + end_of_text`.

    `end_of_text` None means the tokenizer's own `eos_token`.
    """

    name: str
    source_prefix: str
    source_suffix: str
    answer_prefix: str
    end_of_text: Optional[str] = None

    def format_source(self, source: str) -> str:
        return self.source_prefix + source + self.source_suffix

    def format_target(self, target: str, tokenizer) -> str:
        return self.answer_prefix + target + self.end_token(tokenizer)

    def generation_prompt(self, source: str) -> str:
        """What the model sees at inference: the prompt and the answer header, the answer left to generate."""
        return self.format_source(source) + self.answer_prefix

    def end_token(self, tokenizer) -> str:
        token = self.end_of_text or tokenizer.eos_token
        if token is None:
            raise ValueError(f"prompt template {self.name!r} ends answers with the tokenizer's eos_token, but the "
                             "tokenizer has none; set tokenizer.eos_token or use another --template")
        return token


# The reference script's Qwen2 format, verbatim (its role name is "human", and the source ends with a newline).
QWEN2_TEMPLATE = PromptTemplate(
    "qwen2", f"<|im_start|>system\n{SYSTEM_PROMPT}\n<|im_end|>\n<|im_start|>human\n", "\n<|im_end|>\n",
    "<|im_start|>assistant\n", "<|endoftext|>",
)
LLAMA2_TEMPLATE = PromptTemplate("llama2", f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n", " [/INST]", " ")
LLAMA3_TEMPLATE = PromptTemplate(
    "llama3", f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_PROMPT}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
)
BLOOM_TEMPLATE = PromptTemplate("bloom", "Human: ", "\n", "Assistant: ")
TEMPLATES: Dict[str, PromptTemplate] = {t.name: t for t in (QWEN2_TEMPLATE, LLAMA2_TEMPLATE, LLAMA3_TEMPLATE,
                                                            BLOOM_TEMPLATE)}


def template_for(model_type: str, tokenizer, name: Optional[str] = None) -> PromptTemplate:
    """The prompt template named `name`, else the one of the model family `model_type` (config.model_type).

    LLaMA checkpoints share one model_type; a tokenizer that knows `<|start_header_id|>` gets the LLaMA-3 format,
    any other the LLaMA-2 chat format.
    """
    if name is not None:
        if name not in TEMPLATES:
            raise ValueError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}")
        return TEMPLATES[name]
    if model_type == "llama":
        return LLAMA3_TEMPLATE if "<|start_header_id|>" in tokenizer.get_vocab() else LLAMA2_TEMPLATE
    if model_type in TEMPLATES:
        return TEMPLATES[model_type]
    raise ValueError(f"no prompt template for model family {model_type!r} (known families: qwen2, llama, bloom); "
                     f"pass --template with one of {sorted(TEMPLATES)}")


def load_rows(path: str, fields: Sequence[str] = ("source", "target")) -> List[Dict[str, str]]:
    """Rows of a parquet (`.parquet`), JSON-lines (`.jsonl`) or JSON (`.json`: JSON lines, or one array of objects)
    file; each row must have string `fields` (training: `source` and `target`).

    (pyarrow reads the files directly: `datasets` would add a cache directory and a dozen dependencies for what is
    a list of small dicts here.)"""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist; pass --dataset a .parquet or .jsonl file "
                                "with 'source' and 'target' fields")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rows = _json_array(text, path) if suffix == ".json" and text.lstrip().startswith("[") else \
            [_json_row(line, path, n) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    else:
        raise ValueError(f"dataset {path!r}: expected a .parquet or .jsonl file, got a {suffix or 'suffix-less'} file")
    if not rows:
        raise ValueError(f"dataset {path!r} has no rows")
    for i, row in enumerate(rows):
        missing = [k for k in fields if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"dataset {path!r}, row {i}: needs string fields {' and '.join(map(repr, fields))}, "
                             f"{' and '.join(repr(k) for k in missing)} missing or not a string "
                             f"(row fields: {sorted(row)})")
    return rows


def _json_array(text: str, path: str) -> List[dict]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset {path!r}: not a valid JSON array ({e})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"dataset {path!r}, array item {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def _json_row(line: str, path: str, line_number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset {path!r}, line {line_number}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"dataset {path!r}, line {line_number}: expected a JSON object, got {type(row).__name__}")
    return row


@dataclass(frozen=True)
class Example:
    """One tokenised row: `input_ids = prompt + answer`, the first `num_prompt` of them the prompt.
    `full_length`: the length of `prompt + answer` before `max_length` cut it (0: not recorded)."""

    input_ids: Tuple[int, ...]
    num_prompt: int
    task_ids: Tuple[int, ...]
    full_length: int = 0

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


def encode_example(tokenizer, template: PromptTemplate, source: str, target: str,
                   max_length: int = DEFAULT_MAX_LENGTH) -> Example:
    """Tokenise one row; too long a pair loses tokens from the end of the longer part first (HF `longest_first`)."""
    return encode_rows(tokenizer, template, [{"source": source, "target": target}], max_length)[0]


def task_tokens(tokenizer, source: str, max_length: int = DEFAULT_MAX_LENGTH) -> Tuple[int, ...]:
    """What the task router reads: the raw source, no template, no special tokens."""
    return tuple(tokenizer(source, add_special_tokens=False)["input_ids"][:max_length])


def encode_prompt(tokenizer, template: PromptTemplate, source: str,
                  max_length: int = DEFAULT_MAX_LENGTH) -> Tuple[List[int], Tuple[int, ...]]:
    """(prompt ids ending in the answer header, task ids) for generation, tokenised as in training."""
    prompt = tokenizer(template.format_source(source))["input_ids"]
    header = tokenizer(template.answer_prefix, add_special_tokens=False)["input_ids"]
    return (prompt + header)[-max_length:], task_tokens(tokenizer, source, max_length)


def _longest_first(num_prompt: int, num_answer: int, max_length: int) -> Tuple[int, int]:
    while num_prompt + num_answer > max_length:
        if num_prompt > num_answer:
            num_prompt -= 1
        else:
            num_answer -= 1
    return num_prompt, num_answer


def encode_rows(tokenizer, template: PromptTemplate, rows: Sequence[Dict[str, str]],
                max_length: int = DEFAULT_MAX_LENGTH) -> List[Example]:
    """`encode_example` of every row, tokenised in three batched tokenizer calls (a fast tokenizer's batch path is
    an order of magnitude quicker than a call per text)."""
    if not rows:
        return []
    prompts = tokenizer([template.format_source(r["source"]) for r in rows])["input_ids"]
    answers = tokenizer([template.format_target(r["target"], tokenizer) for r in rows],
                        add_special_tokens=False)["input_ids"]
    sources = tokenizer([r["source"] for r in rows], add_special_tokens=False)["input_ids"]
    examples = []
    for prompt, answer, source in zip(prompts, answers, sources):
        num_prompt, num_answer = _longest_first(len(prompt), len(answer), max_length)
        examples.append(Example(tuple(prompt[:num_prompt] + answer[:num_answer]), num_prompt,
                                tuple(source[:max_length]), len(prompt) + len(answer)))
    return examples


def truncation_warning(examples: Sequence[Example], max_length: int, what: str = "rows") -> Optional[str]:
    """One line saying how many examples `max_length` cut, and the length that would keep them whole; None if none."""
    cut = [e for e in examples if e.truncated]
    if not cut:
        return None
    empty = sum(len(e.input_ids) == e.num_prompt for e in cut)
    lost = f"; {empty} of them keep no answer token" if empty else ""
    return (f"warning: --max_length {max_length} truncates {len(cut)} of {len(examples)} {what} (prompt template "
            f"included){lost}; the longest needs {max(e.full_length for e in cut)} tokens")


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (len(sequences), longest) int64, padding on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def collate(examples: Sequence[Example], pad_id: int) -> Dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels (-100 on padding and prompt), task_input_ids, task_attention_mask."""
    input_ids, attention_mask = left_pad([e.input_ids for e in examples], pad_id)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    width = input_ids.shape[1]
    for row, e in enumerate(examples):
        answer_start = width - len(e.input_ids) + e.num_prompt
        labels[row, answer_start:] = input_ids[row, answer_start:]
    task_input_ids, task_attention_mask = left_pad([e.task_ids for e in examples], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "task_input_ids": task_input_ids, "task_attention_mask": task_attention_mask}


@dataclass(frozen=True)
class BatchPosition:
    """Where the data stream stands: the next batch is batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0


def batch_order(num_rows: int, batch_size: int, seed: int, num_epochs: Optional[int],
                start: BatchPosition = BatchPosition()) -> Iterator[Tuple[BatchPosition, List[int]]]:
    """(position, row indices) of every batch from `start` on; epoch e shuffles with a generator seeded seed + e.
    `num_epochs` None: without end (the caller stops drawing).

    The order depends only on (num_rows, batch_size, seed), so a resumed run continues the same stream.
    The last batch of an epoch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for epoch in itertools.count(start.epoch) if num_epochs is None else range(start.epoch, num_epochs):
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        first = start.batch if epoch == start.epoch else 0
        for batch in range(first, -(-num_rows // batch_size)):
            yield BatchPosition(epoch, batch), order[batch * batch_size:(batch + 1) * batch_size]
