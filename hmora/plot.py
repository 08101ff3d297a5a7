"""`hmora-plot RUN_DIR`: the loss, learning-rate and routing-entropy curves of a run's metrics.jsonl, as a PNG."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from .train import METRICS_FILE

PLOT_FILE = "metrics.png"


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def read_metrics(run_dir: str) -> List[Dict]:
    """The records of RUN_DIR/metrics.jsonl (training steps and evaluations), in file order."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; pass hmora-plot the --output_dir of an hmora-train run")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from None
    if not any("loss" in r for r in records):
        raise ValueError(f"{path} has no training step yet")
    return records


def _series(records: Sequence[Dict], key: str):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str, output: Optional[str] = None) -> str:
    """Draw the run's curves into `output` (default RUN_DIR/metrics.png); returns the path."""
    if not matplotlib_available():
        raise ValueError("hmora-plot needs matplotlib: pip install 'hmora[plot]'")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    output = output or os.path.join(run_dir, PLOT_FILE)
    fig, (loss_ax, lr_ax, entropy_ax) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    loss_ax.plot(*_series(records, "loss"), label="training loss", linewidth=1)
    loss_ax.plot(*_series(records, "ce"), label="training cross-entropy", linewidth=1, alpha=0.7)
    steps, eval_loss = _series(records, "eval_loss")
    if steps:
        loss_ax.plot(steps, eval_loss, "o-", label="eval loss (answer tokens)")
    loss_ax.set_ylabel("loss (nats)")
    loss_ax.legend()
    lr_ax.plot(*_series(records, "lr"))
    lr_ax.set_ylabel("learning rate")
    entropy_ax.plot(*_series(records, "routing_entropy"))
    entropy_ax.set_ylabel("routing entropy (nats)")
    entropy_ax.set_xlabel("optimizer step")
    for ax in (loss_ax, lr_ax, entropy_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def plot_main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import OneLineParser

    parser = OneLineParser(prog="hmora-plot", description="Draw a run's loss, learning-rate and routing-entropy "
                           "curves (from RUN_DIR/metrics.jsonl) to a PNG.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --output_dir of an hmora-train run")
    parser.add_argument("--output", help=f"the PNG to write (default RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.output))
    except (ValueError, OSError) as err:
        print(f"hmora-plot: error: {err}", file=sys.stderr)
        return 2
    return 0
