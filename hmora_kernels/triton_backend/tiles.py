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
def token_rows(t0, t_end, BM: tl.constexpr):
    """(rows, in range, rows as int64 for offsets that can pass 2^31) of the BM tokens from t0, up to t_end."""
    rows = t0 + tl.arange(0, BM)
    return rows, rows < t_end, rows.to(tl.int64)


@triton.jit
def token_block(T, BM: tl.constexpr):
    """token_rows of this program's block of BM tokens (grid axis 0 over token blocks)."""
    return token_rows(tl.program_id(0) * BM, T, BM)


@triton.jit
def token_split(T, tokens_per_split):
    """[begin, end) of this program's share of the tokens (grid axis 1 over token splits)."""
    t_begin = tl.program_id(1) * tokens_per_split
    return t_begin, tl.minimum(t_begin + tokens_per_split, T)


@triton.jit
def accumulate(ptrs, value, mask, ATOMIC: tl.constexpr):
    """Add into zeroed memory shared with other programs (fp32 atomics), or store what this program owns alone."""
    if ATOMIC:
        tl.atomic_add(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value, mask=mask)


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
    # past the last token or expert any positive p will do (nothing there is stored): no 0/0 in the renorm
    return p_task, a, tl.where(valid, p, 1.0)


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
def rank_and_gates(h_ptr, gates_ptr, rows64, row_ok, h_stride, h_col0, E, RANK: tl.constexpr,
                   E_SLOTS: tl.constexpr, R_SLOTS: tl.constexpr, HYDRA: tl.constexpr, GATED: tl.constexpr):
    """(h3, g) of a block of tokens, each address loaded once: h3 (BM, E_SLOTS or 1, R_SLOTS) holds h[t, e*r + j]
    (Hydra: the one h[t, j] of all experts, broadcast later), g (BM, E_SLOTS) the gates (ones when not gated)."""
    e = tl.arange(0, E_SLOTS)
    j = tl.arange(0, R_SLOTS)
    if HYDRA:
        h3 = tl.load(h_ptr + rows64[:, None] * h_stride + h_col0 + j[None, :],
                     mask=row_ok[:, None] & (j < RANK)[None, :], other=0.0).to(tl.float32)[:, None, :]
    else:
        cols = e[:, None] * RANK + j[None, :]
        ok = (e < E)[:, None] & (j < RANK)[None, :]
        h3 = tl.load(h_ptr + rows64[:, None, None] * h_stride + h_col0 + cols[None, :, :],
                     mask=row_ok[:, None, None] & ok[None, :, :], other=0.0).to(tl.float32)
    if GATED:
        g = tl.load(gates_ptr + rows64[:, None] * E + e[None, :], mask=row_ok[:, None] & (e < E)[None, :], other=0.0)
    else:
        g = tl.full((rows64.shape[0], E_SLOTS), 1.0, tl.float32)
    return h3, g


@triton.jit
def gated_operand(h3, g, E_SLOTS: tl.constexpr, R_SLOTS: tl.constexpr):
    """(BM, E_SLOTS * R_SLOTS) operand of the expand GEMM: column e * R_SLOTS + j holds g[t, e] * h[t, e, j]."""
    return tl.reshape(g[:, :, None] * h3, (g.shape[0], E_SLOTS * R_SLOTS))


@triton.jit
def b_columns(E, RANK: tl.constexpr, E_SLOTS: tl.constexpr, R_SLOTS: tl.constexpr):
    """(column of B, valid) for each column e * R_SLOTS + j of the gate-scaled operand: B's column e * r + j."""
    c = tl.arange(0, E_SLOTS * R_SLOTS)
    e = c // R_SLOTS
    j = c % R_SLOTS
    return e * RANK + j, (e < E) & (j < RANK)
