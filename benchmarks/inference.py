"""The tuned model on the device: PyTorch eager (the baseline) against fedge's exports on ONNX Runtime and llama.cpp.

One run, the same prompts everywhere. The demo's adapter (``--adapter``, default: a ``fedge demo`` output's) is
exported with ``fedge export`` (hf, onnx fp32 / int8 / int4, gguf Q8_0); each runtime is then measured in its own
process (``python -m fedge.edge_client.export.runtimes``: first-token latency, decode tokens/s at batch 1 over 64 forced
tokens, median of 5 runs after a warm-up; peak RSS; J/token) and scored by exact match on 200 held-out demo
examples (50 per domain) with the same greedy loop (`fedge.edge_client.export.runtimes.score`).

    python benchmarks/inference.py --adapter /tmp/demo-run/adapter [--examples 200]

Targets (issue "Export the tuned model"): ORT int8 >= 3x the baseline's decode tokens/s, its files <= 35% of the
fp32 export's, exact match within 1 point of the merged PyTorch model. Writes benchmarks/results/inference.json,
inference.png and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import update_readme_section, write_results  # noqa: E402

EXPORTS = {  # runtime name: (format, quantize, PyTorch dtype)
    "torch_fp32": ("hf", "none", "fp32"),
    "torch_bf16": ("hf", "none", "bf16"),
    "ort_fp32": ("onnx", "none", "fp32"),
    "ort_int8": ("onnx", "int8", "fp32"),
    "ort_int4": ("onnx", "int4", "fp32"),
    "llama_cpp_q8_0": ("gguf", "int8", "fp32"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", type=Path, default=Path("/tmp/demo-run/adapter"))
    p.add_argument("--work", type=Path, default=Path("/tmp/fedge-inference-bench"))
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--confirm-examples", type=int, default=400, help="baseline and ORT int8 again on this many")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cache-dir", type=Path, default=None)
    args = p.parse_args()
    from fedge.common.models import default_cache_dir

    cache = args.cache_dir or default_cache_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    examples = _heldout(args.examples)
    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    runtimes, exports = {}, {}
    for name, (fmt, quantize, dtype) in EXPORTS.items():
        if name.startswith("llama_cpp") and not have_llama_cpp:
            runtimes[name] = {"skipped": "llama-cpp-python is not installed"}
            continue
        key = f"{fmt}-{quantize}"
        if key not in exports:
            print(f"export {key}", flush=True)
            exports[key] = _export(args.adapter, fmt, quantize, args.work / key, cache)
        out, manifest = exports[key]
        print(f"measure {name}", flush=True)
        row = _bench(out, dtype, cache, args.new_tokens, args.reps)
        row["exact_match"], row["score_seconds"] = _score(out, dtype, cache, examples)
        row["file_mb"] = round(_weights_bytes(out, fmt) / 1e6, 1)
        row["parity"] = manifest["parity"]
        runtimes[name] = row
        print(f"  {json.dumps({k: row.get(k) for k in ('decode_tokens_per_s', 'first_token_ms', 'exact_match')})}")
    if args.confirm_examples:  # 200 greedy answers of an undertrained adapter flip by a few: the target pair again
        wide = _heldout(args.confirm_examples)
        for name in ("torch_fp32", "ort_int8"):
            key = "-".join(EXPORTS[name][:2])
            runtimes[name]["exact_match_confirm"], _ = _score(args.work / key, EXPORTS[name][2], cache, wide)
    base = runtimes["torch_fp32"]
    for row in runtimes.values():
        if "decode_tokens_per_s" in row:
            row["speedup_vs_torch_fp32"] = round(row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
            row["file_vs_fp32"] = round(row["file_mb"] / runtimes["ort_fp32"]["file_mb"], 3)
    results = {
        "runtimes": runtimes,
        "setup": {
            "adapter": str(args.adapter),
            "examples": len(examples),
            "confirm_examples": args.confirm_examples,
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        },  # fmt: skip
    }
    path = write_results("inference", results)
    _plot(runtimes, ROOT / "benchmarks" / "results" / "inference.png")
    update_readme_section("inference", _table(results))
    print(f"wrote {path}")


def _heldout(n: int) -> list:
    from fedge.edge_client.training import demo_data
    from fedge.edge_client.training.data import load_examples

    per = -(-n // len(demo_data.DOMAINS))
    return [ex for d in demo_data.DOMAINS for ex in load_examples(f"demo:{d}:test")[:per]][:n]


def _export(adapter: Path, fmt: str, quantize: str, out: Path, cache: Path) -> tuple[Path, dict]:
    cmd = [sys.executable, "-m", "fedge", "--cache-dir", str(cache), "export", "--adapter", str(adapter), "--format",
           fmt, "--quantize", quantize, "--out", str(out), "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"export {fmt}/{quantize} failed: {done.stderr[-2000:]}")
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def _bench(model: Path, dtype: str, cache: Path, new_tokens: int, reps: int) -> dict:
    cmd = [sys.executable, "-m", "fedge.edge_client.export.runtimes", str(model), "--dtype", dtype, "--new-tokens",
           str(new_tokens), "--reps", str(reps), "--cache-dir", str(cache)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if "error" in row:
        raise SystemExit(f"{model}: {row['error']}")
    return row


def _score(model: Path, dtype: str, cache: Path, examples: list) -> tuple[float, float]:
    from fedge.edge_client.export.runtimes import open_runtime, score

    t0 = time.perf_counter()
    em = score(open_runtime(model, cache, dtype), examples)
    return round(100 * em, 1), round(time.perf_counter() - t0, 1)


def _weights_bytes(out: Path, fmt: str) -> int:
    """The model's weight files (not the tokenizer and configs every format carries alike)."""
    names = {"hf": ("model.safetensors",), "onnx": ("model.onnx", "model.onnx.data")}.get(fmt)
    return sum(p.stat().st_size for p in out.iterdir() if (p.name in names if names else p.suffix == ".gguf"))


def _plot(runtimes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: v for k, v in runtimes.items() if "decode_tokens_per_s" in v}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("decode_tokens_per_s", "file_mb", "exact_match"),
                              ("decode tokens/s (batch 1)", "weights MB", "exact match % (200 held-out)")):  # fmt: skip
        ax.bar(list(rows), [rows[k][key] for k in rows], color=["#888" if k == "torch_fp32" else "#3a7" for k in rows])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _table(r: dict) -> str:
    s = r["setup"]
    rows = [
        f"### Inference on the tuned demo adapter ({s['cores']} cores, {s['date']})",
        "",
        f"Batch 1, {s['new_tokens']} decoded tokens, median of {s['reps']} runs; exact match on {s['examples']} "
        "held-out demo examples by the same greedy loop. Baseline: PyTorch eager fp32 on the merged model.",
        "",
        "| runtime | decode tok/s | x baseline | first token ms | peak RSS MB | weights MB | vs fp32 file | "
        "exact match % | parity (top-1, greedy of 4) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in r["runtimes"].items():
        if "skipped" in v:
            rows.append(f"| {name} | skipped: {v['skipped']} | | | | | | | |")
            continue
        p = v["parity"]
        rows.append(
            f"| {name} | {v['decode_tokens_per_s']:.1f} | {v['speedup_vs_torch_fp32']:.2f} | {v['first_token_ms']:.0f}"
            f" | {v['peak_rss_mb']:.0f} | {v['file_mb']:.0f} | {v['file_vs_fp32']:.0%} | {v['exact_match']:.1f} | "
            f"{p['top1_agree']}/{p['prompts']}, {p['greedy_same']}/{p['prompts']} |"
        )
    if s.get("confirm_examples"):
        b, q = r["runtimes"]["torch_fp32"], r["runtimes"]["ort_int8"]
        rows += ["", f"Exact match on all {s['confirm_examples']} held-out examples: torch_fp32 "
                 f"{b['exact_match_confirm']:.1f}%, ort_int8 {q['exact_match_confirm']:.1f}%."]  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    main()
