"""The ``fedge`` command. Input mistakes print one clear line and exit 2; nothing half-written stays."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from rich.console import Console

from fedge import __version__
from fedge.common.errors import FedgeError

console = Console(stderr=True)
EXIT_USAGE = 2
# `fedge demo --devices`' default round deadline, for the default model (SmolLM2-135M, 15 steps of 8 x 256):
# long enough that every built-in profile plans all 15 steps at full rank, short enough that they must
# choose differently to make it (Pi 4: int8 base, 64-token rows; Pi 5: fp32, 128; Jetson: bf16, batch 8;
# laptop: fp32, batch 4), and a round of four emulated devices stays ~5 minutes on 2 cores.
DEVICES_DEADLINE_S = 240.0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, _interrupt)  # so `finally` blocks stop child processes on a plain kill too
    try:
        return args.run(args) or 0
    except FedgeError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    from fedge.common.models import DEFAULT_MODEL, default_cache_dir

    parser = argparse.ArgumentParser(prog="fedge", description="Federated fine-tuning of small LLMs on edge devices")
    parser.add_argument("--version", action="version", version=f"fedge {__version__}")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"model cache (default: $FEDGE_CACHE or {default_cache_dir()})",
    )
    sub = parser.add_subparsers(title="commands")

    model = sub.add_parser("model", help="fetch and list base models").add_subparsers(title="model commands")
    pull = model.add_parser("pull", help="fetch/convert a model into the cache (once)")
    pull.add_argument("source", help="built-in name, HF model directory, .gguf file, or hub id")
    pull.set_defaults(run=cmd_model_pull)
    model.add_parser("list", help="models in the cache").set_defaults(run=cmd_model_list)

    data = sub.add_parser("data", help="built-in demo data").add_subparsers(title="data commands")
    sample = data.add_parser("sample", help="print demo examples")
    sample.add_argument("domain")
    sample.add_argument("--n", type=int, default=5)
    sample.add_argument("--split", default="train")
    sample.set_defaults(run=cmd_data_sample)
    export = data.add_parser("export", help="write a demo domain as JSONL")
    export.add_argument("domain")
    export.add_argument("path", type=Path)
    export.add_argument("--split", default="train")
    export.set_defaults(run=cmd_data_export)

    train = sub.add_parser("train", help="fine-tune a LoRA adapter on local data")
    train.add_argument("--data", required=True, help="JSONL/CSV/TXT file, or demo:DOMAIN (demo:all for every domain)")
    train.add_argument("--model", default=DEFAULT_MODEL)
    train.add_argument("--out", type=Path, default=Path("fedge-adapter"))
    train.add_argument("--eval-data", help="held-out data (default: demo test split, or 10%% of --data)")
    train.add_argument("--steps", type=int, default=100)
    train.add_argument("--batch", type=int, default=8, help="micro-batch size (examples or packed rows)")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seq-len", type=int, default=256)
    train.add_argument("--rank", type=int, default=16)
    train.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default: 2 x rank)")
    train.add_argument(
        "--targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated module names for LoRA (default: every attention and MLP projection)",
    )
    train.add_argument("--top-layers", type=int, default=None, help="train only the last N layers")
    train.add_argument("--pack", action="store_true", help="pack examples into full rows of --seq-len")
    train.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (less memory, slower)")
    train.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the decoder layers (auto: on for 100+ steps where a compiler exists)",
    )
    train.add_argument("--seed", type=int, default=0)
    _add_runtime_args(train)
    train.set_defaults(run=cmd_train)

    ev = sub.add_parser("eval", help="held-out loss, perplexity and exact match")
    ev.add_argument("--data", required=True)
    ev.add_argument("--adapter", type=Path, default=None)
    ev.add_argument("--model", default=None, help=f"base model (default: the adapter's, else {DEFAULT_MODEL})")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most N examples")
    ev.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation limit for exact match (default: the longest reference reply in tokens, plus slack)",
    )
    ev.add_argument("--json", action="store_true", help="print JSON to stdout")
    _add_runtime_args(ev)
    ev.set_defaults(run=cmd_eval)
    _add_profile_command(sub)
    _add_federation_commands(sub)
    return parser


def _add_profile_command(sub) -> None:
    from fedge.edge_client.profiling import ProfilePlan

    d = ProfilePlan()
    prof = sub.add_parser("profile", help="what this device can do: matmuls, training and generation speed, energy")
    prof.add_argument("--model", default=None, help=f"model to profile (default: {d.model} if cached; none: skip)")
    prof.add_argument("--json", action="store_true", help="print JSON to stdout (null fields: see 'unavailable')")
    prof.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="timeline: power, CPU, RSS, temp")
    prof.add_argument("--steps", type=int, default=d.steps, help=f"timed training steps (default: {d.steps})")
    prof.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed steps first (default: {d.warmup})")
    prof.add_argument("--batch", type=int, default=d.batch, help=f"rows per training step (default: {d.batch})")
    prof.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per row (default: {d.seq_len})")
    prof.add_argument("--gen-tokens", type=int, default=d.gen_tokens, help="new tokens per generation")
    prof.add_argument("--tdp-watts", type=float, default=None, help="TDP for the CPU-utilisation energy estimate")
    prof.add_argument("--threads", type=int, default=0, help="torch threads (default: all; 1 helps on a busy CPU)")
    prof.add_argument(
        "--budget",
        type=float,
        default=d.budget_s,
        metavar="SECONDS",
        help=f"target run time: fewer timed repetitions on a slow device (default: {d.budget_s:g}; 0: no limit)",
    )
    _add_runtime_args(prof)
    prof.set_defaults(run=cmd_profile)


def _add_round_args(p: argparse.ArgumentParser) -> None:
    """What each client does per round (sent by the server to every client)."""
    from fedge.common.wire import RoundSettings

    d = RoundSettings()
    p.add_argument("--model", default=d.model, help=f"base model every client trains on (default: {d.model})")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=d.steps, help=f"local steps per round (default: {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--rank", type=int, default=d.lora_r)
    p.add_argument("--targets", default=d.lora_targets, help="comma-separated LoRA target modules")
    p.add_argument("--eval-examples", type=int, default=d.eval_examples, help="held-out examples per client")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        metavar="SECONDS",
        help="each client plans its round (precision, rank, layers, steps) to finish within it (default: 0, "
        "every client trains the round as sent)",
    )
    p.add_argument(
        "--codec",
        default=None,
        metavar="SPEC",
        help="clients send their change encoded: int8, int4, mix:0.9+int4:256 (under 1/8 of fp32), int3, "
        "topk:0.1+int4, ... or auto / auto:CEILING (each by its uplink); default: the whole fp32 adapter",
    )
    p.add_argument(
        "--server-lr",
        type=float,
        default=2.0,
        help="scales the averaged change (1: plain FedAvg; 2 measured best, see benchmarks/README.md)",
    )


def _add_federation_commands(sub) -> None:
    server = sub.add_parser("server", help="the federation server").add_subparsers(title="server commands")
    start = server.add_parser("start", help="run a SuperLink and the federation (resumes from --state)")
    _add_round_args(start)
    start.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT the clients connect to")
    start.add_argument("--state", type=Path, default=Path("fedge-server"), help="checkpoints and round records")
    start.add_argument("--min-clients", type=int, default=2, help="clients needed to start and to close a round")
    start.add_argument(
        "--stage-deadline",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds a round stage (train, evaluate) waits for replies (default: --deadline + 60 s of Flower "
        "overhead, or 1800 without --deadline)",
    )
    start.add_argument("--ssl-certfile", type=Path, help="server certificate (PEM): enables TLS")
    start.add_argument("--ssl-keyfile", type=Path, help="server private key (PEM)")
    start.add_argument("--ssl-ca-certfile", type=Path, help="CA certificate (PEM) the clients trust")
    start.add_argument(
        "--auth-key",
        type=Path,
        action="append",
        default=[],
        help="a SuperNode public key allowed to join (repeatable; needs TLS)",
    )
    start.add_argument(
        "--clientapp",
        default="fedge.edge_client.flower_client:app",
        help="the ClientApp the clients run, MODULE:ATTR (e.g. fedge's wrapped in your own mods)",
    )
    start.set_defaults(run=cmd_server_start)

    client = sub.add_parser("client", help="this device's client").add_subparsers(title="client commands")
    cstart = client.add_parser("start", help="join a federation and train on local data each round")
    cstart.add_argument("--server", required=True, help="the server's HOST:PORT")
    cstart.add_argument("--data", required=True, help="JSONL/CSV/TXT file or demo:DOMAIN")
    cstart.add_argument("--eval-data", help="held-out data (default: 10%% of --data)")
    cstart.add_argument("--name", help="how the server's records name this client (default: from --data)")
    cstart.add_argument("--state", type=Path, help="local work and checkpoints (default: ~/.fedge/clients/NAME)")
    cstart.add_argument("--model", default="smollm2-135m", help="model to pull before joining (none: skip)")
    cstart.add_argument("--precision", default="auto", help="base weights: auto, fp32, bf16, int8, int4, ...")
    cstart.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    cstart.add_argument("--root-certificates", type=Path, help="the server's CA certificate: enables TLS")
    cstart.add_argument("--auth-key", type=Path, help="this device's private key for SuperNode authentication")
    cstart.add_argument("--max-retries", type=int, default=None, help="give up after N reconnects (default: never)")
    cstart.add_argument(
        "--device-profile",
        default="",
        metavar="SPEC",
        help="run as an emulated device: pi4-2gb, pi5-8gb, jetson-orin-nano, laptop, a .json/.toml file, or "
        "key=value text such as base=pi5-8gb,slowdown=2 (its speed, memory cap and link; see edge_client/devices.py)",
    )
    cstart.add_argument(
        "--emulated-time",
        choices=["wall", "virtual"],
        default="wall",
        help="with --device-profile: sleep the device's slowness and link time (wall), or count them on the "
        "device's clock without sleeping (virtual: for several emulated devices on one machine)",
    )
    cstart.add_argument(
        "--no-worker",
        action="store_true",
        help="load the model in each round's ClientApp process instead of a warm worker",
    )
    cstart.set_defaults(run=cmd_client_start)

    demo = sub.add_parser("demo", help="a whole federation on this machine: server + one client per demo domain")
    _add_round_args(demo)
    demo.add_argument("--clients", type=int, default=None, help="client processes (one demo domain each; default 4)")
    demo.add_argument(
        "--devices",
        action="append",
        default=None,
        metavar="LIST",
        help="one client per emulated device, e.g. pi4-2gb,pi5-8gb,jetson-orin-nano,laptop (repeat the option for "
        "key=value profiles: --devices base=laptop --devices base=pi5-8gb,slowdown=2); makes rounds adaptive: "
        f"--deadline {DEVICES_DEADLINE_S:g} and --codec auto unless given",
    )
    demo.add_argument("--out", type=Path, default=None, help="report, plots, adapter (default: a new directory)")
    demo.add_argument(
        "--simulation",
        type=int,
        default=None,
        metavar="N",
        help="run N virtual clients on Flower's simulation engine instead of processes",
    )
    demo.set_defaults(run=cmd_demo)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    from fedge.quantization import PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="base weights (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def _cache(args) -> Path:
    from fedge.common.models import default_cache_dir

    return args.cache_dir or default_cache_dir()


def _say(msg: str) -> None:
    console.print(f"[dim]{msg}[/]")


def cmd_model_pull(args) -> int:
    from fedge.common.models import pull_model

    with console.status(f"pulling {args.source}"):
        path = pull_model(args.source, _cache(args), _say)
    console.print(f"[green]ready:[/] {path}")
    print(path)
    return 0


def cmd_model_list(args) -> int:
    from rich.table import Table

    from fedge.common.models import list_models

    table = Table("name", "size (MB)", "source", "path")
    for m in list_models(_cache(args)):
        table.add_row(m.name, f"{m.size_mb:.0f}" if m.size_mb else "-", m.source, m.path)
    Console().print(table)
    return 0


def _demo_records(domain: str, split: str, n: int | None = None) -> list[dict]:
    from fedge.edge_client import demo_data

    try:
        return demo_data.generate(domain, split, n=n)
    except ValueError as err:
        raise FedgeError(str(err)) from None


def cmd_data_sample(args) -> int:
    for rec in _demo_records(args.domain, args.split, args.n):
        print(json.dumps(rec, ensure_ascii=False))
    return 0


def cmd_data_export(args) -> int:
    from fedge.common.fsutil import atomic_write_text

    records = _demo_records(args.domain, args.split)
    try:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    except OSError as err:
        raise FedgeError(f"{args.path}: cannot write ({err.strerror})") from None
    console.print(f"wrote {len(records)} examples to {args.path}")
    return 0


def cmd_train(args) -> int:
    from fedge.edge_client.commands import run_train

    return run_train(args, _cache(args), console)


def cmd_eval(args) -> int:
    from fedge.edge_client.commands import run_eval

    return run_eval(args, _cache(args), console)


def cmd_profile(args) -> int:
    from fedge.edge_client.inventory import split_missing
    from fedge.edge_client.profiling import ProfilePlan, render_table, run_profile

    try:
        plan = ProfilePlan(
            model=args.model,
            precision=args.precision,
            device=args.device,
            steps=args.steps,
            warmup=args.warmup,
            batch=args.batch,
            seq_len=args.seq_len,
            gen_tokens=args.gen_tokens,
            tdp_w=args.tdp_watts,
            budget_s=args.budget or None,
            threads=args.threads,
        )
    except ValueError as err:
        raise FedgeError(f"bad profile option: {err}") from None
    report, unavailable = split_missing(run_profile(plan, _cache(args), _say, args.plot))
    report["unavailable"] = unavailable
    if args.json:
        print(json.dumps(report))
    else:
        Console().print(render_table(report, unavailable))
        if args.plot:
            console.print(f"timeline: {args.plot}")
    return 0


def _round_settings(args):
    from fedge.common.wire import RoundSettings

    try:
        return RoundSettings(
            model=args.model,
            steps=args.steps,
            lr=args.lr,
            batch=args.batch,
            seq_len=args.seq_len,
            lora_r=args.rank,
            lora_alpha=2 * args.rank,
            lora_targets=args.targets,
            eval_examples=args.eval_examples,
            seed=args.seed,
            deadline_s=args.deadline or 0.0,
            codec=args.codec or "",
        )
    except ValueError as err:
        raise FedgeError(f"bad round option: {err}") from None


def cmd_server_start(args) -> int:
    from fedge.server.deploy import ServerOptions, Tls, start_server

    tls_files = (args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)
    if any(tls_files) and not all(tls_files):
        raise FedgeError("TLS needs all of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile")
    if args.auth_key and not all(tls_files):
        raise FedgeError("--auth-key needs TLS (--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile)")
    if args.rounds < 1 or args.min_clients < 1:
        raise FedgeError("--rounds and --min-clients must be >= 1")
    opts = ServerOptions(
        state_dir=args.state,
        address=args.address,
        rounds=args.rounds,
        min_clients=args.min_clients,
        stage_deadline_s=args.stage_deadline,
        cache_dir=args.cache_dir,
        settings=_round_settings(args),
        tls=Tls(*tls_files) if all(tls_files) else None,
        auth_keys=args.auth_key,
        clientapp=args.clientapp,
        server_lr=args.server_lr,
    )
    return start_server(opts, Console())


def cmd_client_start(args) -> int:
    from fedge.edge_client.service import ClientOptions, start_client

    opts = ClientOptions(
        server=args.server,
        data=args.data,
        eval_data=args.eval_data,
        name=args.name,
        state_dir=args.state,
        cache_dir=args.cache_dir,
        model=None if args.model == "none" else args.model,
        precision=args.precision,
        threads=args.threads,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
        max_retries=args.max_retries,
        warm_worker=not args.no_worker,
        profile=args.device_profile,
        emulated_time=args.emulated_time,
    )
    return start_client(opts, _say)


def cmd_demo(args) -> int:
    from fedge.demo import DemoOptions, run_demo

    devices = _device_list(args.devices)
    if devices:
        if args.clients is not None and args.clients != len(devices):
            raise FedgeError(f"--clients {args.clients} but --devices lists {len(devices)}: one client per device")
        args.deadline = DEVICES_DEADLINE_S if args.deadline is None else args.deadline
        args.codec = "auto" if args.codec is None else args.codec
    clients = len(devices) if devices else (4 if args.clients is None else args.clients)
    if not 1 <= clients <= 16 or args.rounds < 1:
        raise FedgeError("--clients (or --devices) must be 1..16 and --rounds >= 1")
    opts = DemoOptions(
        settings=_round_settings(args),
        rounds=args.rounds,
        clients=clients,
        devices=devices,
        out=args.out,
        cache_dir=_cache(args),
        simulation=args.simulation,
        server_lr=args.server_lr,
    )
    return run_demo(opts, Console())


def _device_list(values: list[str] | None) -> list[str]:
    """``--devices`` values -> one profile spec per client, each checked now (FedgeError naming the field).

    A value without ``=`` is a comma-separated list of names or files; one with ``=`` is a single key=value
    profile (its commas separate fields).
    """
    from fedge.edge_client.devices import load_profile

    specs = []
    for value in values or []:
        specs += [value] if "=" in value else [v.strip() for v in value.split(",") if v.strip()]
    for spec in specs:
        load_profile(spec)
    return specs


if __name__ == "__main__":
    sys.exit(main())
