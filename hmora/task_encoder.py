"""Task encoder (SPEC 3.2): one vector per sequence from its raw source tokens, read by every task router."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import POSITION_FREQUENCIES

MAX_SOURCE_POSITIONS = 5000


def sinusoid_frequencies(d: int, rounding: str = "reference") -> torch.Tensor:
    """exp(-2i ln(10000) / d), i = 0 .. ceil(d/2) - 1, in fp32.

    "reference": the reference's formula as it computes it, fp32 `torch.exp` of the fp32 exponent (what its
    checkpoints were trained with; parity needs it). "correctly_rounded": the exponential taken in float64 and
    rounded once, the same bits on every CPU (fp32 exp may differ in the last bit between CPUs, and at positions
    near 5000 one ulp of a frequency moves the table by ~2e-4).
    """
    if rounding not in POSITION_FREQUENCIES:
        raise ValueError(f"position frequencies: expected one of {POSITION_FREQUENCIES}, got {rounding!r}")
    exponent = torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d)
    if rounding == "reference":
        return torch.exp(exponent)
    return torch.exp(exponent.double()).float()


def sinusoid_table(length: int, d: int, frequencies: torch.Tensor) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos f_i), PE[pos, 2i+1] = cos(pos f_i); (length, d) fp32.

    The fp32 product pos * f_i is what the reference rounds; sin and cos are taken of it in float64.
    """
    angle = (torch.arange(length, dtype=torch.float32).unsqueeze(1) * frequencies).double()
    table = torch.zeros(length, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)[:, : d // 2]
    return table.float()


class TaskEncoder(nn.Module):
    """Embedded source (B, S, d) + right-aligned sinusoidal positions (`sinusoid_frequencies`), then one appended
    learned task token (no position), through a bidirectional post-norm ReLU `nn.TransformerEncoder` with
    feed-forward 2d; the output at the task token is the task representation (B, d)."""

    def __init__(self, d: int, num_heads: int, num_layers: int, dropout: float, task_token_init: torch.Tensor,
                 position_frequencies: str = "reference", device=None):
        super().__init__()
        if d % num_heads:
            raise ValueError(
                f"task encoder: hidden size {d} must be divisible by num_encoder_heads = {num_heads}; "
                f"set HMoRAConfig.num_encoder_heads to a divisor of {d}")
        layer = nn.TransformerEncoderLayer(d, num_heads, dim_feedforward=2 * d, dropout=dropout, batch_first=True,
                                           device=device, dtype=torch.float32)
        self.transformer_encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.task_embedding = nn.Embedding(1, d, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.task_embedding.weight.copy_(task_token_init.reshape(1, d))
        table = sinusoid_table(MAX_SOURCE_POSITIONS, d, sinusoid_frequencies(d, position_frequencies))
        self.register_buffer("positions", table.to(device), persistent=False)

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = embeds.shape
        if length > MAX_SOURCE_POSITIONS:
            raise ValueError(f"task encoder: the source has {length} tokens, at most {MAX_SOURCE_POSITIONS} fit; "
                             f"truncate task_input_ids")
        src = embeds.to(torch.float32) + self.positions[MAX_SOURCE_POSITIONS - length:]
        src = torch.cat([src, self.task_embedding.weight.expand(batch, 1, -1)], dim=1)
        keep = torch.cat([attention_mask.bool(), attention_mask.new_ones(batch, 1, dtype=torch.bool)], dim=1)
        out = self.transformer_encoder(src, src_key_padding_mask=~keep)
        return out[:, -1]
