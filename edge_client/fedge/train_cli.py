"""``fedge train`` and ``fedge eval``: read top to bottom as setup, run, report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedge.common import adapters
from fedge.common.errors import FedgeError
from fedge.common.modeling import LoraSettings, add_lora, open_model
from fedge.common.models import DEFAULT_MODEL
from fedge.edge_client.training.data import Example, fingerprint, load_examples
from fedge.edge_client.training.evaluate import EvalResult, evaluate
from fedge.edge_client.training.memory import current_rss_mb
from fedge.edge_client.training.session import epoch_maker, eval_batches, split_heldout
from fedge.edge_client.training.train import TrainConfig, compile_available, train


def run_train(args: argparse.Namespace, cache_dir: Path, console: Console) -> int:
    # Setup: validate everything cheap before loading a model, so a mistake costs seconds, not minutes.
    try:
        cfg = TrainConfig(
            steps=args.steps,
            micro_batch=args.batch,
            grad_accum=args.grad_accum,
            lr=args.lr,
            seq_len=args.seq_len,
            pack=args.pack,
            gradient_checkpointing=args.grad_ckpt,
            seed=args.seed,
            lora=LoraSettings(
                r=args.rank,
                alpha=args.alpha or 2 * args.rank,
                target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                top_layers=args.top_layers,
            ),
        )
    except ValueError as err:
        raise FedgeError(f"bad training option: {err}") from None
    train_set, heldout = _train_and_heldout(args.data, args.eval_data, cfg.seed)
    adapters.check_writable(args.out)
    session = open_model(
        args.model, cache_dir, args.precision, args.device, say=lambda m: console.print(f"[dim]{m}[/]")
    )
    cfg.compile = args.compile == "on" or (
        args.compile == "auto" and cfg.steps >= 100 and compile_available(session.device)
    )
    console.print(
        f"{len(train_set)} training examples, {len(heldout)} held out; {session.precision} on {session.device}"
        + (" (compiling the decoder layers first)" if cfg.compile else "")
    )

    # Run: held-out loss before, train, held-out loss and exact match after.
    held_batches = eval_batches(session.tokenizer, heldout, cfg.seq_len)
    model = add_lora(session.model, cfg.lora, seed=cfg.seed)
    before = evaluate(model, session.tokenizer, held_batches, [], session.device)
    state_dir = args.out.with_name(f".{args.out.name}.progress")
    data_id = fingerprint(train_set)
    with _progress(console) as progress:
        task = progress.add_task("training", total=cfg.steps, loss=float("nan"), tps=0.0, rss=current_rss_mb())

        def on_step(step: int, loss: float, tokens: int, seconds: float) -> None:
            progress.update(task, completed=step, loss=loss, tps=tokens / max(seconds, 1e-9), rss=current_rss_mb())

        result = train(
            model,
            epoch_maker(session.tokenizer, train_set, cfg),
            cfg,
            session.device,
            state_dir=state_dir,
            on_step=on_step,
            run_id=f"{session.model_dir}|{data_id}",
        )
    # Exact match generates, so it runs on at most ~400 held-out examples spread evenly over the set.
    with console.status("evaluating on held-out data"):
        after = evaluate(
            model, session.tokenizer, held_batches, heldout[:: max(1, len(heldout) // 400)], session.device
        )

    # Report and save (atomically; the resumable progress is removed only once the adapter is in place).
    meta = {
        "model": session.describe(),
        "data": {"source": str(args.data), "fingerprint": data_id, "examples": len(train_set)},
        "train_config": cfg.to_dict(),
        "lora": cfg.lora.__dict__,
        "metrics": {
            "before": before.to_dict(),
            "after": after.to_dict(),
            "train_loss": result.final_loss,
            "tokens_per_s": result.tokens_per_s,
            "seconds": result.seconds,
            "peak_rss_mb": result.peak_rss_mb,
        },
    }
    adapters.save_adapter(model, args.out, meta)
    import shutil

    shutil.rmtree(state_dir, ignore_errors=True)
    _report(console, before, after, result.tokens_per_s, result.peak_rss_mb)
    console.print(f"[green]adapter saved:[/] {args.out}")
    return 0


def run_eval(args: argparse.Namespace, cache_dir: Path, console: Console) -> int:
    from fedge.edge_client.export.runtimes import open_runtime_kind

    if args.model and open_runtime_kind(Path(args.model)) in ("ort", "gguf"):
        return _eval_export(args, cache_dir, console)
    examples = load_examples(args.data)[: args.limit]
    meta = adapters.read_meta(args.adapter) if args.adapter else {}
    if args.adapter and not (args.adapter / "adapter_config.json").is_file():
        raise FedgeError(f"{args.adapter}: not an adapter directory (no adapter_config.json)")
    source = args.model or meta.get("model", {}).get("source") or DEFAULT_MODEL
    session = open_model(source, cache_dir, args.precision, args.device, say=lambda m: console.print(f"[dim]{m}[/]"))
    model = adapters.load_adapter(session.model, args.adapter) if args.adapter else session.model
    seq_len = meta.get("train_config", {}).get("seq_len", 256)
    t0 = time.perf_counter()
    with console.status(f"evaluating {len(examples)} examples"):
        result = evaluate(
            model,
            session.tokenizer,
            eval_batches(session.tokenizer, examples, seq_len),
            examples,
            session.device,
            max_new_tokens=args.max_new_tokens,
        )
    if args.json:
        import json

        print(json.dumps({**result.to_dict(), "seconds": time.perf_counter() - t0}))
    else:
        _report(console, None, result, None, None)
    return 0


def _eval_export(args: argparse.Namespace, cache_dir: Path, console: Console) -> int:
    """Exact match of an export (ONNX, GGUF) on its runtime, by the same greedy loop as every runtime
    (`fedge.edge_client.export.runtimes.score`); held-out loss needs the PyTorch model (evaluate the adapter for it)."""
    from fedge.edge_client.export.runtimes import open_runtime, score

    if args.adapter:
        raise FedgeError(f"--model {args.model} is an export, with its adapter merged in: leave out --adapter")
    examples = [ex for ex in load_examples(args.data)[: args.limit] if ex.text is None]
    if not examples:
        raise FedgeError(f"--data {args.data}: no chat examples to score an export on")
    runtime = open_runtime(Path(args.model), cache_dir)
    t0 = time.perf_counter()
    with console.status(f"evaluating {len(examples)} examples on {runtime.name}"):
        result = EvalResult(exact_match=score(runtime, examples, args.max_new_tokens), n_generated=len(examples))
    if args.json:
        import json

        print(json.dumps({**result.to_dict(), "runtime": runtime.name, "seconds": time.perf_counter() - t0}))
    else:
        _report(console, None, result, None, None)
    return 0


def _train_and_heldout(data: str, eval_data: str | None, seed: int) -> tuple[list[Example], list[Example]]:
    examples = load_examples(data)
    if eval_data:
        return examples, load_examples(eval_data)
    if data.startswith("demo:"):
        domain = data.split(":")[1]
        return examples, load_examples(f"demo:{domain}:test")
    return split_heldout(examples, 0.1, seed)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TextColumn("RSS {task.fields[rss]:.0f} MB"),
        TimeRemainingColumn(),
        console=console,
    )


def _report(
    console: Console, before: EvalResult | None, after: EvalResult, tps: float | None, rss: float | None
) -> None:
    table = Table("metric", *(["before"] if before else []), "after" if before else "value")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for name in ("loss", "perplexity", "exact_match"):
        row = [fmt(getattr(before, name))] if before else []
        table.add_row(name, *row, fmt(getattr(after, name)))
    if tps is not None:
        table.add_row("train tokens/s", *([""] if before else []), f"{tps:.0f}")
    if rss is not None:
        table.add_row("peak RSS (MB)", *([""] if before else []), f"{rss:.0f}")
    console.print(table)
