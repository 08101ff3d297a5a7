"""Ahead-of-time compile report of the Triton kernels: registers, shared memory and spills per kernel configuration.

Compiles kernels of `hmora_kernels.triton_backend` to cubin for sm_80 and sm_90, without a GPU, exactly as Triton's
JIT would compile them, and reads the figures with cuobjdump. The configurations come from the planner
(`hmora_kernels.triton_backend.aot`): by default one per tier (kernel, block sizes, dot precision, warps), the one
with the most register demand, which is what CI runs; `--all` compiles every configuration and dtype signature the
planner can choose inside the kernels' limits: 559 distinct compiled kernels (135 configurations x the dtype
signatures each admits, deduplicated by the JIT's specialisation key) x 2 targets = 1,118 compiles, 1.3 to 5
CPU-seconds each (the heaviest first): 24 minutes on 2 cores, minutes with Triton's cache warm.
`--rules` compiles the launches of the routing rules (Switch, TopP, RankWise) at the paper setting and SMoRA's: the
same kernels (the rules are run-time arguments), shown by themselves.
Run: `python -m benchmarks.compile_report [--all | --rules] [--json]`.
TRITON_INTERPRET must not be set in this process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor


def _compile(job_and_arch):
    from hmora_kernels.triton_backend.aot import run_job, violations

    job, arch = job_and_arch
    row = run_job(job, arch)
    row["violation"] = violations(row)
    return row


def summary(rows) -> str:
    """Per target: configurations compiled, the most registers per thread, and how many spill or break a limit."""
    per_arch = defaultdict(list)
    for row in rows:
        per_arch[row["arch"]].append(row)
    lines = []
    for arch, arch_rows in sorted(per_arch.items()):
        top = max(arch_rows, key=lambda r: r["reg"])
        spills = sum(1 for r in arch_rows if r["local"] or r["stack"])
        bad = sum(1 for r in arch_rows if r["violation"])
        lines.append(f"{arch}: {len(arch_rows)} configurations, max {top['reg']} registers ({top['kernel']}, "
                     f"{top['config']}), {spills} spilling, {bad} over a hardware limit or spilling")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every configuration the planner can choose (slow)")
    parser.add_argument("--rules", action="store_true",
                        help="the launches of the routing rules (Switch, TopP, RankWise) at the paper setting and "
                             "SMoRA's; kernels of the enumeration, the rules being run-time arguments")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_report: unset TRITON_INTERPRET (kernels must be decorated for compilation)", file=sys.stderr)
        return 2
    from hmora_kernels.triton_backend.aot import (
        ARCHS, all_jobs, launch_jobs, register_pressure, rule_groups, tier_jobs,
    )

    if args.rules:
        jobs = launch_jobs(rule_groups())
    else:  # the heaviest first: a run stopped early has checked the configurations most likely to spill
        jobs = sorted(all_jobs() if args.all else tier_jobs(all_jobs()), key=register_pressure, reverse=True)
    work = [(job, arch) for job in jobs for arch in ARCHS]
    print(f"compile_report: {len(jobs)} kernels x {len(ARCHS)} targets = {len(work)} compiles", file=sys.stderr)
    if not args.json:
        print(f"{'kernel':20s} {'arch':6s} {'warps':>5s} {'REG':>4s} {'SHARED':>7s} {'SPILL':>5s}  constexprs / group")
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for row in pool.map(_compile, work, chunksize=4):
            rows.append(row)
            if not args.json:  # row by row: a run of an hour keeps what it compiled
                flag = f"  !! {row['violation']}" if row["violation"] else ""
                consts = " ".join(f"{k}={v}" for k, v in sorted(row["constexprs"].items()))
                print(f"{row['kernel']:20s} {row['arch']:6s} {row['num_warps']:5d} {row['reg']:4d} {row['shared']:7d} "
                      f"{row['local'] + row['stack']:5d}  {consts} / {row['config']}{flag}", flush=True)
            if len(rows) % 20 == 0 or len(rows) == len(work):
                print(f"compile_report: {len(rows)}/{len(work)} compiled", file=sys.stderr, flush=True)
    print(json.dumps(rows) if args.json else summary(rows))
    return 1 if any(row["violation"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
