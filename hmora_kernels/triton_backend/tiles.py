"""Triton device functions shared by the kernels: token blocks, member pointers, dropout masks, dot precision,
expert selection masks and the chunks of the gate-scaled operand."""
import inspect

import triton
import triton.language as tl

from .plan import LAUNCH_MEMBERS as _LAUNCH_MEMBERS

LAUNCH_MEMBERS = tl.constexpr(_LAUNCH_MEMBERS)
# Precision of the dots that carry gates or routing values: 3xTF32 keeps fp32 accuracy on tensor cores.
# (Plain TF32 would round gates to 10 bits; "ieee" FMA dots replicate an operand per warp and spill.)
# The other dots go through `dot` at the precision the plan picked (see plan.dot_precision).
FP32_DOT = tl.constexpr("tf32x3")


def fused_jit(fn):
    """triton.jit without value specialisation: no integer argument is specialised on its value (divisibility by
    16) and no pointer on its alignment, so one compiled kernel serves every shape, and the kernel the compile check
    builds for a configuration is the one the GPU runs. (Tuple elements are still specialised on alignment: the
    launchers pass only 16-byte-aligned tensors in tuples.)"""
    params = [name for name, p in inspect.signature(fn).parameters.items()
              if "constexpr" not in str(p.annotation)]
    return triton.jit(fn, do_not_specialize=params, do_not_specialize_on_alignment=params)


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
def member_value(values, m):
    """values[m] for a run-time m < LAUNCH_MEMBERS, from a tuple of pointers or integers."""
    value = values[0]
    for i in tl.static_range(1, LAUNCH_MEMBERS):
        value = tl.where(m == i, values[i], value)
    return value


@triton.jit
def member_int(sizes, m):
    """sizes[m] for a run-time m, from a tuple of member sizes passed as floats (see launch.member_sizes)."""
    return member_value(sizes, m).to(tl.int32)


@triton.jit
def member_of_block(block_starts, pid):
    """The member owning column block `pid`: member m owns [block_starts[m], block_starts[m + 1])."""
    m = 0
    for i in tl.static_range(1, LAUNCH_MEMBERS):
        m += (pid >= block_starts[i]).to(tl.int32)  # an int against an exact float
    return m


@triton.jit
def member_columns(block_starts, d_outs, member0, HS, BN: tl.constexpr):
    """For the program owning d_out column block tl.program_id(0) of a launch group: its member m, the member's
    d_out, the block's columns n and their validity, and the member's first column in h."""
    pid_n = tl.program_id(0)
    m = member_of_block(block_starts, pid_n)
    d_out = member_int(d_outs, m)
    n = (pid_n - member_int(block_starts, m)) * BN + tl.arange(0, BN)
    return m, d_out, n, n < d_out, (member0 + m) * HS


@triton.jit
def accumulate(ptrs, value, mask, atomic):
    """Add into zeroed memory shared with other programs (fp32 atomics), or store what this program owns alone."""
    if atomic:
        tl.atomic_add(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def slot_accumulators(MG: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """One fp32 (ROWS, COLS) zero accumulator per member slot, as a tuple indexed by the static slot loop."""
    accs = ()
    for s in tl.static_range(MG):
        accs = accs + (tl.zeros((ROWS, COLS), tl.float32),)
    return accs


@triton.jit
def philox_seed(seed, seed_ptr, seed_in_memory):
    """The seed's low 32 bits as an int64: from the 1-element int64 tensor when seed_in_memory (no host sync to
    read it), else from the int argument (the low word passed as a signed int32)."""
    value = seed.to(tl.int64)
    if seed_in_memory:
        value = tl.load(seed_ptr).to(tl.int64)
    return value & 0xFFFFFFFF


@triton.jit
def dropout_scale(offsets, seed, stream, dropout_p):
    """keep / (1 - p) per element: kept iff tl.rand(seed + (stream << 32), t * d_in + j) >= p
    (the stream layout of hmora_kernels.dropout); ones when p = 0."""
    if dropout_p > 0.0:
        keep = tl.rand(seed + (seed * 0 + stream) * 4294967296, offsets) >= dropout_p  # stream: int or int32
        scale = tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
    else:
        scale = tl.full(offsets.shape, 1.0, tl.float32)
    return scale


@triton.jit
def tf32(x):
    """x (fp32) rounded to TF32 (10 fraction bits), to nearest with ties away from zero: PTX cvt.rna.tf32.f32, the
    conversion cuBLAS applies before its TF32 tensor-core MMAs. (A tensor core given raw fp32 registers, which is
    what Triton's "tf32" dot passes it, ignores the low 13 bits: truncation.) NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def dot_operand(x, DOT: tl.constexpr):
    """An fp32 tile made ready for a dot at the plan's precision: rounded to TF32 here for "tf32" (so the interpreter
    computes what the GPU does, and a tile used twice is rounded once), unchanged for "ieee" (full fp32)."""
    if DOT == "tf32":
        x = tf32(x)
    return x


@triton.jit
def dot(a, b, DOT: tl.constexpr):
    """a @ b of two dot_operand tiles at the plan's precision."""
    return tl.dot(a, b, input_precision=DOT)


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def selection_bits(sel_ptr, rows64, row_ok, selective):
    """(per token, union over the block): bit e set when expert e is selected; every bit for soft routing."""
    if selective:
        bits = tl.load(sel_ptr + rows64, mask=row_ok, other=0)
    else:
        bits = tl.full(rows64.shape, -1, tl.int64)
    return bits, tl.reduce(tl.where(row_ok, bits, 0), 0, _bitwise_or)


@triton.jit
def expert_bits(bits, experts):
    """(rows, experts) booleans: expert experts[j] is selected by token i."""
    return ((bits[:, None] >> experts.to(tl.int64)[None, :]) & 1) != 0


@triton.jit
def popcount(x):
    """Set bits of each non-negative int64."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56).to(tl.int32)


@triton.jit
def token_rank_columns(bits, experts, ranks, r, compact):
    """(BM, N) columns of h[t, experts[n], ranks[n]] within a member's block of h: expert * r + rank, or, when
    compact (top-k with one A per expert: only selected experts are kept, in expert order), slot * r + rank with
    slot the number of the token's selected experts below the expert."""
    if compact:
        below = bits[:, None] & ((1 << experts.to(tl.int64)[None, :]) - 1)
        cols = popcount(below) * r + ranks[None, :]
    else:
        cols = (experts * r + ranks)[None, :] + tl.zeros_like(bits)[:, None].to(tl.int32)
    return cols


@triton.jit
def chunk_rank_columns(bits, e, j, r, compact):
    """(BM, EC, RCH) columns of h[t, e, j] within a member's block of h (see token_rank_columns)."""
    if compact:
        below = bits[:, None] & ((1 << e.to(tl.int64)[None, :]) - 1)
        cols = (popcount(below) * r)[:, :, None] + j[None, None, :]
    else:
        cols = (e[:, None] * r + j[None, :])[None, :, :] + tl.zeros_like(bits)[:, None, None].to(tl.int32)
    return cols


@triton.jit
def any_expert_selected(union, first_expert, EC: tl.constexpr):
    """Whether any token of the block selected one of the experts first_expert .. first_expert + EC - 1 (EC < 64)."""
    return ((union >> first_expert.to(tl.int64)) & ((1 << EC) - 1)) != 0


@triton.jit
def chunk_experts_ranks(chunk, rank_blocks, E, r, EC: tl.constexpr, RCH: tl.constexpr):
    """(first expert, experts (EC,), ranks (RCH,), their validity) of chunk `chunk` of the gate-scaled operand:
    expert block chunk // rank_blocks, rank block chunk % rank_blocks."""
    e0 = (chunk // rank_blocks) * EC
    e = e0 + tl.arange(0, EC)
    j = (chunk % rank_blocks) * RCH + tl.arange(0, RCH)
    return e0, e, j, e < E, j < r


@triton.jit
def chunk_rank_and_gates(h_ptr, gates_ptr, bits, rows64, row_ok, h_stride, h_col0, e, j, e_ok, j_ok, r, E,
                         gated, selective, HYDRA: tl.constexpr):
    """(h3, g, cols, ok) of a block of tokens for one chunk, each address loaded once: h3 (BM, EC or 1, RCH) holds
    h[t, e, j] (Hydra: h[t, j], the same for every expert), g (BM, EC) the gates (1 when not gated), cols and ok the
    columns of h3's elements within the member's block of h (see token_rank_columns) and where they exist. Under top-k
    the per-expert blocks of unselected experts are neither stored nor loaded (their gate is 0)."""
    if HYDRA:
        cols = j[None, None, :]
        ok = row_ok[:, None, None] & j_ok[None, None, :]
    else:
        cols = chunk_rank_columns(bits, e, j, r, selective)
        e_sel = row_ok[:, None] & e_ok[None, :]
        if selective:
            e_sel = e_sel & expert_bits(bits, e)
        ok = e_sel[:, :, None] & j_ok[None, None, :]
    h3 = tl.load(h_ptr + rows64[:, None, None] * h_stride + h_col0 + cols, mask=ok, other=0.0).to(tl.float32)
    if gated:
        g = tl.load(gates_ptr + rows64[:, None] * E + e[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0)
    else:
        g = tl.where(row_ok[:, None] & e_ok[None, :], 1.0, 0.0)
    return h3, g, cols, ok


@triton.jit
def gated_operand(h3, g, EC: tl.constexpr, RCH: tl.constexpr):
    """(BM, EC * RCH) chunk of the expand GEMM's operand: column e * RCH + j holds g[t, e] * h[t, e, j]."""
    return tl.reshape(g[:, :, None] * h3, (g.shape[0], EC * RCH))


@triton.jit
def b_chunk_columns(e, j, e_ok, j_ok, r, EC: tl.constexpr, RCH: tl.constexpr):
    """(column of B, valid) for each column e * RCH + j of a chunk of the gate-scaled operand: B's column e * r + j."""
    cols = tl.reshape(e[:, None] * r + j[None, :], (EC * RCH,))
    ok = tl.reshape(e_ok[:, None] & j_ok[None, :], (EC * RCH,))
    return cols, ok
