"""Memory of hmora-train's base model by --torch_dtype: `python -m benchmarks.base_memory [--hidden 1024 --layers 8]`.

Saves a random Qwen2 (fp32 weights on disk, as most checkpoints of this size), then in a fresh process per dtype
loads it the way hmora-train does (`hmora.cli.load_base`), wraps it with the paper-setting adapter and runs one
training step, and reports the base's parameter bytes and the peak of the process's anonymous resident memory
(Linux RssAnon, sampled every millisecond) from the load to the end of the step, and its resident size after the
step (VmRSS), each less what the process held before. On a CPU an fp32 base stays in the memory-mapped safetensors
file (resident, not anonymous), while a bf16 base is converted from it into anonymous memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(model_dir: str, dtype: str) -> dict:
    """In this process: load, wrap, one training step; the numbers of one row."""
    import torch

    from hmora import HMoRAConfig, get_hmora_model
    from hmora.cli import load_base

    torch.set_num_threads(1)
    resident_before, before = _status_mib("VmRSS"), _status_mib("RssAnon")
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _status_mib("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    base = load_base(model_dir, "cpu", dtype)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    model = get_hmora_model(base, HMoRAConfig(num_experts=8, lora_r=8, dropout=0.0))
    ids = torch.randint(0, base.config.vocab_size, (2, 64))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    done.set()
    sampler.join()
    adapter_dtypes = sorted({str(p.dtype) for p in model.adapter_named_parameters().values()})
    return {"dtype": dtype, "base_MiB": base_bytes / 2**20, "peak_MiB": max(peak[0], _status_mib("RssAnon")) - before,
            "resident_MiB": _status_mib("VmRSS") - resident_before,
            "loss": out.loss.item(), "adapter_dtypes": adapter_dtypes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.base_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the random Qwen2 (default 1024)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL_DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with tempfile.TemporaryDirectory() as model_dir:
        config = Qwen2Config(vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                             num_key_value_heads=args.hidden // 128, tie_word_embeddings=False)
        Qwen2ForCausalLM(config).save_pretrained(model_dir)
        rows = []
        for dtype in ("fp32", "bf16"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.base_memory", "--measure", model_dir, dtype],
                                 check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"random Qwen2, hidden {args.hidden}, {args.layers} layers, paper-setting adapter, one step of 2 x 64 tokens")
    print(f"{'dtype':<6} {'base MiB':>9} {'resident after the step':>24} {'anonymous peak':>15} {'loss':>8}  adapters")
    for r in rows:
        print(f"{r['dtype']:<6} {r['base_MiB']:9.1f} {r['resident_MiB']:20.1f} MiB {r['peak_MiB']:11.1f} MiB "
              f"{r['loss']:8.4f}  {', '.join(r['adapter_dtypes'])}")
    fp32, bf16 = rows
    print(f"bf16 / fp32: base {bf16['base_MiB'] / fp32['base_MiB']:.3f}, resident after the step "
          f"{bf16['resident_MiB'] / fp32['resident_MiB']:.3f}, anonymous peak {bf16['peak_MiB'] / fp32['peak_MiB']:.3f}; "
          f"loss difference {abs(bf16['loss'] - fp32['loss']):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
