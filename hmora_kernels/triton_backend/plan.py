"""What one routed-group call launches: launch groups of members, tile configurations and routing flags.

The kernels' registers do not grow with E, r or the number of members: the rank dimension is walked in chunks
(HC contiguous columns of h for the GEMMs with x; blocks of EC whole experts x RCH ranks of the gate-scaled
operand for the GEMMs with B), members are picked at run time from pointer tuples of LAUNCH_MEMBERS entries, and
the routing options are run-time values. So a finite set of kernel configurations serves every accepted group:
`kernel_configs` is the one rule that picks them, and the compile check (`aot.py`) compiles every configuration
it can return (`configuration_space`). Tiles come from that rule, not from autotuning, so the interpreter, the GPU
and the compile check see the same configurations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..types import RankWise, Switch, TopP

# Limits of the fused kernels; the compile check covers exactly this space (see configuration_space).
MAX_EXPERTS = 64        # routing in one (rows, 64) register tile; a token's selected experts in one 64-bit mask
MAX_RANK = 128          # r
MAX_RANK_WIDTH = 1024   # E * r
LAUNCH_MEMBERS = 8      # members per launch (the kernels take pointer tuples of this length); more take more launches
MAX_OUT_FEATURES = 2 ** 24 - 1  # a member's d_out: member sizes travel as floats, exact below 2^24 (launch.member_sizes)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KIND_CODES = {"token": 0, "task": 1, "hybrid": 2, "none": 3}  # "none": plain LoRA, no router, gates = 1
ROUTER_NONE, ROUTER_WEIGHT, ROUTER_LOGITS = 0, 1, 2           # where the logits come from
PRECISIONS = ("tf32", "ieee")
RULE_CODES = {"default": 0, "Switch": 1, "TopP": 2, "RankWise": 3}  # the gate rule: a run-time kernel argument

# Rank accumulators one program of shrink_route / input_grad holds: members x HC fp32 columns, and at most this
# many members (input_grad also holds their A tiles); beyond, more programs or work items (chosen so none spills).
GROUP_COLUMNS = 256
MAX_SLOTS = {"shrink_route": 8, "input_grad": 4}
# input_grad with full-fp32 dots: 4 members x 64 columns spilled 16 bytes on sm_90 (the same tile with TF32 dots
# compiles clean); half the columns per work item fit.
IEEE_INPUT_GRAD_COLUMNS = 128


def pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expert_pad(E: int) -> int:
    """E_PAD: width of the routing tiles (logits, probabilities, gates of a block of tokens)."""
    return 16 if E <= 16 else MAX_EXPERTS


def h_chunk(HR: int) -> int:
    """HC: columns of h (= drop(x) A^T) per program of the GEMMs with x; a power of two, 16 (tl.dot's minimum) to 64."""
    return min(64, max(16, pow2(HR)))


def operand_chunk(E: int, r: int) -> Tuple[int, int]:
    """(EC, RCH): one chunk of the gate-scaled operand g (x) h holds EC experts x RCH ranks, column e * RCH + j.
    Ranks are padded to a power of two (at least 8); a chunk is 64 columns, or 16 for groups that small."""
    ranks = max(8, pow2(r))
    rch = min(ranks, 64)
    kc = 16 if pow2(E) * ranks <= 16 else 64
    return kc // rch, rch


def members_per_program(kernel: str, HC: int, members: int, precision: str) -> int:
    """MG: members whose rank accumulators one program of shrink_route / input_grad holds at once."""
    columns = IEEE_INPUT_GRAD_COLUMNS if (kernel, precision) == ("input_grad", "ieee") else GROUP_COLUMNS
    return min(columns // HC, MAX_SLOTS[kernel], pow2(min(members, LAUNCH_MEMBERS)))


def param_dtype(x_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels read a member's A and B in: their own when it is x's or fp32, else fp32 (exact)."""
    return dtype if dtype in (x_dtype, torch.float32) else torch.float32


def output_dtype(x_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels write a member's output in: its base's when that is x's or fp32, else fp32 (the op casts
    it to the base's dtype afterwards: one extra pass for such a member)."""
    return dtype if dtype in (x_dtype, torch.float32) else torch.float32


@torch.compiler.assume_constant_result  # torch.compile cannot trace the getter: the switch is read when it traces
def torch_allows_tf32() -> bool:
    """PyTorch's switch for fp32 matmuls on CUDA: torch.backends.cuda.matmul.fp32_precision ("tf32" / "ieee"; "none"
    defers to torch.backends.fp32_precision), which allow_tf32 = True and set_float32_matmul_precision("high" or
    "medium") set to "tf32". Reading allow_tf32 itself raises once the new API has been used."""
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def dot_precision(x_dtype: torch.dtype) -> str:
    """Precision of the default-precision dots (x A^T, dY B, dh A, dh^T x): with fp32 activations what PyTorch does for
    fp32 matmuls ("tf32": operands rounded to TF32 as cuBLAS does; "ieee": full fp32); with fp16 / bf16 activations
    "tf32", exact for the 16-bit operands (their 7 or 10 fraction bits fit TF32's 10)."""
    if x_dtype == torch.float32 and not torch_allows_tf32():
        return "ieee"
    return "tf32"


@dataclass(frozen=True)
class RuleArgs:
    """The gate rule as the kernels take it (hmora_kernels.types: None, Switch, TopP, RankWise). Every field is a
    run-time kernel argument, like the routing kind and top_k, so the rules add no kernel configuration: the
    compile check's kernels are the ones that run them."""

    code: int = RULE_CODES["default"]
    capacity: int = 0                        # Switch: tokens per expert and sequence; 0: no limit
    top_p: float = 1.0                       # TopP
    keep_top_k: int = 0
    entropy_threshold: float = math.inf      # +inf: no all-experts broadcast (TopP's threshold >= 1 too)
    entropy_index: float = 1.0
    entropy_eps: float = 0.0
    entropy_norm: float = 1.0                # the normalisation of the Tsallis entropy, from E and q

    @staticmethod
    def of(rule, num_experts: int) -> "RuleArgs":
        if rule is None:
            return RuleArgs()
        if isinstance(rule, Switch):
            return RuleArgs(RULE_CODES["Switch"], capacity=rule.capacity or 0)
        if isinstance(rule, RankWise):
            return RuleArgs(RULE_CODES["RankWise"])
        assert isinstance(rule, TopP), rule
        q, E = rule.entropy_index, num_experts
        # the reference's normalisation (computed in float64): S_max (q - 1) = 1 - E^(1-q), Shannon's ln E
        norm = math.log(E) if q == 1 else 1 - E ** (1 - q)
        broadcasts = rule.entropy_threshold < 1 and E > 1
        return RuleArgs(RULE_CODES["TopP"], top_p=rule.top_p, keep_top_k=rule.keep_top_k,
                        entropy_threshold=rule.entropy_threshold if broadcasts else math.inf, entropy_index=q,
                        entropy_eps=rule.entropy_eps, entropy_norm=norm if E > 1 else 1.0)

    def as_list(self) -> List[float]:
        """The custom ops' form (a float list: the op schema has no dataclasses; ints up to 2^53 stay exact)."""
        return [float(v) for v in (self.code, self.capacity, self.top_p, self.keep_top_k, self.entropy_threshold,
                                   self.entropy_index, self.entropy_eps, self.entropy_norm)]

    @staticmethod
    def from_list(values) -> "RuleArgs":
        code, capacity, *rest = values
        return RuleArgs(int(code), int(capacity), rest[0], int(rest[1]), *rest[2:])

    def top_k(self, top_k: int) -> int:
        """The k of the kernels' top-k selection: Switch 1, RankWise its own top_k (passed as the op's), TopP 0
        (its own selection), else the default rule's top_k (0: soft)."""
        if self.code == RULE_CODES["Switch"]:
            return 1
        if self.code == RULE_CODES["TopP"]:
            return 0
        return top_k

    def kernel_tuple(self) -> Tuple[float, ...]:
        """TopP's parameters as the kernels' rule_args tuple, all floats (Triton does not specialise floats in a
        tuple; it would specialise ints on their values)."""
        return (float(self.top_p), float(self.keep_top_k), float(self.entropy_threshold), float(self.entropy_index),
                float(self.entropy_eps), float(self.entropy_norm))


@dataclass(frozen=True)
class Blocks:
    rows: int        # BM: tokens per block
    cols: int        # BK / BN: d_in or d_out columns per block
    num_warps: int


# kernel -> precision of its default-precision dots -> blocks (the tiers). route_grad has no column axis.
TILES = {
    "shrink_route": {"tf32": Blocks(32, 16, 8), "ieee": Blocks(32, 16, 8)},
    "expand": {"tf32": Blocks(32, 64, 8)},  # its one dot carries the gates: always 3xTF32
    "output_grad": {"tf32": Blocks(32, 32, 8), "ieee": Blocks(32, 32, 8)},
    "rank_grad": {"tf32": Blocks(32, 32, 8), "ieee": Blocks(16, 16, 8)},
    "route_grad": {"tf32": Blocks(32, 0, 4)},
    "input_grad": {"tf32": Blocks(16, 16, 8), "ieee": Blocks(16, 16, 8)},
}
KERNELS = tuple(TILES)
# expand with per-expert A and chunks of 8 experts x 8 ranks: at BM 32 it needs more than 255 registers (ptxas spilled
# 8 bytes on sm_80, 32 on sm_90; the per-expert (BM, 8, 8) h tile beside the 64x64 B chunk held across the token loop);
# 16 tokens a block fit in about 200 and move the same bytes (the B chunk still stays in registers).
EXPAND_EXPERT_CHUNKS = Blocks(16, 64, 8)
# rank_grad (deterministic mode) with per-expert A and chunks of 1 expert x 64 ranks (r 33..64) and TF32 dots spilled
# 40 bytes on sm_80 at 32 tokens a block; 16 tokens a block re-read B twice as often, in deterministic mode only.
RANK_GRAD_WIDE_CHUNKS = Blocks(16, 32, 8)


@dataclass(frozen=True)
class KernelConfig:
    """The constexprs and warps of one kernel launch: what the compile check compiles."""

    kernel: str
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int

    @property
    def tier(self) -> Tuple[str, Tuple[Tuple[str, object], ...], int]:
        """(kernel, block sizes and dot precision, warps): the tile decision, without the shape classes."""
        tile = tuple((k, v) for k, v in self.constexprs if k in ("BM", "BK", "BN", "DOT"))
        return self.kernel, tile, self.num_warps

    def as_dict(self) -> Dict[str, object]:
        return dict(self.constexprs)


@dataclass(frozen=True)
class Shape:
    """What the kernel configurations depend on: E, r, Hydra, members in one launch, dot precision."""

    E: int
    r: int
    hydra: bool
    members: int
    precision: str

    @property
    def HR(self) -> int:
        return self.r if self.hydra else self.E * self.r


def kernel_configs(shape: Shape, deterministic: bool, routed: bool) -> Dict[str, KernelConfig]:
    """The configuration of every kernel one launch group runs (forward and backward)."""
    E_PAD = expert_pad(shape.E)
    HC = h_chunk(shape.HR)
    EC, RCH = operand_chunk(shape.E, shape.r)
    precision = shape.precision

    def make(kernel: str, blocks: Optional[Blocks] = None, **constexprs) -> KernelConfig:
        tiles = TILES[kernel]
        blocks = blocks or tiles.get(precision, tiles["tf32"])
        sizes = {"BM": blocks.rows}
        if blocks.cols:
            sizes["BN" if kernel in ("expand", "output_grad", "rank_grad") else "BK"] = blocks.cols
        if "ieee" in tiles:
            sizes["DOT"] = precision
        return KernelConfig(kernel, tuple(sorted({**sizes, **constexprs}.items())), blocks.num_warps)

    configs = {
        "shrink_route": make("shrink_route", HC=HC,
                             MG=members_per_program("shrink_route", HC, shape.members, precision), E_PAD=E_PAD),
        "expand": make("expand", EXPAND_EXPERT_CHUNKS if EC == 8 and not shape.hydra else None, EC=EC, RCH=RCH,
                       HYDRA=shape.hydra),
        "output_grad": make("output_grad", EC=EC, RCH=RCH, HYDRA=shape.hydra),
        "input_grad": make("input_grad", HC=HC, MG=members_per_program("input_grad", HC, shape.members, precision),
                           E_PAD=E_PAD),
    }
    if deterministic:
        wide = (EC, RCH, shape.hydra, precision) == (1, 64, False, "tf32")
        configs["rank_grad"] = make("rank_grad", RANK_GRAD_WIDE_CHUNKS if wide else None, EC=EC, RCH=RCH,
                                    HYDRA=shape.hydra)
    if routed:
        configs["route_grad"] = make("route_grad", E_PAD=E_PAD)
    return configs


def accepted(E: int, r: int) -> bool:
    return 1 <= E <= MAX_EXPERTS and 1 <= r <= MAX_RANK and E * r <= MAX_RANK_WIDTH


def configuration_space() -> Iterator[Tuple[KernelConfig, Shape, bool, bool]]:
    """Every (configuration, shape, deterministic, routed) the planner can choose inside the limits: every E and r
    (check_limits' space), Hydra or not, 1..LAUNCH_MEMBERS members in a launch, both dot precisions, deterministic
    or not, routed group or plain LoRA (one member, E = 1). A configuration appears once per call of
    kernel_configs that yields it; callers deduplicate."""
    for E in range(1, MAX_EXPERTS + 1):
        for r in range(1, min(MAX_RANK, MAX_RANK_WIDTH // E) + 1):
            for hydra in ((False, True) if E > 1 else (False,)):
                for members in range(1, LAUNCH_MEMBERS + 1):
                    for precision in PRECISIONS:
                        for deterministic in (False, True):
                            for routed in ((True, False) if (E == 1 and members == 1) else (True,)):
                                shape = Shape(E, r, hydra, members, precision)
                                for config in kernel_configs(shape, deterministic, routed).values():
                                    yield config, shape, deterministic, routed


def check_limits(E: int, r: int, x_dtype: Optional[torch.dtype] = None, d_outs: Tuple[int, ...] = ()) -> None:
    fix = "use backend='torch' (same signature) for this layer"
    if d_outs and max(d_outs) > MAX_OUT_FEATURES:
        raise ValueError(f"triton backend: a member's d_out = {max(d_outs)} exceeds the kernels' limit "
                         f"{MAX_OUT_FEATURES}; {fix}")
    if E > MAX_EXPERTS:
        raise ValueError(f"triton backend: E = {E} experts exceeds the kernels' limit {MAX_EXPERTS}; {fix}")
    if r > MAX_RANK:
        raise ValueError(f"triton backend: rank r = {r} exceeds the kernels' limit {MAX_RANK}; {fix}")
    if E * r > MAX_RANK_WIDTH:
        raise ValueError(f"triton backend: E*r = {E}*{r} = {E * r} exceeds the kernels' limit {MAX_RANK_WIDTH}; {fix}")
    if x_dtype is not None and x_dtype not in KERNEL_DTYPES:
        raise ValueError(f"triton backend: x is {x_dtype}; the kernels take float32, float16 or bfloat16; {fix}")


@dataclass(frozen=True)
class LaunchGroup:
    """Consecutive members [first, first + count) that one launch of each kernel serves: same parameter and output
    dtypes, at most LAUNCH_MEMBERS of them. Group 0 also does the routing."""

    first: int
    count: int
    index: int


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
    seed: int            # a Python seed; with seed_in_memory the kernels load the seed tensor instead
    seed_in_memory: bool
    num_sequences: int
    scaling: float
    deterministic: bool
    precision: str
    groups: Tuple[LaunchGroup, ...]
    rule: RuleArgs = RuleArgs()

    @property
    def M(self) -> int:
        return len(self.d_outs)

    @property
    def HR(self) -> int:
        """Width of one member's rank activations h: r for Hydra, E*r otherwise."""
        return self.r if self.hydra else self.E * self.r

    @property
    def KE(self) -> int:
        """Columns of B: E*r."""
        return self.E * self.r

    @property
    def compact(self) -> bool:
        """Top-k routing with one A per expert: a member's h keeps only each token's k selected experts' blocks,
        in expert order (slot i holds the i-th selected expert), so h, dh and their traffic scale with k, not E."""
        return self.selective and not self.hydra

    @property
    def HS(self) -> int:
        """Columns one member's h (and dh) takes in memory: k*r when compact, else HR."""
        return self.top_k * self.r if self.compact else self.HR

    @property
    def routed(self) -> bool:
        return self.kind != "none"

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
    def selective(self) -> bool:
        """Top-k routing: a token uses only its selected experts, so the kernels skip the others' rank blocks."""
        return self.routed and self.top_k > 0

    @property
    def seed_arg(self) -> int:
        """The low 32 bits of the seed as a signed int32 (so the kernel argument is always an i32; the kernels
        take it back to the unsigned low word, hmora_kernels.dropout.stream_seed's layout)."""
        low = self.seed & 0xFFFFFFFF
        return low - (1 << 32) if low >= 1 << 31 else low

    def shape(self, group: LaunchGroup) -> Shape:
        return Shape(self.E, self.r, self.hydra, group.count, self.precision)

    def configs(self, group: LaunchGroup) -> Dict[str, KernelConfig]:
        return kernel_configs(self.shape(group), self.deterministic, self.routed)

    @property
    def HC(self) -> int:
        return h_chunk(self.HR)

    @property
    def h_chunks(self) -> int:
        return cdiv(self.HR, self.HC)

    @property
    def rank_blocks(self) -> int:
        return cdiv(self.r, operand_chunk(self.E, self.r)[1])

    @property
    def operand_chunks(self) -> int:
        """Chunks of the gate-scaled operand: expert blocks x rank blocks."""
        EC, _ = operand_chunk(self.E, self.r)
        return cdiv(self.E, EC) * self.rank_blocks

    def token_splits(self, column_programs: int, block_rows: int, reduces: bool = True) -> Tuple[int, int]:
        """(splits, tokens per split) of the token axis of a column-parallel kernel: enough programs for ~4 waves
        of a 132-SM GPU, except one split for a reduction over tokens in deterministic mode (plain stores instead
        of fp32 atomic adds into zeroed buffers)."""
        splits = 1
        if not (reduces and self.deterministic):
            splits = max(1, min(cdiv(self.T, block_rows), cdiv(4 * 132, column_programs)))
        per_split = cdiv(cdiv(self.T, splits), block_rows) * block_rows
        return cdiv(self.T, per_split), per_split


def launch_groups(param_dtypes, output_dtypes) -> Tuple[LaunchGroup, ...]:
    """Consecutive runs of members with the same (parameter, output) dtypes, cut into at most LAUNCH_MEMBERS."""
    groups = []
    start = 0
    for m in range(1, len(param_dtypes) + 1):
        same = m < len(param_dtypes) and (param_dtypes[m], output_dtypes[m]) == (param_dtypes[start],
                                                                                 output_dtypes[start])
        if not same or m - start == LAUNCH_MEMBERS:
            groups.append(LaunchGroup(start, m - start, len(groups)))
            start = m
    return tuple(groups)
