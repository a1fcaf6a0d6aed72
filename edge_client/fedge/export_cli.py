"""``fedge export`` and ``fedge generate``: the tuned model as files a device runs, and running it there.

fedge export --adapter DIR --format onnx|gguf|hf [--quantize int8|int4|none] --out DIR [--eval-data FILE]
fedge generate --model EXPORT_OR_ADAPTER --prompt TEXT [--sample] | --data FILE
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedge.cli_common import _cache, _say, console
from fedge.common.errors import FedgeError
from fedge.common.settings import int_in, number


def add_export_commands(sub) -> None:
    from fedge.edge_client.export.build import FORMATS, QUANTIZE

    ex = sub.add_parser("export", help="merge an adapter into its base and write it for ONNX Runtime, llama.cpp or HF")
    ex.add_argument("--adapter", type=Path, required=True, help="the adapter directory (e.g. fedge demo's adapter/)")
    ex.add_argument("--format", choices=FORMATS, required=True, help="onnx: ONNX Runtime; gguf: llama.cpp; hf")
    ex.add_argument("--quantize", choices=QUANTIZE, default="none", help="weights of the export (default: none)")
    ex.add_argument("--out", type=Path, required=True, help="the export's directory (replaced when complete)")
    ex.add_argument("--model", default=None, help="the base model, if not the one the adapter names")
    ex.add_argument("--eval-data", default=None, help="held-out data: exact match of the export and the merged model")
    ex.add_argument("--eval-examples", type=int_in(1), default=200, help="at most this many of them (default: 200)")
    ex.add_argument("--json", action="store_true", help="print the manifest as JSON")
    ex.set_defaults(run=cmd_export)

    gen = sub.add_parser("generate", help="reply to a prompt with an exported model (or an adapter)")
    gen.add_argument("--model", type=Path, required=True, help="an export, a transformers directory or an adapter")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the user's message (the model's chat template is applied)")
    what.add_argument("--data", help="a data file: reply to each example's prompt and score exact match")
    gen.add_argument("--max-new-tokens", type=int_in(1), default=128, help="(default: 128; --data: the answers')")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=number(0, strict=True), default=0.7)
    gen.add_argument("--top-p", type=number(0, strict=True), default=0.9, help="nucleus mass, at most 1")
    gen.add_argument("--seed", type=int_in(0), default=0)
    gen.add_argument("--limit", type=int_in(1), default=None, help="--data: at most N examples")
    gen.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="PyTorch's weights (default: fp32)")
    gen.add_argument("--json", action="store_true", help="print JSON to stdout")
    gen.set_defaults(run=cmd_generate)


def cmd_export(args) -> int:
    from fedge.edge_client.export.build import ExportRequest, export

    req = ExportRequest(args.adapter, args.format, args.out, args.quantize, args.model, args.eval_data,
                        args.eval_examples)  # fmt: skip
    with console.status("exporting"):
        manifest = export(req, _cache(args), _say)
    if args.json:
        print(json.dumps(manifest))
        return 0
    p, em = manifest["parity"], manifest["exact_match"]
    console.print(f"[green]exported:[/] {args.out} ({manifest['format']}, {manifest['quantize']}, "
                  f"{manifest['size_mb']:.1f} MB)", highlight=False)  # fmt: skip
    console.print(f"  parity with the merged model ({p['runtime']}): max |logit diff| {p['max_abs_logit_diff']:.2g}, "
                  f"top token {p['top1_agree']}/{p['prompts']}, greedy answers {p['greedy_same']}/{p['prompts']}",
                  highlight=False)  # fmt: skip
    if em:
        console.print(f"  exact match on {em['examples']} examples: merged {em['merged']:.1%}, export "
                      f"{em['export']:.1%}", highlight=False)  # fmt: skip
    return 0


def cmd_generate(args) -> int:
    from fedge.edge_client.export.runtimes import Sampling, open_runtime, score

    sampling = Sampling(args.temperature, args.top_p, args.seed) if args.sample else None
    runtime = open_runtime(args.model, _cache(args), args.dtype)
    if args.prompt is not None:
        ids = runtime.encode_chat([{"role": "user", "content": args.prompt}])
        t0 = time.perf_counter()
        out = runtime.generate(ids, args.max_new_tokens, sampling)
        seconds = time.perf_counter() - t0
        reply = runtime.decode(out)
        if args.json:
            print(json.dumps({"reply": reply, "tokens": len(out), "seconds": seconds, "runtime": runtime.name}))
        else:
            console.print(reply, highlight=False, markup=False, soft_wrap=True)
            _say(f"{len(out)} tokens in {seconds:.2f} s on {runtime.name}")
        return 0
    from fedge.edge_client.training.data import load_examples

    examples = [ex for ex in load_examples(args.data) if ex.text is None][: args.limit]
    if not examples:
        raise FedgeError(f"--data {args.data}: no chat examples (prompt and reply) to reply to")
    t0 = time.perf_counter()
    with console.status(f"replying to {len(examples)} examples on {runtime.name}"):
        em = score(runtime, examples)
    result = {"exact_match": em, "examples": len(examples), "seconds": time.perf_counter() - t0,
              "runtime": runtime.name}  # fmt: skip
    print(json.dumps(result)) if args.json else console.print(
        f"exact match {em:.1%} on {len(examples)} examples ({runtime.name}, {result['seconds']:.0f} s)"
    )
    return 0


def inference_profile(models: list[Path], cache_dir: Path, new_tokens: int, reps: int) -> list[dict]:
    """Each runtime measured in its own process (``python -m fedge.edge_client.export.runtimes``): its peak RSS is its
    own. A PyTorch model is measured in fp32 and bf16."""
    import subprocess
    import sys

    from fedge.edge_client.export.runtimes import open_runtime_kind

    rows = []
    for model in models:
        for dtype in ("fp32", "bf16") if open_runtime_kind(model) == "torch" else ("fp32",):
            cmd = [sys.executable, "-m", "fedge.edge_client.export.runtimes", str(model), "--dtype", dtype,
                   "--new-tokens", str(new_tokens), "--reps", str(reps), "--cache-dir", str(cache_dir)]  # fmt: skip
            _say(f"measuring {model} ({dtype})")
            done = subprocess.run(cmd, capture_output=True, text=True)
            try:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                row = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
            rows.append({"model": str(model), **row})
    return rows
