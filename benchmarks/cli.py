"""`hmora-bench`: run a suite, print the tables, write CSV/JSON and PNG plots.

    hmora-bench                      # default suite (a few minutes on 2 CPU cores)
    hmora-bench --suite full --out bench-out
On a machine without CUDA the triton kernels run under the Triton interpreter (TRITON_INTERPRET=1 is set
before anything imports them), which is what makes their loads and stores countable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hmora-bench", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="default",
                        help="quick | default | layer-cpu | paper-cpu | scaling-cpu | variants-cpu | dtypes-cpu | "
                             "rank-cpu | rules-cpu | llama-cpu | paper | full (see benchmarks.suites)")
    parser.add_argument("--out", default="bench-out", help="directory for results.csv, results.json and the PNGs")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repetitions per point (the fastest is kept); layer-cpu: interleaved rounds "
                             "(medians are kept)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1: on a shared, loaded machine OpenMP barriers wreck "
                             "timings; layer-cpu: 2, the setting it reproduces)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="layer-cpu: wall time, or this process's CPU time (steadier on a loaded machine with "
                             "--threads 1; with more threads it also counts their spin-waits)")
    parser.add_argument("--l2-mib", type=float, default=40,
                        help="L2 size of the cache model behind the kernels' DRAM bytes (default 40: an A100)")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib PNGs")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for docs/BENCHMARKS.md)")
    parser.add_argument("--from-json", metavar="RESULTS_JSON",
                        help="measure nothing: re-print the tables and redraw the plots of an earlier results.json")
    return parser.parse_args(argv)


def _set_interpreter_unless_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _run_suite(suite: str, repeats: int, l2_mib: float, out: str, threads: Optional[int],
               clock: str = "wall") -> List[dict]:
    """Measure every case; results.csv/json are rewritten after each run so a long suite keeps what it measured."""
    from tqdm import tqdm

    from . import report
    from .decoder_layer import LayerCase
    from .measure import measure
    from .suites import SUITES

    jobs = []
    for case in SUITES[suite]:
        if isinstance(case, LayerCase):  # it times its implementations interleaved: one job for all of them
            jobs.append((case, None))
        else:
            jobs += [(case, impl) for impl in case.implementations]
    rows = []
    for case, impl in tqdm(jobs, desc=f"hmora-bench {suite}", unit="run"):
        if impl is None:
            rows += case.run(repeats, threads, clock)
        else:
            for row in measure(case.workload, impl, memory=case.memory, timing=case.timing, repeats=repeats,
                               l2_bytes=int(l2_mib * 2**20)):
                rows.append({"section": case.section, **row.as_dict()})
        rows = report.derive(rows)
        report.write_csv(rows, os.path.join(out, "results.csv"))
        report.write_json(rows, os.path.join(out, "results.json"), suite, settings={"l2_mib": l2_mib})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    _set_interpreter_unless_cuda()  # before benchmarks.measure imports the kernels
    import torch

    torch.set_num_threads(args.threads or 1)
    from . import report
    from .suites import SUITES

    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            rows = report.derive(json.load(f)["rows"])  # afresh: derived columns newer than the file
    elif args.suite not in SUITES:
        print(f"hmora-bench: --suite expected one of {sorted(SUITES)}, got {args.suite!r}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    written = []
    if not args.from_json:
        rows = _run_suite(args.suite, args.repeats, args.l2_mib, args.out, args.threads, args.clock)
        written += [os.path.join(args.out, name) for name in ("results.csv", "results.json")]
    print(report.tables(rows, markdown=args.markdown))
    if not args.no_plots:
        for plot, name in ((report.plot_scaling, "scaling_vs_tokens.png"), (report.plot_speedup, "speedup_vs_er.png"),
                           (report.plot_rank, "traffic_vs_er.png")):
            path = plot(rows, os.path.join(args.out, name))
            if path:
                written.append(path)
    print("\nwrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
