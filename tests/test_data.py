"""Data pipeline: prompt templates, tokenisation and labels (against the reference script's own tokenizer call),
left padding, dataset files and their errors, the resumable batch order, the tiny tokenizer and synthetic tasks."""
import json
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hmora.data import (
    IGNORE_INDEX, BatchPosition, QWEN2_TEMPLATE, batch_order, collate, encode_example, encode_prompt, encode_rows,
    left_pad, load_rows, template_for, truncation_warning,
)
from hmora.tiny import SYNTHETIC_TASKS, build_tiny_tokenizer, synthetic_rows


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_qwen2_template_is_the_reference_scripts_format():
    # example_train.py: format_source / format_target, verbatim
    assert QWEN2_TEMPLATE.format_source("hi") == (
        "<|im_start|>system\nYou are a helpful assistant.\n<|im_end|>\n<|im_start|>human\nhi\n<|im_end|>\n")
    assert QWEN2_TEMPLATE.format_target("yo", tokenizer=None) == "<|im_start|>assistant\nyo<|endoftext|>"
    assert QWEN2_TEMPLATE.generation_prompt("hi") == QWEN2_TEMPLATE.format_source("hi") + "<|im_start|>assistant\n"


# max_length None: no truncation; 20: cuts the answer of long rows; 14: cuts both parts (longest first)
@pytest.mark.parametrize("max_length", [None, 20, 14])
def test_batch_matches_reference_pair_tokenisation(tokenizer, max_length):
    rows = synthetic_rows(6, seed=3)
    examples = encode_rows(tokenizer, QWEN2_TEMPLATE, rows, max_length=max_length or 1024)
    batch = collate(examples, tokenizer.pad_token_id)
    # the reference script: tokenizer(sources, targets, padding=True, truncation=True, return_token_type_ids=True),
    # labels = input_ids with -100 where token_type_ids == 0 (padding and prompt)
    ref = tokenizer([QWEN2_TEMPLATE.format_source(r["source"]) for r in rows],
                    [QWEN2_TEMPLATE.format_target(r["target"], tokenizer) for r in rows],
                    padding=True, truncation=max_length is not None, max_length=max_length,
                    return_token_type_ids=True, return_tensors="pt")
    ref_labels = ref.input_ids.masked_fill(ref.token_type_ids == 0, IGNORE_INDEX)
    assert torch.equal(batch["input_ids"], ref.input_ids)
    assert torch.equal(batch["attention_mask"], ref.attention_mask)
    assert torch.equal(batch["labels"], ref_labels)
    # the task encoder's input: the raw sources, no template, left padded, cut to the same max_length
    ref_task = tokenizer([r["source"] for r in rows], padding=True, truncation=max_length is not None,
                         max_length=max_length, return_tensors="pt")
    assert torch.equal(batch["task_input_ids"], ref_task.input_ids)
    assert torch.equal(batch["task_attention_mask"], ref_task.attention_mask)


def test_labels_cover_exactly_the_answer(tokenizer):
    example = encode_example(tokenizer, QWEN2_TEMPLATE, "add: 1+2", "3")
    batch = collate([example, encode_example(tokenizer, QWEN2_TEMPLATE, "add: 10+20", "30")], tokenizer.pad_token_id)
    answer = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "<|im_start|>assistant\n3<|endoftext|>"
    assert batch["attention_mask"][0, :2].tolist() == [0, 0]  # the shorter row is padded on the left


def test_generation_prompt_is_the_training_sequence_up_to_the_answer(tokenizer):
    example = encode_example(tokenizer, QWEN2_TEMPLATE, "upper: abc", "ABC")
    prompt, task_ids = encode_prompt(tokenizer, QWEN2_TEMPLATE, "upper: abc")
    assert tuple(prompt) == example.input_ids[:len(prompt)]
    assert tokenizer.decode(example.input_ids[len(prompt):]) == "ABC<|endoftext|>"
    assert task_ids == example.task_ids == tuple(tokenizer("upper: abc", add_special_tokens=False)["input_ids"])


def test_left_pad_keeps_empty_rows_fully_masked():
    ids, mask = left_pad([[5, 6, 7], [], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 0], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 1]]


def test_template_lookup(tokenizer):
    assert template_for("qwen2", tokenizer).name == "qwen2"
    assert template_for("bloom", tokenizer).name == "bloom"
    assert template_for("llama", tokenizer).name == "llama2"  # no LLaMA-3 header token in this vocabulary
    assert template_for("mistral", tokenizer, name="llama3").name == "llama3"
    with pytest.raises(ValueError, match="no prompt template for model family 'gpt2'.*--template"):
        template_for("gpt2", tokenizer)
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'"):
        template_for("qwen2", tokenizer, name="chatml")


def test_dataset_files_round_trip(tmp_path):
    rows = synthetic_rows(5, seed=1)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "array.json").write_text("\n  " + json.dumps(rows, indent=2))  # a JSON array, as json.dump writes
    for name in ("d.parquet", "d.jsonl", "lines.json", "array.json"):
        assert load_rows(str(tmp_path / name)) == rows, name


def test_truncation_warning_counts_the_rows_cut(tokenizer):
    rows = [{"source": "add: 1+2", "target": "3"}, {"source": "reverse: abcdefghij", "target": "jihgfedcba"}]
    assert truncation_warning(encode_rows(tokenizer, QWEN2_TEMPLATE, rows), 1024) is None
    # prompt: 13 template tokens + the source; answer: 3 header tokens + the target + end of text
    lengths = [13 + 8 + 3 + 1 + 1, 13 + 19 + 3 + 10 + 1]
    examples = encode_rows(tokenizer, QWEN2_TEMPLATE, rows, max_length=30)
    assert [e.full_length for e in examples] == lengths and [e.truncated for e in examples] == [False, True]
    assert truncation_warning(examples, 30) == ("warning: --max_length 30 truncates 1 of 2 rows (prompt template "
                                                "included); the longest needs 46 tokens")
    examples = encode_rows(tokenizer, QWEN2_TEMPLATE, rows, max_length=1)  # longest first: the prompt's last token
    assert truncation_warning(examples, 1, "eval rows") == (
        "warning: --max_length 1 truncates 2 of 2 eval rows (prompt template included); 2 of them keep no answer "
        "token; the longest needs 46 tokens")


def _write_text(text):
    return lambda path: path.write_text(text)


def _write_parquet(rows):
    return lambda path: pq.write_table(pa.Table.from_pylist(rows), path)


# one case per way a dataset file can be unusable
@pytest.mark.parametrize("name,write,error,match", [
    ("missing.parquet", None, FileNotFoundError, "does not exist"),
    ("d.csv", _write_text("source,target\n"), ValueError, "expected a .parquet or .jsonl"),
    ("no_target.jsonl", _write_text('{"source": "a"}\n'), ValueError, "row 0.*'target' missing"),
    ("wrong.parquet", _write_parquet([{"question": "a", "answer": "b"}]), ValueError,
     "'source' and 'target' missing.*question"),
    ("bad.jsonl", _write_text('{"source": "a", "target": "b"}\n{oops\n'), ValueError, "line 2: not valid JSON"),
    ("list.jsonl", _write_text('["a", "b"]\n'), ValueError, "line 1: expected a JSON object, got list"),
    ("strings.json", _write_text('["a", "b"]'), ValueError, "array item 0: expected a JSON object, got str"),
    ("cut.json", _write_text('[{"source": "a", "target": "b"},'), ValueError, "not a valid JSON array"),
    ("empty.jsonl", _write_text(""), ValueError, "no rows"),
])
def test_dataset_errors_say_what_is_wrong(tmp_path, name, write, error, match):
    if write is not None:
        write(tmp_path / name)
    with pytest.raises(error, match=match):
        load_rows(str(tmp_path / name))


# 10 rows / batch 3: a short last batch; 8 / 4: even split
@pytest.mark.parametrize("num_rows,batch_size", [(10, 3), (8, 4)])
def test_batch_order_covers_each_epoch_and_resumes_mid_stream(num_rows, batch_size):
    full = list(batch_order(num_rows, batch_size, seed=5, num_epochs=3))
    for epoch in range(3):
        rows = [i for pos, idx in full if pos.epoch == epoch for i in idx]
        assert sorted(rows) == list(range(num_rows))
    assert [idx for _, idx in full if _.epoch == 0] != [idx for _, idx in full if _.epoch == 1]  # reshuffled
    for cut in (1, len(full) // 2, len(full) - 1):
        assert list(batch_order(num_rows, batch_size, seed=5, num_epochs=3, start=full[cut][0])) == full[cut:]
    assert list(batch_order(num_rows, batch_size, 5, 3, start=BatchPosition(3, 0))) == []


def test_synthetic_tasks_are_correct_and_tokenise_without_unknowns(tokenizer):
    rows = synthetic_rows(40, seed=0)
    assert {r["task"] for r in rows} == set(SYNTHETIC_TASKS)
    for r in rows:
        word = r["source"].split(": ", 1)[1]
        solve = {"reverse": lambda w: w[::-1], "sort": lambda w: "".join(sorted(w)), "upper": str.upper,
                 "add": lambda w: str(sum(int(x) for x in w.split("+")))}[r["task"]]
        assert r["target"] == solve(word)
        ids = encode_example(tokenizer, QWEN2_TEMPLATE, r["source"], r["target"]).input_ids
        assert tokenizer.unk_token_id not in ids
    assert synthetic_rows(8, seed=0) == rows[:8]  # deterministic


def test_tiny_tokenizer_round_trips_through_save(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    text = QWEN2_TEMPLATE.format_source("reverse: " + string.ascii_letters)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) == 13 + len("reverse: " + string.ascii_letters)  # 13 template tokens, one per character
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert reloaded.padding_side == "left" and reloaded.pad_token_id == tokenizer.pad_token_id


def test_batch_order_without_end_continues_the_same_stream():
    bounded = list(batch_order(10, 4, seed=2, num_epochs=3))
    endless = batch_order(10, 4, seed=2, num_epochs=None, start=bounded[4][0])
    assert [next(endless) for _ in range(len(bounded) - 4)] == bounded[4:]
    assert next(endless)[0] == BatchPosition(3, 0)  # and on into a fourth epoch
