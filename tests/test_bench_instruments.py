"""The benchmark's measuring instruments, checked on operations whose bytes are known by hand."""
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import hmora_kernels as hk
from benchmarks import cli, suites
from benchmarks.decoder_layer import LayerCase, LayerSetting, LayerShape
from benchmarks.instruments import KernelTraffic, L2Model, OpTraffic, SavedBytes, cpu_wall_time, tensor_bytes
from benchmarks.suites import Case
from benchmarks.workloads import (
    PAPER, ModelShape, Setting, Workload, build_problem, minimum_saved_bytes, minimum_traffic_bytes,
)

F32 = 4
SECTOR = 32  # bytes of an L2 sector


# ---------------------------------------------------------------- saved-for-backward bytes


def test_saved_bytes_counts_each_saved_storage_once():
    a = torch.randn(10, 7, requires_grad=True)
    b = torch.randn(10, 7, requires_grad=True)
    with SavedBytes() as saved:
        (a * b).sum()  # mul saves both operands
    assert (saved.count, saved.bytes) == (2, 2 * 70 * F32)
    with SavedBytes() as saved:
        (a * a).sum()  # the same storage saved twice is held once
    assert (saved.count, saved.bytes) == (1, 70 * F32)


def test_saved_bytes_excludes_weights_and_counts_views_by_storage():
    x = torch.randn(6, 5, requires_grad=True)
    W = torch.randn(3, 5, requires_grad=True)
    with SavedBytes(exclude=[W]) as saved:
        (x @ W.T).sum()  # mm saves x and W^T (a view of W's storage, excluded)
    assert saved.bytes == 30 * F32
    with SavedBytes() as saved:
        torch.exp(x[:2]).sum()  # exp saves its output: a fresh (2, 5) storage
    assert saved.bytes == 10 * F32


# ---------------------------------------------------------------- operator traffic


def test_op_traffic_of_a_matmul_is_its_operands_and_result():
    a, b = torch.randn(6, 4), torch.randn(4, 3)
    with OpTraffic() as ops:
        a @ b
    assert (ops.ops, ops.bytes) == (1, (24 + 12 + 18) * F32)


def test_op_traffic_skips_views_and_counts_broadcast_operands_once():
    a = torch.randn(8, 5)
    row = torch.randn(5)
    with OpTraffic() as ops:
        a.t().reshape(40)  # a view, then a copy (a transpose cannot be flattened in place)
    assert (ops.ops, ops.bytes) == (1, 2 * 40 * F32)
    assert tensor_bytes(row.expand(8, 5)) == 5 * F32


@torch.library.custom_op("hmora_bench_test::doubled", mutates_args=())
def _doubled(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    y.copy_(x)
    return y.mul_(2)


def test_op_traffic_counts_the_operators_inside_a_custom_op_not_the_op_itself():
    x = torch.randn(10)
    with OpTraffic() as ops:
        _doubled(x)
    # inputs + outputs by definition: copy_(y, x) -> y is 3 tensors, mul_(y, 2) -> y is 2 (a read-modify-write)
    assert ops.per_op == {"copy_": 3 * 10 * F32, "mul_": 2 * 10 * F32}


# ---------------------------------------------------------------- kernel traffic under the interpreter


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=keep), mask=keep)


@triton.jit
def _reread_add_kernel(x, w, y, n, BLOCK: tl.constexpr):
    # every program reads the whole of w (BLOCK elements) and atomically adds its x block into y
    offs = tl.arange(0, BLOCK)
    block = tl.program_id(0) * BLOCK + offs
    keep = block < n
    tl.atomic_add(y + offs, tl.load(x + block, mask=keep, other=0.0) + tl.load(w + offs), mask=offs < BLOCK)


@triton.jit
def _broadcast_kernel(w, y, BLOCK: tl.constexpr):
    # every program loads the 4 values of w BLOCK / 4 times each (a broadcast done with pointers)
    offs = tl.arange(0, BLOCK)
    tl.store(y + tl.program_id(0) * BLOCK + offs, tl.load(w + offs % 4))


def test_kernel_traffic_counts_repeats_inside_a_program_once_per_program():
    programs, block = 3, 32
    w, y = torch.randn(4), torch.empty(programs * block)
    with KernelTraffic() as kt:
        _broadcast_kernel[(programs,)](w, y, BLOCK=block)
    torch.testing.assert_close(y, w.repeat(programs * block // 4))
    (launch,) = kt.launches
    assert (launch.loaded, launch.program_loaded, launch.unique_loaded) == (
        programs * block * F32, programs * 4 * F32, 4 * F32)
    assert launch.stored == launch.program_stored == launch.unique_stored == programs * block * F32


@pytest.mark.parametrize("n", [1000, 1024])  # a masked tail, and an exact multiple of the block
def test_kernel_traffic_counts_unmasked_elements_of_a_copy(n):
    src, dst = torch.randn(n), torch.empty(n)
    with KernelTraffic() as kt:
        _copy_kernel[(triton.cdiv(n, 128),)](src, dst, n, BLOCK=128)
    assert torch.equal(src, dst)
    (launch,) = kt.launches
    assert (launch.kernel, launch.programs) == ("_copy_kernel", triton.cdiv(n, 128))
    assert (launch.loaded, launch.stored, launch.unique_loaded, launch.unique_stored) == (n * F32,) * 4
    assert (launch.program_loaded, launch.program_stored) == (n * F32,) * 2


def test_kernel_traffic_counts_rereads_as_issued_not_unique_and_atomics_both_ways():
    n, block, programs = 256, 64, 4
    x, w, y = torch.randn(n), torch.randn(block), torch.zeros(block)
    ops = OpTraffic()
    with ops, KernelTraffic(ops) as kt:
        _reread_add_kernel[(programs,)](x, w, y, n, BLOCK=block)
    torch.testing.assert_close(y, x.view(programs, block).sum(0) + programs * w)
    (launch,) = kt.launches
    atomic = programs * block * F32  # one read and one write of y per program
    assert launch.loaded == n * F32 + programs * block * F32 + atomic
    assert launch.unique_loaded == n * F32 + block * F32 + block * F32
    assert launch.program_loaded == launch.loaded  # no address repeats inside one program
    assert (launch.stored, launch.unique_stored) == (atomic, block * F32)
    assert ops.ops == 0  # the interpreter's argument copies are not the program's operators


# ---------------------------------------------------------------- DRAM bytes under the L2 model


def _sector_aligned(*tensors):
    # the hand counts below assume each tensor starts a sector (torch's CPU allocator aligns to 64 bytes)
    assert all(t.data_ptr() % SECTOR == 0 for t in tensors)


def test_l2_model_refreshes_hits_allocates_stores_and_writes_dirty_sectors_back():
    l2 = L2Model(capacity=2 * SECTOR)
    nothing = np.empty(0, dtype=np.uint64)
    sector = [np.array([i * SECTOR], dtype=np.uint64) for i in range(5)]
    l2.run_program(nothing, sector[0])  # store: allocated dirty, nothing read   -> [0*]
    l2.run_program(sector[1], nothing)  # miss: read                              -> [0*, 1]
    l2.run_program(sector[0], nothing)  # hit on the stored sector: refreshed     -> [1, 0*]
    l2.run_program(sector[2], nothing)  # miss: evicts 1, the LRU, clean          -> [0*, 2]
    assert (l2.dram_loaded, l2.dram_stored) == (2 * SECTOR, 0)
    l2.run_program(sector[3], nothing)  # miss: evicts 0, dirty: written back     -> [2, 3]
    assert (l2.dram_loaded, l2.dram_stored) == (3 * SECTOR, SECTOR)
    l2.run_program(sector[4], sector[4])  # loaded and stored in one program: a read now, a write at the end
    l2.flush()
    assert (l2.dram_loaded, l2.dram_stored) == (4 * SECTOR, 2 * SECTOR)


@pytest.mark.parametrize("n, block", [(1024, 128), (64, 4)])  # sector-sized blocks, and 2 programs per sector
def test_l2_model_reads_and_writes_each_sector_of_a_copy_once(n, block):
    src, dst = torch.randn(n), torch.empty(n)
    _sector_aligned(src, dst)
    with KernelTraffic() as kt:
        _copy_kernel[(n // block,)](src, dst, n, BLOCK=block)
    (launch,) = kt.launches
    # n fp32 = n * 4 / 32 whole sectors, each read once and, stored by one or two programs, written back once
    assert (launch.dram_loaded, launch.dram_stored, launch.dram_traffic) == (n * F32, n * F32, 2 * n * F32)


def test_l2_model_counts_a_masked_partial_sector_whole():
    n = 1001  # 4004 bytes: 125 whole sectors and 4 bytes of a 126th
    src, dst = torch.randn(n), torch.empty(n)
    _sector_aligned(src, dst)
    with KernelTraffic() as kt:
        _copy_kernel[(triton.cdiv(n, 128),)](src, dst, n, BLOCK=128)
    (launch,) = kt.launches
    assert (launch.loaded, launch.stored) == (n * F32, n * F32)
    assert (launch.dram_loaded, launch.dram_stored) == (126 * SECTOR, 126 * SECTOR)


def test_l2_model_reads_a_weight_every_program_rereads_once_and_writes_atomics_back_once():
    n, block, programs = 256, 64, 4
    x, w, y = torch.randn(n), torch.randn(block), torch.zeros(block)
    _sector_aligned(x, w, y)
    with KernelTraffic() as kt:
        _reread_add_kernel[(programs,)](x, w, y, n, BLOCK=block)
    (launch,) = kt.launches
    # x streamed once, w read by the first program and hit by the other three; y atomically added by all four:
    # read by the first, then resident and dirty, written back once when the launch ends
    assert launch.dram_loaded == n * F32 + block * F32 + block * F32
    assert launch.dram_stored == block * F32
    assert launch.program_loaded == n * F32 + programs * 2 * block * F32  # what per-program counting says


@triton.jit
def _weight_then_stream_kernel(x, w, y, W: tl.constexpr, BLOCK: tl.constexpr):
    # every program reads all of w and its own block of x, and writes its block of y = x + sum(w)
    block = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = tl.sum(tl.load(w + tl.arange(0, W)), axis=0)
    tl.store(y + block, tl.load(x + block) + total)


@pytest.mark.parametrize("l2_bytes, weight_reads", [
    (40 * 2**20, 1),  # the A100's L2: w stays resident
    (24 * SECTOR, 1),  # exactly one program's w + x block + y block: LRU keeps w, the refreshed one, in every program
    (4 * SECTOR, 4),  # smaller than w, and each program's x and y blocks stream past: w is evicted every program
])
def test_l2_model_evicts_a_reread_weight_only_when_the_cache_cannot_hold_it(l2_bytes, weight_reads):
    W = BLOCK = 64  # 8 sectors each of w, of an x block and of a y block
    programs = 4
    x, w, y = torch.randn(programs * BLOCK), torch.randn(W), torch.empty(programs * BLOCK)
    _sector_aligned(x, w, y)
    with KernelTraffic(l2_bytes=l2_bytes) as kt:
        _weight_then_stream_kernel[(programs,)](x, w, y, W=W, BLOCK=BLOCK)
    torch.testing.assert_close(y, x + w.sum())
    (launch,) = kt.launches
    assert launch.dram_loaded == weight_reads * W * F32 + programs * BLOCK * F32
    assert launch.dram_stored == programs * BLOCK * F32  # each y sector written back once, evicted or flushed


# ---------------------------------------------------------------- minimum bytes, by hand

TINY = ModelShape("tiny", hidden=8, intermediate=16, kv_out=4)
TINY_SETTING = Setting(num_experts=2, rank=2, hydra=True, top_k=2, dropout_p=0.0)


def test_minimum_saved_bytes_of_a_group_by_hand():
    w = Workload(TINY, TINY_SETTING, tokens=4, scope="group")
    x, hs, gates = 4 * 8 * F32, 3 * 4 * 2 * F32, 4 * 2 * F32
    assert minimum_saved_bytes(w) == x + hs + gates


def test_minimum_traffic_of_a_group_by_hand():
    w = Workload(TINY, TINY_SETTING, tokens=4, scope="group")
    T, d, outs, E, r = 4, 8, (8, 4, 4), 2, 2
    x, ys, hs = T * d * F32, T * sum(outs) * F32, 3 * T * r * F32
    weights = (E * (d + 1) + 3 * r * d + sum(outs) * E * r) * F32
    routing = T * E * F32
    assert minimum_traffic_bytes(w, "forward") == x + weights + 2 * ys + hs + 3 * routing
    assert minimum_traffic_bytes(w, "backward") == ys + x + hs + routing + weights + x + weights
    assert minimum_traffic_bytes(w, "both") == sum(minimum_traffic_bytes(w, p) for p in ("forward", "backward"))


def test_minimum_of_per_expert_top_k_keeps_the_selected_experts_rank_blocks():
    """One A per expert under top-1 of 4: backward needs h of the selected expert only, (T, r) per member, while A
    still has E*r rows."""
    w = Workload(TINY, Setting(num_experts=4, rank=2, hydra=False, top_k=1, dropout_p=0.0), tokens=4, scope="group")
    T, d, outs, E, r = 4, 8, (8, 4, 4), 4, 2
    x, ys, hs = T * d * F32, T * sum(outs) * F32, 3 * T * 1 * r * F32
    weights = (E * (d + 1) + 3 * E * r * d + sum(outs) * E * r) * F32
    routing = T * E * F32
    assert minimum_saved_bytes(w) == x + hs + routing
    assert minimum_traffic_bytes(w, "forward") == x + weights + 2 * ys + hs + 3 * routing


@pytest.mark.parametrize("rule, experts, rank, width", [
    (hk.Switch(2), 4, 2, 2),    # top-1: the chosen expert's block
    (hk.TopP(), 4, 2, 8),       # a varying number of experts: every block counted
    (hk.RankWise(3), 8, 1, 3),  # 8 rank-1 experts, top-3
], ids=lambda v: type(v).__name__ if not isinstance(v, int) else str(v))
def test_minimum_under_a_routing_rule_keeps_the_rank_blocks_it_selects(rule, experts, rank, width):
    setting = Setting(num_experts=experts, rank=rank, hydra=False, top_k=None, dropout_p=0.0, rule=rule)
    w = Workload(TINY, setting, tokens=4, scope="group")
    assert minimum_saved_bytes(w) == 4 * 8 * F32 + 3 * 4 * width * F32 + 4 * experts * F32


def test_hmora_bench_rows_of_the_routing_rules(tmp_path, monkeypatch, capsys, keep_torch_threads):
    """Each rule's group through every implementation (the fused kernels in the interpreter), bytes and time."""
    settings = [Setting(num_experts=4, rank=2, hydra=False, top_k=None, dropout_p=0.0, rule=rule)
                for rule in (hk.Switch(2), hk.TopP())]
    settings.append(Setting(num_experts=8, rank=1, hydra=False, top_k=None, dropout_p=0.0, rule=hk.RankWise(2)))
    cases = [Case("rules", Workload(TINY, s, tokens=16, scope="group"), ("reference", "torch", "triton"), memory=True,
                  timing=False) for s in settings]
    cases.append(Case("speedup", Workload(TINY, settings[0], tokens=16, scope="group"), ("torch",), memory=False,
                      timing=True))
    monkeypatch.setitem(suites.SUITES, "tiny-rules", cases)
    assert cli.main(["--suite", "tiny-rules", "--out", str(tmp_path), "--repeats", "1", "--markdown"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["routing"] for r in rows} == {"switch C=2", "top-p 0.75", "rank-wise top-2"}
    assert len(rows) == 3 * (3 * 3 + 1)  # forward, backward, both
    printed = capsys.readouterr().out
    assert printed.count("| switch C=2 |") == 3 * 3 + 3  # memory rows of three implementations, and the time rows


def test_minimum_of_a_layer_adds_its_four_adapter_ops():
    layer = Workload(TINY, TINY_SETTING, tokens=4, scope="layer")
    group = Workload(TINY, TINY_SETTING, tokens=4, scope="group")
    T = 4
    o = T * 8 * F32 + T * 2 * F32  # x and h of the o LoRA
    gate_up = T * 8 * F32 + 2 * T * 2 * F32 + T * 2 * F32
    down = T * 16 * F32 + T * 2 * F32
    assert minimum_saved_bytes(layer) == minimum_saved_bytes(group) + o + gate_up + down


# ---------------------------------------------------------------- time and the command


def test_cpu_wall_time_runs_setup_untimed_before_every_run():
    calls = []
    cpu_wall_time(lambda: calls.append("run"), repeats=2, warmup=1, setup=lambda: calls.append("setup"))
    assert calls == ["setup", "run"] * 3


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()  # hmora-bench sets its own thread count: give the other tests theirs back
    yield
    torch.set_num_threads(threads)


def test_hmora_bench_writes_table_csv_json_and_plots(tmp_path, monkeypatch, capsys, keep_torch_threads):
    tiny = Workload(TINY, PAPER, tokens=16, scope="layer")
    cases = [Case("paper", tiny, ("reference", "torch", "triton"), memory=True, timing=False),
             Case("scaling", tiny.with_tokens(32), ("reference", "torch"), memory=True, timing=False),
             Case("speedup", tiny, ("reference", "torch"), memory=False, timing=True)]
    monkeypatch.setitem(suites.SUITES, "tiny", cases)
    assert cli.main(["--suite", "tiny", "--out", str(tmp_path), "--repeats", "1"]) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["machine"]["torch"] == torch.__version__ and payload["machine"]["date_utc"]
    assert payload["settings"] == {"l2_mib": 40}
    rows = payload["rows"]
    assert len(rows) == 3 * (3 + 2 + 2)  # forward, backward, both per implementation per case
    reference = [r for r in rows if r["implementation"] == "reference" and r["section"] == "paper"]
    assert all(r["traffic_vs_naive"] == 1.0 for r in reference)
    assert (tmp_path / "results.csv").read_text().startswith("section,model")
    assert {"scaling_vs_tokens.png", "speedup_vs_er.png"} <= set(os.listdir(tmp_path))
    assert "Memory, traffic and launches" in capsys.readouterr().out
    # re-rendering a results.json measures nothing and prints the same rows as Markdown
    assert cli.main(["--from-json", str(tmp_path / "results.json"), "--out", str(tmp_path / "again"),
                     "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| tiny | layer | 16 |") == 9 and (tmp_path / "again" / "scaling_vs_tokens.png").exists()
    l2_model_cells = _column(printed, "L2-model/min", "triton")
    assert len(l2_model_cells) == 3 and all(l2_model_cells) and not any(_column(printed, "L2-model/min", "torch"))
    # a results.json written before the L2 model existed still renders, with that column blank
    for row in payload["rows"]:
        del row["kernel_dram_bytes"], row["dram_ratio"]
    (tmp_path / "old.json").write_text(json.dumps(payload))
    assert cli.main(["--from-json", str(tmp_path / "old.json"), "--out", str(tmp_path / "old"), "--markdown",
                     "--no-plots"]) == 0
    old_cells = _column(capsys.readouterr().out, "L2-model/min", "triton")
    assert len(old_cells) == 3 and not any(old_cells)


def _column(markdown: str, head: str, implementation: str):
    """The cells under `head` of the Markdown table rows of one implementation."""
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
             if line.startswith("| ")]
    heads = next(cells for cells in lines if head in cells)
    return [cells[heads.index(head)] for cells in lines if cells[heads.index("impl")] == implementation]


def test_hmora_bench_times_a_decoder_layer_beside_the_stand_in(tmp_path, monkeypatch, capsys, keep_torch_threads):
    """The layer-cpu machinery on a tiny Qwen2 layer: one row per implementation, added times against the bare
    layer's and as a ratio to the stand-in's (1 for the stand-in itself)."""
    tiny = LayerShape("tiny", hidden=32, intermediate=48, heads=4, kv_heads=2)
    case = LayerCase(LayerSetting(shape=tiny, seq_len=16, num_experts=4, rank=2), ("bare", "stand-in", "hmora"),
                     threads=1)
    monkeypatch.setitem(suites.SUITES, "tiny-layer", [case])
    assert cli.main(["--suite", "tiny-layer", "--out", str(tmp_path), "--repeats", "2", "--no-plots"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["implementation"] for r in rows] == ["bare", "stand-in", "hmora"]
    by_impl = {r["implementation"]: r for r in rows}
    assert by_impl["bare"]["added_s"] == 0 and by_impl["stand-in"]["added_vs_standin"] == 1
    assert len(by_impl["hmora"]["cpu_s_rounds"]) == 2 and by_impl["hmora"]["threads"] == 1
    assert by_impl["hmora"]["dropout_rng"] == "native" and by_impl["stand-in"]["dropout_rng"] == "nn.Dropout"
    assert "Decoder layer, forward + backward" in capsys.readouterr().out


def test_hmora_bench_help_names_every_suite(capsys):
    """The --suite help is written out by hand (the suites import the kernels, which must wait for the interpreter
    switch); it must not fall behind benchmarks.suites."""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    listed = help_text.rsplit("--suite SUITE", 1)[1].split("(see benchmarks.suites)", 1)[0]
    assert {name.strip() for name in listed.split("|")} == set(suites.SUITES)


def test_minimum_counts_fp32_weights_beside_16_bit_activations():
    """hmora's models keep adapters and routers in fp32 under a bf16 model: the minimum reads them (and writes
    their gradients) at 4 bytes, the activations at 2."""
    bf16 = Setting(num_experts=4, rank=2, hydra=False, top_k=2, dropout_p=0.0, dtype=torch.bfloat16)
    pure, mixed = (Workload(TINY, s, tokens=4, scope="group") for s in (bf16, replace(bf16, param_dtype=torch.float32)))
    extra = pure.adapters()[0].weight_elements(bf16) * 2  # 2 more bytes a weight element
    assert minimum_traffic_bytes(mixed, "forward") - minimum_traffic_bytes(pure, "forward") == extra
    assert minimum_traffic_bytes(mixed, "backward") - minimum_traffic_bytes(pure, "backward") == 2 * extra
    assert minimum_saved_bytes(mixed) == minimum_saved_bytes(pure)  # weights are not saved activations
    problem = build_problem(mixed)
    assert {t.dtype for t in problem.weights} == {torch.float32}
    assert problem.inputs["qkv"]["x"].dtype == torch.bfloat16
