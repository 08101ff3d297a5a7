"""Triton device functions shared by the kernels: dropout masks, routing in registers, gate-scaled rank tiles."""
import triton
import triton.language as tl

from .plan import KIND_CODES, ROUTER_LOGITS as _ROUTER_LOGITS, ROUTER_WEIGHT as _ROUTER_WEIGHT

KIND_TOKEN = tl.constexpr(KIND_CODES["token"])
KIND_TASK = tl.constexpr(KIND_CODES["task"])
KIND_HYBRID = tl.constexpr(KIND_CODES["hybrid"])
KIND_NONE = tl.constexpr(KIND_CODES["none"])
ROUTER_WEIGHT = tl.constexpr(_ROUTER_WEIGHT)
ROUTER_LOGITS = tl.constexpr(_ROUTER_LOGITS)
# Precision of the dots that carry gates or routing values: 3xTF32 keeps fp32 accuracy on tensor cores.
# (Plain TF32 would round gates to 10 bits; "ieee" FMA dots replicate an operand per warp and spill.)
# The other dots (x A^T, dY B, ...) use the default: TF32 on fp32 tiles, exact for bf16 / fp16 inputs.
# The interpreter computes every dot in full fp32.
FP32_DOT = tl.constexpr("tf32x3")


@triton.jit
def token_block(T, BM: tl.constexpr):
    """(rows, in range, rows as int64 for offsets that can pass 2^31) of this program's block of BM tokens."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    return rows, rows < T, rows.to(tl.int64)


@triton.jit
def member_accumulators(M: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """One fp32 (ROWS, COLS) zero accumulator per member, as a tuple indexed by the static member loop."""
    accs = ()
    for m in tl.static_range(M):
        accs = accs + (tl.zeros((ROWS, COLS), tl.float32),)
    return accs


@triton.jit
def dropout_scale(offsets, seed, stream: tl.constexpr, dropout_p, DROPOUT: tl.constexpr):
    """keep / (1 - p) per element: kept iff tl.rand(seed + (stream << 32), t * d_in + j) >= p
    (the stream layout of hmora_kernels.dropout)."""
    if DROPOUT:
        key = seed.to(tl.int64) + stream * 4294967296
        keep = tl.rand(key, offsets) >= dropout_p
        return tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
    else:
        return 1.0


@triton.jit
def softmax_rows(z, valid):
    """Row softmax over the valid columns (others 0), in fp32."""
    z = tl.where(valid, z, float("-inf"))
    e = tl.where(valid, tl.exp(z - tl.max(z, axis=1)[:, None]), 0.0)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def mix_probs(p_tok, rows, cols, valid, E, seq_len, task_ptr, alpha_ptr, KIND: tl.constexpr):
    """(p_task, a, p): p = p_tok (token), p_task of the token's sequence (task), or (1 - a) p_tok + a p_task."""
    p_task = tl.zeros_like(p_tok)
    a = 0.0
    p = p_tok
    if KIND != KIND_TOKEN:
        seq = (rows // seq_len).to(tl.int64)
        p_task = tl.load(task_ptr + seq[:, None] * E + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        if KIND == KIND_TASK:
            p = p_task
        else:
            a = tl.sigmoid(tl.load(alpha_ptr).to(tl.float32))
            p = (1.0 - a) * p_tok + a * p_task
    return p_task, a, p


@triton.jit
def gates_from_probs(p, cols, valid, top_k, TOP_K: tl.constexpr, RENORM_SOFTMAX: tl.constexpr):
    """(selected, gates): soft routing keeps p; top-k renormalises the k largest (lowest index wins ties)
    by a softmax over the selected probabilities or by their sum."""
    if TOP_K:
        selected = p < -1.0
        for _ in range(top_k):
            cand = tl.where(valid & ~selected, p, -1.0)
            best = tl.max(cand, axis=1)
            first = tl.min(tl.where(cand == best[:, None], cols[None, :], 1 << 30), axis=1)
            selected = selected | (cols[None, :] == first[:, None])
        selected = selected & valid
        if RENORM_SOFTMAX:
            gates = softmax_rows(p, selected)
        else:
            kept = tl.where(selected, p, 0.0)
            gates = kept / tl.sum(kept, axis=1)[:, None]
    else:
        selected = valid
        gates = tl.where(valid, p, 0.0)
    return selected, gates


@triton.jit
def rank_tile(h_ptr, gates_ptr, rows64, row_ok, ck, h_stride, h_col0, E, KE, RANK: tl.constexpr,
              HYDRA: tl.constexpr, GATED: tl.constexpr):
    """(BM, KE_PAD) operand of the expand GEMM: column c = e*r + j holds g[t, e] * h[t, j (Hydra) or c]."""
    ok = row_ok[:, None] & (ck < KE)[None, :]
    if HYDRA:
        h_cols = ck % RANK
    else:
        h_cols = ck
    tile = tl.load(h_ptr + rows64[:, None] * h_stride + h_col0 + h_cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if GATED:
        tile = tile * tl.load(gates_ptr + rows64[:, None] * E + (ck // RANK)[None, :], mask=ok, other=0.0)
    return tile
