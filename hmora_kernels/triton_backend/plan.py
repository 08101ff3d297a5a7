"""What one routed-group launch sequence needs to know: shapes, paddings, block sizes and routing flags.

Block sizes come from a fixed rule (two tiers by register demand), not from autotuning, so the interpreter,
the GPU and the ahead-of-time compile check all see the same configurations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

# Limits of the kernels; above them the caller gets a ValueError that names backend='torch'.
MAX_RANK_WIDTH = 128   # E * r with both padded to powers of two: the gate-scaled rank block kept in registers
MAX_EXPERTS = 16       # E: router logits and routing live in one register tile
MAX_MEMBERS = 4        # members sharing one x and one router (q/k/v is 3)
MAX_GROUP_RANK = 256   # sum over members of the padded width of h_m: the forward keeps all of them in registers

KIND_CODES = {"token": 0, "task": 1, "hybrid": 2, "none": 3}  # "none": plain LoRA, no router, gates = 1
ROUTER_NONE, ROUTER_WEIGHT, ROUTER_LOGITS = 0, 1, 2           # where the logits come from


def pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def padded(n: int) -> int:
    """tl.dot needs every dimension >= 16 and a power of two."""
    return max(16, pow2(n))


def rank_slots(E: int, r: int) -> tuple:
    """(expert slots, rank slots per expert) of the gate-scaled operand g (x) h: column e * R_SLOTS + j holds
    g[e] h[j]. Powers of two, so the operand is an outer product reshaped in registers from compact g and h
    tiles, with at least 16 columns for tl.dot."""
    e_slots = pow2(E)
    return e_slots, max(pow2(r), 16 // e_slots)


@dataclass(frozen=True)
class Blocks:
    rows: int        # BM: tokens per program
    cols: int        # BK / BN: d_in or d_out columns per step
    num_warps: int


@dataclass(frozen=True)
class GroupPlan:
    T: int
    d_in: int
    d_outs: Tuple[int, ...]
    E: int
    r: int
    hydra: bool
    kind: str
    router: int          # ROUTER_NONE / ROUTER_WEIGHT / ROUTER_LOGITS
    has_bias: bool
    top_k: int           # 0: soft routing
    renorm_softmax: bool
    dropout_p: float
    seed: int
    num_sequences: int
    scaling: float
    deterministic: bool

    @property
    def M(self) -> int:
        return len(self.d_outs)

    @property
    def HR(self) -> int:
        """Width of one member's rank activations h: r for Hydra, E*r otherwise."""
        return self.r if self.hydra else self.E * self.r

    @property
    def KE(self) -> int:
        """Width of the gate-scaled operand of the expand GEMM (columns of B): E*r."""
        return self.E * self.r

    @property
    def R_PAD(self) -> int:
        return padded(self.HR)

    @property
    def E_SLOTS(self) -> int:
        return rank_slots(self.E, self.r)[0]

    @property
    def R_SLOTS(self) -> int:
        return rank_slots(self.E, self.r)[1]

    @property
    def KE_SLOTS(self) -> int:
        """Columns of the gate-scaled operand in registers (E*r padded; see rank_slots)."""
        return self.E_SLOTS * self.R_SLOTS

    @property
    def E_PAD(self) -> int:
        return padded(self.E)

    @property
    def computes_logits(self) -> bool:
        return self.router == ROUTER_WEIGHT

    @property
    def kind_code(self) -> int:
        return KIND_CODES[self.kind]

    @property
    def seq_len(self) -> int:
        return self.T // self.num_sequences

    @property
    def wide(self) -> bool:
        """The register-heavy tier: the members' rank accumulators together exceed 128 fp32 columns, or the
        gate-scaled operand (E*r padded, KE_SLOTS) exceeds 64."""
        return self.M * self.R_PAD > 128 or self.KE_SLOTS > 64

    def tiles(self, kernel: str) -> Blocks:
        """The one tile configuration of `kernel` for this group (chosen so that no kernel spills; see aot.py)."""
        return TILES[kernel][self.wide]

    def token_splits(self, column_programs: int, block_rows: int, reduces: bool = True) -> Tuple[int, int]:
        """(splits, tokens per split) of the token axis of a column-parallel kernel: enough programs for ~4 waves
        of a 132-SM GPU, except one split for a reduction over tokens in deterministic mode (plain stores instead
        of fp32 atomic adds into zeroed buffers)."""
        splits = 1
        if not (reduces and self.deterministic):
            splits = max(1, min(-(-self.T // block_rows), -(-4 * 132 // column_programs)))
        per_split = -(-(-(-self.T // splits)) // block_rows) * block_rows
        return -(-self.T // per_split), per_split

    @property
    def stream_seed(self) -> int:
        """Low 32 bits of the seed; stream s adds s << 32 in the kernels (see hmora_kernels.dropout.stream_seed)."""
        return self.seed & 0xFFFFFFFF


# kernel -> (narrow tier, wide tier)
TILES = {
    "shrink_route": (Blocks(rows=32, cols=32, num_warps=8), Blocks(rows=16, cols=16, num_warps=8)),
    "expand": (Blocks(rows=32, cols=64, num_warps=8), Blocks(rows=16, cols=32, num_warps=8)),
    "output_grad": (Blocks(rows=32, cols=32, num_warps=8), Blocks(rows=16, cols=32, num_warps=8)),
    "route_grad": (Blocks(rows=32, cols=0, num_warps=4), Blocks(rows=32, cols=0, num_warps=4)),  # no column axis
    "input_grad": (Blocks(rows=16, cols=32, num_warps=8), Blocks(rows=16, cols=16, num_warps=8)),
}


def check_limits(E: int, r: int, hydra: bool, num_members: int) -> None:
    fix = "use backend='torch' (same signature) for this layer"
    e_slots, r_slots = rank_slots(E, r)
    if e_slots * r_slots > MAX_RANK_WIDTH:
        raise ValueError(f"triton backend: E*r = {E}*{r}, padded to powers of two {e_slots}*{r_slots} = "
                         f"{e_slots * r_slots}, exceeds the kernels' limit {MAX_RANK_WIDTH}; {fix}")
    if E > MAX_EXPERTS:
        raise ValueError(f"triton backend: E = {E} experts exceeds the kernels' limit {MAX_EXPERTS}; {fix}")
    if num_members > MAX_MEMBERS:
        raise ValueError(
            f"triton backend: {num_members} members share one router, the kernels take at most {MAX_MEMBERS}; "
            f"split the group or {fix}"
        )
    group_rank = num_members * padded(r if hydra else E * r)
    if group_rank > MAX_GROUP_RANK:
        raise ValueError(
            f"triton backend: {num_members} members x rank width {r if hydra else E * r} (padded to "
            f"{padded(r if hydra else E * r)}) = {group_rank} exceeds the kernels' limit {MAX_GROUP_RANK}; "
            f"split the group or {fix}"
        )
