"""Tables, CSV/JSON (with machine, versions and date) and PNG plots of measured rows."""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .measure import METRIC_SOURCES

NAIVE = "reference"
LAYER_SECTION = "decoder-layer"
_WORKLOAD_KEYS = ("model", "scope", "tokens", "experts", "rank", "hydra", "routing", "dropout", "dropout_rng", "dtype",
                  "param_dtype", "phase")

DERIVED_SOURCES = {
    "saved_ratio": "saved_bytes / saved_min",
    "saved_vs_naive": "saved_bytes of the naive loop (reference) / saved_bytes",
    "traffic_ratio": "traffic_bytes / traffic_min",
    "traffic_vs_naive": "traffic_bytes of the naive loop (reference) / traffic_bytes",
    "program_ratio": "(kernel_program_bytes + aten_bytes) / traffic_min",
    "unique_ratio": "(kernel_unique_bytes + aten_bytes) / traffic_min",
    "dram_ratio": "(kernel_dram_bytes + aten_bytes) / traffic_min: kernel bytes under the L2 model (LRU, 32-byte "
                  "sectors, --l2-mib) plus the aten operators' bytes, over the minimum",
    "dram_traffic_bytes": "kernel_dram_bytes + aten_bytes: the triton path's traffic under the L2 model",
    "speedup": "cpu_s (or gpu_s) of the naive loop (reference) / this implementation's",
    "added_s": "decoder layer: median over interleaved rounds of (this step - the bare layer's step in the round)",
    "added_vs_standin": "decoder layer: added_s / added_s of the plain-PyTorch stand-in with nn.Dropout",
}


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or not den else num / den


def derive(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Add ratios against the minimum and against the naive loop of the same workload and phase (decoder-layer
    rows come with their own ratios and pass through)."""
    layer_rows = [r for r in rows if r["section"] == LAYER_SECTION]
    rows = [{k: v for k, v in r.items() if k not in DERIVED_SOURCES} for r in rows
            if r["section"] != LAYER_SECTION]  # derive afresh
    naive: Dict[tuple, Dict[str, object]] = {}
    for r in rows:  # the naive loop's memory and time rows of one workload may come from different sections
        if r["implementation"] == NAIVE:
            known = naive.setdefault(tuple(r.get(k) for k in _WORKLOAD_KEYS), {})
            known.update({k: v for k, v in r.items() if v is not None})
    for r in rows:
        ref = naive.get(tuple(r.get(k) for k in _WORKLOAD_KEYS), {})
        time_key = "gpu_s" if r.get("gpu_s") is not None else "cpu_s"
        r["saved_ratio"] = _ratio(r["saved_bytes"], r["saved_min"])
        r["saved_vs_naive"] = _ratio(ref.get("saved_bytes"), r["saved_bytes"])
        r["traffic_ratio"] = _ratio(r["traffic_bytes"], r["traffic_min"])
        r["traffic_vs_naive"] = _ratio(ref.get("traffic_bytes"), r["traffic_bytes"])
        for counted, ratio in (("kernel_program_bytes", "program_ratio"), ("kernel_unique_bytes", "unique_ratio"),
                               ("kernel_dram_bytes", "dram_ratio")):  # results.json files older than a count lack it
            r[ratio] = None if r.get(counted) is None else _ratio(r[counted] + r["aten_bytes"], r["traffic_min"])
        dram = r.get("kernel_dram_bytes")
        r["dram_traffic_bytes"] = None if dram is None else dram + r["aten_bytes"]
        r["speedup"] = _ratio(ref.get(time_key), r[time_key])
    return rows + layer_rows


def machine_info() -> Dict[str, object]:
    import triton

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "triton": triton.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    return info


def write_csv(rows: Sequence[Dict[str, object]], path: str) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))  # sections have columns of their own
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_json(rows: Sequence[Dict[str, object]], path: str, suite: str, settings: Dict[str, object]) -> None:
    """results.json: the suite, the machine, the run's settings (e.g. the L2 model's size), metric sources, rows."""
    payload = {"suite": suite, "machine": machine_info(), "settings": settings,
               "metrics": {**METRIC_SOURCES, **DERIVED_SOURCES}, "rows": list(rows)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)


# ---------------------------------------------------------------- text tables

def _mb(v) -> str:
    return "" if v is None else f"{v / 1e6:.1f}"


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def _ms(v) -> str:
    return "" if v is None else f"{v * 1e3:.1f}"


def _plain(v) -> str:
    return "" if v is None else str(v)


MEMORY_COLUMNS = [
    ("model", "model", _plain), ("scope", "scope", _plain), ("T", "tokens", _plain), ("E", "experts", _plain),
    ("r", "rank", _plain), ("hydra", "hydra", _plain),
    ("routing", "routing", _plain), ("dropout", "dropout", _plain), ("masks", "dropout_rng", _plain),
    ("dtype", "dtype", _plain), ("weights", "param_dtype", _plain),
    ("impl", "implementation", _plain), ("phase", "phase", _plain),
    ("saved MB", "saved_bytes", _mb), ("saved/min", "saved_ratio", _x), ("naive/saved", "saved_vs_naive", _x),
    ("launches", "launches", _plain), ("kernels", "kernel_launches", _plain),
    ("traffic MB", "traffic_bytes", _mb), ("min MB", "traffic_min", _mb), ("traffic/min", "traffic_ratio", _x),
    ("per-program/min", "program_ratio", _x), ("unique/min", "unique_ratio", _x), ("L2-model/min", "dram_ratio", _x),
    ("naive/traffic", "traffic_vs_naive", _x),
    ("note", "note", _plain),
]
TIME_COLUMNS = [
    ("model", "model", _plain), ("T", "tokens", _plain), ("E", "experts", _plain), ("r", "rank", _plain),
    ("hydra", "hydra", _plain), ("routing", "routing", _plain), ("impl", "implementation", _plain),
    ("phase", "phase", _plain), ("cpu ms", "cpu_s", _ms), ("gpu ms", "gpu_s", _ms),
    ("GB/s (min bytes)", "gpu_gbps", lambda v: "" if v is None else f"{v:.0f}"),
    ("speedup vs naive", "speedup", _x), ("note", "note", _plain),
]


LAYER_COLUMNS = [
    ("model", "model", _plain), ("layer", "layer", _plain), ("T", "tokens", _plain), ("threads", "threads", _plain),
    ("clock", "clock", _plain), ("dropout", "dropout", _plain), ("impl", "implementation", _plain), ("masks", "dropout_rng", _plain),
    ("cpu ms (median)", "cpu_s", _ms), ("added ms", "added_s", _ms),
    ("added / stand-in's", "added_vs_standin", lambda v: "" if v is None else f"{v:.2f}"), ("note", "note", _plain),
]


def format_table(rows: Iterable[Dict[str, object]], columns, markdown: bool = False) -> str:
    cells = [[fmt(r.get(key)) for _, key, fmt in columns] for r in rows]
    heads = [h for h, _, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def tables(rows: List[Dict[str, object]], markdown: bool = False) -> str:
    """A table per kind of row: decoder-layer times, memory/traffic/launches, op times."""
    memory = [r for r in rows if r["section"] in ("paper", "scaling", "variants", "rank", "rules", "dtypes")]
    timing = [r for r in rows if r["section"] == "speedup"]
    layer = [r for r in rows if r["section"] == LAYER_SECTION]
    out = []
    if layer:
        out += ["Decoder layer, forward + backward, seconds per step by the clock column (interleaved rounds):",
                format_table(layer, LAYER_COLUMNS, markdown), ""]
    if memory:
        out += ["Memory, traffic and launches (bytes counted, not estimated):", format_table(memory, MEMORY_COLUMNS,
                                                                                            markdown)]
    if timing:
        out += ["", "Wall time:", format_table(timing, TIME_COLUMNS, markdown)]
    return "\n".join(out)


# ---------------------------------------------------------------- plots


def _series(rows, x_key, y_key, **match):
    picked = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get(y_key) is not None]
    picked.sort(key=lambda r: r[x_key])
    return [r[x_key] for r in picked], [r[y_key] for r in picked]


def linear_fit_label(xs: Sequence[float], ys: Sequence[float]) -> str:
    """'a B/token + b, fit within e%': the least-squares line through the points and its worst relative miss."""
    if len(xs) < 2:
        return "one point"
    import numpy as np

    slope, intercept = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    worst = max(abs(y - (slope * x + intercept)) / y for x, y in zip(xs, ys))
    return f"{slope:,.0f} B/token {intercept / 1e6:+.2f} MB, fit within {100 * worst:.1f}%"


_SERIES_NAMES = {("triton", "traffic_bytes"): "triton, as issued", ("triton", "dram_traffic_bytes"): "triton, L2 model"}


def plot_scaling(rows: List[Dict[str, object]], path: str) -> Optional[str]:
    """Saved bytes (forward) and traffic (forward + backward) vs T, per implementation, with the minimum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = [r for r in rows if r["section"] == "scaling"]
    if not scaling:
        return None
    # the scaling rows' workload, also picked up from other sections (the paper point adds T 4096)
    base = {k: scaling[0][k] for k in ("model", "scope", "experts", "rank", "hydra", "routing", "dropout", "dtype")}
    panels = [("saved for backward (forward step)", "saved_bytes", "saved_min", "forward"),
              ("memory traffic (forward + backward)", "traffic_bytes", "traffic_min", "both")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    drawn = False
    for ax, (title, key, min_key, phase) in zip(axes, panels):
        series = [(impl, key) for impl in ("reference", "torch", "triton")]
        if key == "traffic_bytes":  # the fused path's traffic as issued and under the L2 model
            series.append(("triton", "dram_traffic_bytes"))
        for impl, y_key in series:
            xs, ys = _series(rows, "tokens", y_key, implementation=impl, phase=phase, **base)
            if xs:
                name = _SERIES_NAMES.get((impl, y_key), impl)
                ax.plot(xs, [y / 1e6 for y in ys], marker="o", label=f"{name}: {linear_fit_label(xs, ys)}")
                drawn = True
        xs, ys = _series(rows, "tokens", min_key, implementation="torch", phase=phase, **base)
        if xs:
            ax.plot(xs, [y / 1e6 for y in ys], "k--", label="minimum the shapes allow")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("MB")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if xs:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{base['scope']} of {base['model']}, E {base['experts']}, r {base['rank']}, "
                 f"{'Hydra' if base['hydra'] else 'per-expert A'}, {base['routing']}, dropout {base['dropout']}, "
                 f"{base['dtype']} (counted bytes)")
    fig.tight_layout()
    if not drawn:
        plt.close(fig)
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedup(rows: List[Dict[str, object]], path: str) -> Optional[str]:
    """Speedup over the naive loop vs E*r (forward + backward), one line per implementation and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timing = [dict(r, er=r["experts"] * r["rank"]) for r in rows if r["section"] == "speedup" and r["phase"] == "both"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = False
    variants = sorted({(r["implementation"], r["hydra"], r["routing"]) for r in timing if r["implementation"] != NAIVE})
    for impl, hydra, routing in variants:
        picked = sorted((r for r in timing if (r["implementation"], r["hydra"], r["routing"]) == (impl, hydra, routing)
                         and r["speedup"] is not None), key=lambda r: (r["er"], r["experts"]))
        if picked:
            label = f"{impl}, {'Hydra' if hydra else 'per-expert A'}, {routing}"
            # points, not a line: several (E, r) share one E*r
            ax.plot([r["er"] for r in picked], [r["speedup"] for r in picked], "o", alpha=0.8, label=label)
            for r in picked:
                ax.annotate(f"E{r['experts']} r{r['rank']}", (r["er"], r["speedup"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("E * r")
    ax.set_ylabel("speedup over the naive per-expert loop")
    tokens = timing[0]["tokens"]
    ax.set_title(f"forward + backward, Qwen2-1.5B q/k/v group, T {tokens}, dropout 0\n"
                 f"({'GPU time' if timing[0].get('gpu_s') else 'CPU wall time'})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_RANK_SERIES = [("reference", "traffic_ratio", "naive loop"), ("torch", "traffic_ratio", "torch backend"),
                ("triton", "traffic_ratio", "triton, as issued"), ("triton", "dram_ratio", "triton, L2 model")]


def plot_rank(rows: List[Dict[str, object]], path: str) -> Optional[str]:
    """Traffic over the minimum (forward + backward) vs E*r, one panel per (Hydra or not, routing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rank = [dict(r, er=r["experts"] * r["rank"]) for r in rows if r["section"] == "rank" and r["phase"] == "both"]
    variants = sorted({(r["hydra"], r["routing"]) for r in rank}, key=lambda v: (not v[0], v[1]))
    if not variants:
        return None
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 4.2), squeeze=False, sharey=True)
    for ax, (hydra, routing) in zip(axes[0], variants):
        for impl, key, label in _RANK_SERIES:
            picked = sorted((r for r in rank if (r["implementation"], r["hydra"], r["routing"]) == (impl, hydra, routing)
                             and r.get(key) is not None), key=lambda r: (r["er"], r["experts"]))
            if not picked:
                continue
            line, = ax.plot([r["er"] for r in picked if r["experts"] == picked[0]["experts"]],
                            [r[key] for r in picked if r["experts"] == picked[0]["experts"]], marker="o", label=label)
            others = [r for r in picked if r["experts"] != picked[0]["experts"]]  # other E at the same E*r
            ax.plot([r["er"] for r in others], [r[key] for r in others], "s", color=line.get_color())
            for r in others:
                ax.annotate(f"E {r['experts']}", (r["er"], r[key]), fontsize=7, textcoords="offset points",
                            xytext=(4, -3))
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("E * r")
        ax.set_title(f"{'Hydra' if hydra else 'per-expert A'}, {routing}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("traffic / minimum (forward + backward)")
    axes[0][0].legend(fontsize=7)
    r0 = rank[0]
    fig.suptitle(f"{r0['scope']} of {r0['model']}, T {r0['tokens']}, E {r0['experts']} (squares: other E), "
                 f"dropout {r0['dropout']}, {r0['dtype']} (counted bytes)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
