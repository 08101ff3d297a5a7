"""Ahead-of-time compile report of the Triton kernels: registers, shared memory and spills per kernel and config.

Compiles every kernel of `hmora_kernels.triton_backend` in every configuration the dispatcher can choose
(see `hmora_kernels.triton_backend.aot.SCENARIOS`) to cubin for sm_80 and sm_90, without a GPU, and reads the
figures with cuobjdump. Run: `python -m benchmarks.compile_report` (table) or `--json` (rows for tests).
TRITON_INTERPRET must not be set in this process; the script refuses to run if it is.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_report: unset TRITON_INTERPRET (kernels must be decorated for compilation)", file=sys.stderr)
        return 2
    from hmora_kernels.triton_backend.aot import compile_jobs, run_job, violations

    jobs = compile_jobs()
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        rows = list(pool.map(run_job, jobs))
    for row in rows:
        row["violation"] = violations(row)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'kernel':20s} {'arch':6s} {'warps':>5s} {'tiles':18s} {'REG':>4s} {'SHARED':>7s} {'SPILL':>5s}  "
              f"scenario")
        for row in rows:
            tiles = "x".join(f"{k}{v}" for k, v in row["tiles"].items())
            flag = f"  !! {row['violation']}" if row["violation"] else ""
            print(f"{row['kernel']:20s} {row['arch']:6s} {row['num_warps']:5d} {tiles:18s} {row['reg']:4d} "
                  f"{row['shared']:7d} {row['local'] + row['stack']:5d}  {row['scenario']}{flag}")
        bad = sum(1 for row in rows if row["violation"])
        print(f"{len(rows)} compiled kernels, {bad} over a hardware limit or spilling")
    return 1 if any(row["violation"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
