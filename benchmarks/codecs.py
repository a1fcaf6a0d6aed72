"""Update codecs: payload size, error and speed of every codec against fp32 (``none``) on a LoRA-B delta.

The delta is real by default: SmolLM2-135M (LoRA r=16 on all 7 projections, A frozen as fedge ships it), one round
of 10 steps on the healthcare demo domain, then the next round's 10 steps on finance; the delta is the second
round's change of B (what a client uploads in round 2). It is made once and kept in the cache
(``<cache>/bench/codecs-update.npz``); ``--synthetic`` uses Gaussian deltas of the same shapes instead. Both
are measured when the real one is available.

    python benchmarks/codecs.py [--cache-dir DIR] [--synthetic] [--repeats 5]

Per codec: bytes / fp32 bytes of the same tensors (and of the whole adapter with A), one-shot relative L2 error,
the error of the summed uploads after 10 rounds of the same delta with error feedback, and the median encode and
decode times. Writes benchmarks/results/codecs.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import update_readme_section, write_results  # noqa: E402
from fedge.quantization.codecs import LADDER, decode, encode  # noqa: E402
from fedge.quantization.updates import ErrorFeedback, measure  # noqa: E402

EXTRA = ("int4:32", "topk:0.25+int8", "topk:0.1+int4", "topk:0.5+int2")  # compositions off the ladder
FULL_BYTES = "meta:full-adapter-bytes"  # stored with the real delta: fp32 bytes of the whole adapter (A and B)
EF_ROUNDS = 10


def make_real_delta(cache: Path, path: Path) -> None:
    """Train two 10-step rounds (healthcare, then finance) and save the second round's change of the adapter."""
    from fedge.common import wire
    from fedge.common.modeling import ModelHolder, get_adapter, set_adapter
    from fedge.edge_client.federation.local_work import open_adapter, train_config
    from fedge.edge_client.training.data import load_examples
    from fedge.edge_client.training.session import epoch_maker
    from fedge.edge_client.training.train import train
    from fedge.quantization.updates import make_delta

    settings = wire.RoundSettings(steps=10, batch=8)
    session, model = open_adapter(ModelHolder(cache), settings)
    global_arrays = get_adapter(model)
    full = sum(a.nbytes for a in global_arrays.values())
    for rnd, domain in ((1, "healthcare"), (2, "finance")):
        set_adapter(model, global_arrays)
        cfg = train_config(settings, rnd)
        cfg.checkpoint_every = 0
        train(model, epoch_maker(session.tokenizer, load_examples(f"demo:{domain}"), cfg), cfg, session.device)
        trained = get_adapter(model)
        if rnd == 1:
            global_arrays = trained
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **make_delta(trained, global_arrays), **{FULL_BYTES: np.array(full)})


def synthetic_like(shapes: dict[str, tuple[int, ...]], stds: dict[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    """Gaussian deltas of the given shapes and per-tensor standard deviations."""
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * stds[k]).astype(np.float32) for k, s in shapes.items()}


def smollm2_shapes() -> dict[str, tuple[int, int]]:
    """LoRA-B shapes (out, r=16) of SmolLM2-135M's 7 projections in 30 layers, for a synthetic-only run."""
    outs = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "o_proj": 576, "gate_proj": 1536, "up_proj": 1536,
            "down_proj": 576}  # fmt: skip
    part = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return {f"base_model.model.model.layers.{i}.{part.get(p, 'mlp')}.{p}.lora_B.weight": (o, 16)
            for i in range(30) for p, o in outs.items()}  # fmt: skip


def timed_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def feedback_error(delta: dict[str, np.ndarray], spec: str) -> float:
    """Relative error of the sum of EF_ROUNDS decoded uploads of the same delta, with error feedback."""
    ef, total = ErrorFeedback(spec), {k: np.zeros_like(v) for k, v in delta.items()}
    for _ in range(EF_ROUNDS):
        for k, v in decode(ef.encode(delta)).items():
            total[k] += v
    num = sum(float(np.sum((total[k] - EF_ROUNDS * v.astype(np.float64)) ** 2)) for k, v in delta.items())
    return float(np.sqrt(num / sum(float(np.sum((EF_ROUNDS * v.astype(np.float64)) ** 2)) for v in delta.values())))


def run(delta: dict[str, np.ndarray], full_bytes: int, repeats: int) -> list[dict]:
    rows = []
    for spec in dict.fromkeys(["none", *LADDER, *EXTRA]):
        (m,) = measure(delta, [spec])
        enc = encode(delta, spec)
        rows.append({
            "codec": spec,
            "bytes": m.encoded_bytes,
            "ratio_vs_fp32": m.ratio,
            "ratio_vs_full_adapter": m.encoded_bytes / full_bytes,
            "rel_error": m.rel_error,
            "ef_rel_error_10_rounds": feedback_error(delta, spec),
            "encode_ms": timed_ms(lambda spec=spec: encode(delta, spec), repeats),
            "decode_ms": timed_ms(lambda enc=enc: decode(enc), repeats),
        })  # fmt: skip
        print(f"{spec:16s} ratio {m.ratio:.4f} error {m.rel_error:.4f} EF {rows[-1]['ef_rel_error_10_rounds']:.4f} "
              f"enc {rows[-1]['encode_ms']:.1f} ms dec {rows[-1]['decode_ms']:.1f} ms", flush=True)  # fmt: skip
    return rows


def table(title: str, rows: list[dict], full: bool) -> str:
    head = "| codec | bytes (MB) | / fp32 |" + (" / full adapter |" if full else "")
    head += " rel. L2 error | after 10 rounds with EF | encode (ms) | decode (ms) |"
    lines = [title, "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"`{r['codec']}`", f"{r['bytes'] / 1e6:.3f}", f"{r['ratio_vs_fp32']:.3f}"]
        cells += [f"{r['ratio_vs_full_adapter']:.3f}"] if full else []
        cells += [
            f"{r['rel_error']:.2%}",
            f"{r['ef_rel_error_10_rounds']:.2%}",
            f"{r['encode_ms']:.0f}",
            f"{r['decode_ms']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--synthetic", action="store_true", help="Gaussian deltas only (no model needed)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    data: dict[str, tuple[dict, int]] = {}
    if not args.synthetic:
        from fedge.common.models import default_cache_dir

        path = (args.cache_dir or default_cache_dir()) / "bench" / "codecs-update.npz"
        if not path.is_file():
            print(f"training a real round-2 delta into {path} (a few minutes)", flush=True)
            make_real_delta(args.cache_dir or default_cache_dir(), path)
        with np.load(path) as f:
            real = {k: f[k] for k in f.files if k != FULL_BYTES}
            data["real"] = (real, int(f[FULL_BYTES]))
    if "real" in data:
        real, full = data["real"]
        shapes, stds = {k: v.shape for k, v in real.items()}, {k: float(v.std()) for k, v in real.items()}
    else:  # the real delta's overall std was 8.6e-3; A is 9.58 MB next to B's 9.95 MB
        shapes, full = smollm2_shapes(), 19_537_920
        stds = dict.fromkeys(shapes, 8.6e-3)
    data["synthetic"] = (synthetic_like(shapes, stds), full)

    results = {"ef_rounds": EF_ROUNDS, "repeats": args.repeats, "data": {}}
    sections = []
    for name, (delta, full_bytes) in data.items():
        fp32 = sum(a.size * 4 for a in delta.values())
        print(f"--- {name}: {len(delta)} tensors, {fp32 / 1e6:.2f} MB fp32 (whole adapter {full_bytes / 1e6:.2f} MB)")
        rows = run(delta, full_bytes, args.repeats)
        results["data"][name] = {
            "tensors": len(delta),
            "fp32_bytes": fp32,
            "full_adapter_bytes": full_bytes,
            "codecs": rows,
        }
        what = ("a real round-2 LoRA-B delta of SmolLM2-135M (r=16, 7 projections x 30 layers, 10 steps on finance "
                "after 10 on healthcare)" if name == "real" else
                "Gaussian deltas of the same shapes and per-tensor std")  # fmt: skip
        sections.append(table(f"#### {name}: {what}; {len(delta)} tensors, {fp32 / 1e6:.2f} MB as fp32", rows, True))
    write_results("codecs", results)
    update_readme_section("codecs", "### Update codecs\n\n" + "\n\n".join(sections) + "\n\n" + NOTE)


NOTE = """\
`/ fp32` is against the same tensors as fp32 (the delta of B, what a client sends with A frozen); `/ full adapter`
against the whole adapter as fp32 (A and B, what clients sent before deltas). "after 10 rounds with EF" is the
relative error of the sum of 10 uploads of the same delta with error feedback (the residual carried over): what
top-k drops in one round arrives in later ones. Times are medians on this VM (one process, numpy)."""


if __name__ == "__main__":
    main()
