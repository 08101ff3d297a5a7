"""The embedded default: a tiny random Qwen2, a tokenizer built in code and a synthetic multi-task dataset.

Nothing is downloaded. The tokenizer is character level, plus the Qwen2 chat markers and the fixed words of the
Qwen2 prompt template as whole tokens (so the template costs a dozen tokens, not sixty). Each synthetic task starts
with its own instruction word, so the task router has something to tell apart.
"""
from __future__ import annotations

import random
import string
from typing import Callable, Dict, List, Tuple

import torch

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
END_OF_TEXT = "<|endoftext|>"
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")
# whole-word tokens for the fixed text of the Qwen2 template (hmora.data.QWEN2_TEMPLATE)
TEMPLATE_WORDS = ("system", "human", "assistant", "You are a helpful assistant.")
CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " :+-=?.,!\n"

TINY_MODEL_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256,
)
# fan-in scaled (1 / sqrt(hidden)); with transformers' default 0.02 the frozen random lm_head cannot produce logit
# gaps larger than about 2 after the final RMSNorm, so no adapter could bring the loss below ~3.5 nats
INIT_STD = TINY_MODEL_SHAPE["hidden_size"] ** -0.5


def build_tiny_tokenizer():
    """A character-level `PreTrainedTokenizerFast` (left padding) that knows the Qwen2 chat markers."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, END_OF_TEXT, *CHAT_MARKERS, UNK_TOKEN]
    vocab = {token: i for i, token in enumerate([*specials, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()  # join tokens without spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(w, normalized=False) for w in TEMPLATE_WORDS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=END_OF_TEXT, unk_token=UNK_TOKEN,
        padding_side="left",
    )


def build_tiny_base(tokenizer, seed: int = 0):
    """A randomly initialised 4-layer Qwen2ForCausalLM (hidden 64) sized to `tokenizer`, in fp32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False, initializer_range=INIT_STD, **TINY_MODEL_SHAPE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).float().eval()


def _letters(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _reverse(rng: random.Random) -> Tuple[str, str]:
    word = _letters(rng, string.ascii_lowercase, 3, 6)
    return f"reverse: {word}", word[::-1]


def _sort_digits(rng: random.Random) -> Tuple[str, str]:
    digits = _letters(rng, string.digits, 3, 6)
    return f"sort: {digits}", "".join(sorted(digits))


def _add(rng: random.Random) -> Tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add: {a}+{b}", str(a + b)


def _uppercase(rng: random.Random) -> Tuple[str, str]:
    word = _letters(rng, string.ascii_lowercase, 3, 6)
    return f"upper: {word}", word.upper()


SYNTHETIC_TASKS: Dict[str, Callable[[random.Random], Tuple[str, str]]] = {
    "reverse": _reverse, "sort": _sort_digits, "add": _add, "upper": _uppercase,
}


def synthetic_rows(num_rows: int, seed: int = 0) -> List[Dict[str, str]]:
    """`num_rows` rows {"task", "source", "target"}, the tasks taking turns, drawn from `random.Random(seed)`."""
    rng = random.Random(seed)
    names = list(SYNTHETIC_TASKS)
    rows = []
    for i in range(num_rows):
        name = names[i % len(names)]
        source, target = SYNTHETIC_TASKS[name](rng)
        rows.append({"task": name, "source": source, "target": target})
    return rows
