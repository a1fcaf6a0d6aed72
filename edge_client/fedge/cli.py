"""The ``fedge`` command. Input mistakes print one clear line and exit 2; nothing half-written stays."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

from fedge import __version__
from fedge.cli_common import _cache, _check_writable_dir, _config_file, _say, _settings, console
from fedge.common.errors import FedgeError
from fedge.common.settings import int_in, number
from fedge.common.wire import MAX_SEED, MIN_SEQ_LEN

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage mistake (said in one line: `_Parser`)
        return int(done.code or 0)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, _interrupt)  # so `finally` blocks stop child processes on a plain kill too
    route_library_notices()
    try:
        return args.run(args) or 0
    except FedgeError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


LOG_NAME = "fedge.log"


def log_path() -> Path:
    """fedge's log file: ``$XDG_STATE_HOME/fedge/fedge.log`` (default ``~/.local/state/fedge/fedge.log``)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state).expanduser() / "fedge" / LOG_NAME


def route_library_notices() -> Path | None:
    """Send what libraries say to a device's owner who cannot act on it (deprecation warnings, transformers'
    advisories and weight-loading bars, bitsandbytes' notices) to fedge's rotating log instead of the console.

    Environment variables, so the processes fedge starts (server, SuperNode, worker) inherit them. fedge's own
    warnings and every library's errors still reach the console too. Returns the log's path (None if it cannot be
    written: then notices are dropped, not shown).
    """
    import logging
    from logging.handlers import RotatingFileHandler

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars
    os.environ.setdefault("TQDM_DISABLE", "1")  # plain tqdm bars (GGUF de-quantizing); read when tqdm is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its advisory notices
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")  # children
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger -> the log, not stderr
    root = logging.getLogger()
    if any(getattr(h, "fedge_log", False) for h in root.handlers):
        return log_path()
    path = log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(path, maxBytes=2 * 2**20, backupCount=2, encoding="utf-8")
    except OSError:
        handler, path = logging.NullHandler(), None
    handler.fedge_log = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    # What does concern the owner still reaches the console: fedge's own warnings, anyone's errors.
    console_handler = logging.StreamHandler()
    console_handler.addFilter(lambda r: r.levelno >= (logging.WARNING if r.name.startswith("fedge") else logging.ERROR))
    root.addHandler(console_handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return path


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    from fedge.common.models import DEFAULT_MODEL, default_cache_dir

    parser = _Parser(prog="fedge", description="Federated fine-tuning of small LLMs on edge devices")
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
    sample.add_argument("--n", type=int_in(0), default=5)
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
    # Every number is checked as it is parsed, so a mistake is said before torch loads (seconds on a Pi).
    train.add_argument("--steps", type=int_in(1), default=100)
    train.add_argument("--batch", type=int_in(1), default=8, help="micro-batch size (examples or packed rows)")
    train.add_argument("--grad-accum", type=int_in(1), default=1)
    train.add_argument("--lr", type=number(0, strict=True), default=1e-3)
    train.add_argument("--seq-len", type=int_in(MIN_SEQ_LEN), default=256)
    train.add_argument("--rank", type=int_in(1), default=16)
    train.add_argument("--alpha", type=int_in(1), default=None, help="LoRA alpha (default: 2 x rank)")
    train.add_argument(
        "--targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated module names for LoRA (default: every attention and MLP projection)",
    )
    train.add_argument("--top-layers", type=int_in(1), default=None, help="train only the last N layers")
    train.add_argument("--pack", action="store_true", help="pack examples into full rows of --seq-len")
    train.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (less memory, slower)")
    train.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the decoder layers (auto: on for 100+ steps where a compiler exists)",
    )
    train.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    _add_runtime_args(train)
    train.set_defaults(run=cmd_train)

    ev = sub.add_parser("eval", help="held-out loss, perplexity and exact match")
    ev.add_argument("--data", required=True)
    ev.add_argument("--adapter", type=Path, default=None)
    ev.add_argument("--model", default=None, help=f"base model (default: the adapter's, else {DEFAULT_MODEL})")
    ev.add_argument("--limit", type=int_in(1), default=None, help="evaluate at most N examples")
    ev.add_argument(
        "--max-new-tokens",
        type=int_in(1),
        default=None,
        help="generation limit for exact match (default: the longest reference reply in tokens, plus slack)",
    )
    ev.add_argument("--json", action="store_true", help="print JSON to stdout")
    _add_runtime_args(ev)
    ev.set_defaults(run=cmd_eval)
    _add_profile_command(sub)
    _add_federation_commands(sub)
    from fedge.agent_cli import add_agent_commands
    from fedge.export_cli import add_export_commands

    add_agent_commands(sub)
    add_export_commands(sub)
    return parser


def _add_profile_command(sub) -> None:
    from fedge.edge_client.device.profiling import ProfilePlan

    d = ProfilePlan()
    prof = sub.add_parser("profile", help="what this device can do: matmuls, training and generation speed, energy")
    prof.add_argument("--model", default=None, help=f"model to profile (default: {d.model} if cached; none: skip)")
    prof.add_argument("--json", action="store_true", help="print JSON to stdout (null fields: see 'unavailable')")
    prof.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="timeline: power, CPU, RSS, temp")
    # Checked as parsed, like `fedge train`'s: ProfilePlan checks them again, but only after torch has loaded.
    prof.add_argument("--steps", type=int_in(1), default=d.steps, help=f"timed training steps (default: {d.steps})")
    prof.add_argument("--warmup", type=int_in(0), default=d.warmup, help=f"untimed steps first (default: {d.warmup})")
    prof.add_argument("--batch", type=int_in(1), default=d.batch, help=f"rows per training step (default: {d.batch})")
    prof.add_argument(
        "--seq-len", type=int_in(MIN_SEQ_LEN), default=d.seq_len, help=f"tokens per row (default: {d.seq_len})"
    )
    prof.add_argument("--gen-tokens", type=int_in(1), default=d.gen_tokens, help="new tokens per generation")
    prof.add_argument(
        "--tdp-watts", type=number(0, strict=True), default=None, help="TDP for the CPU-utilisation energy estimate"
    )
    prof.add_argument(
        "--threads", type=int_in(0), default=0, help="torch threads (default: all; 1 helps on a busy CPU)"
    )
    prof.add_argument(
        "--budget",
        type=number(0, strict=False),
        default=d.budget_s,
        metavar="SECONDS",
        help=f"target run time: fewer timed repetitions on a slow device (default: {d.budget_s:g}; 0: no limit)",
    )
    prof.add_argument(
        "--inference", action="store_true", help="measure generation: first token, decode tokens/s, RSS per runtime"
    )
    prof.add_argument(
        "--export", type=Path, action="append", default=[], metavar="DIR",
        help="with --inference: an export (fedge export) to measure too; repeatable",
    )  # fmt: skip
    _add_runtime_args(prof)
    prof.set_defaults(run=cmd_profile)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like fedge's other input errors (the usage is a --help away):
    ``error: fedge train: --steps must be >= 1, got 0 (see fedge train --help)``."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument (\S+): must ", r"\1 must ", message)  # `int_in`'s and `number`'s errors
        prog = escape(self.prog)
        console.print(
            f"[bold red]error:[/] {prog}: {escape(message)} (see {prog} --help)", highlight=False, soft_wrap=True
        )
        self.exit(EXIT_USAGE)


def _add_federation_commands(sub) -> None:
    """``fedge server start``, ``fedge client start`` and ``fedge demo``: their flags come from the settings classes
    (`fedge.common.settings`), so each flag, default and help text is written once, where the setting is."""
    from fedge.common.settings import add_flags
    from fedge.common.wire import RoundSettings
    from fedge.demo import DEMO_SETS, DemoSettings
    from fedge.edge_client.federation.service import ClientSettings
    from fedge.edge_client.federation.settings import Device
    from fedge.server.settings import ServerSettings

    config_help = "a TOML file with [round] and [server] tables (field names as keys); flags override it"
    server = sub.add_parser("server", help="the federation server").add_subparsers(title="server commands")
    start = server.add_parser("start", help="run a SuperLink and the federation (resumes from --state)")
    start.add_argument("--config", type=Path, help=config_help)
    add_flags(start.add_argument_group("round: what every client does (sent to every client)"), RoundSettings)
    add_flags(start.add_argument_group("server"), ServerSettings)
    start.set_defaults(run=cmd_server_start)

    client = sub.add_parser("client", help="this device's client").add_subparsers(title="client commands")
    cstart = client.add_parser("start", help="join a federation and train on local data each round")
    cstart.add_argument(
        "--config", type=Path, help=config_help.replace("[round] and [server]", "[client] and [device]")
    )
    add_flags(cstart.add_argument_group("client: how this device joins"), ClientSettings)
    add_flags(cstart.add_argument_group("device: what it is and holds"), Device, skip=("cache_dir", "worker_port"))
    cstart.set_defaults(run=cmd_client_start)

    certs = sub.add_parser("certs", help="TLS and node keys for a first deployment: a CA, a server certificate, keys")
    certs.add_argument(
        "--out", type=Path, default=Path("fedge-certs"), help="where to write them (default: fedge-certs)"
    )
    certs.add_argument("--host", action="append", default=[], help="an address the clients dial (repeatable)")
    certs.add_argument("--node", action="append", default=[], help="a device's name: makes its key pair (repeatable)")
    certs.add_argument("--days", type=int, default=365, help="validity of the CA and server certificate (default: 365)")
    certs.set_defaults(run=cmd_certs)

    demo = sub.add_parser("demo", help="a whole federation on this machine: server + one client per demo domain")
    add_flags(demo.add_argument_group("demo"), DemoSettings)
    add_flags(demo.add_argument_group("round: what every client does"), RoundSettings)
    add_flags(demo.add_argument_group("server"), ServerSettings, skip=DEMO_SETS)
    demo.set_defaults(run=cmd_demo)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    from fedge.quantization import PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="base weights (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


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
    from fedge.edge_client.training import demo_data

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
    from fedge.train_cli import run_train

    return run_train(args, _cache(args), console)


def cmd_eval(args) -> int:
    from fedge.train_cli import run_eval

    return run_eval(args, _cache(args), console)


def cmd_profile(args) -> int:
    if args.inference:
        return _profile_inference(args)
    from fedge.edge_client.device.inventory import split_missing
    from fedge.edge_client.device.profiling import ProfilePlan, render_table, run_profile, save_for_planner

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
    if saved := save_for_planner(report, _cache(args)):
        _say(f"kept for the training planner: {saved}")
    if args.json:
        print(json.dumps(report))
    else:
        Console().print(render_table(report, unavailable))
        if args.plot:
            console.print(f"timeline: {args.plot}")
    return 0


def _profile_inference(args) -> int:
    from rich.table import Table

    from fedge.common.models import DEFAULT_MODEL, cached_model
    from fedge.export_cli import inference_profile

    models = [Path(cached_model(args.model or DEFAULT_MODEL, _cache(args))), *args.export]
    rows = inference_profile(models, _cache(args), args.gen_tokens, 3)
    if args.json:
        print(json.dumps(rows))
        return 0
    table = Table("model", "runtime", "first token ms", "decode tok/s", "peak RSS MB", "J/token")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], "-", f"[red]{escape(r['error'])}[/]", "", "", "")
            continue
        figures = (f"{r['first_token_ms']:.0f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['peak_rss_mb']:.0f}")
        table.add_row(Path(r["model"]).name, r["runtime"], *figures, f"{r['j_per_token']:.3f}")
    Console().print(table)
    return 0


def cmd_server_start(args) -> int:
    from fedge.common.wire import RoundSettings
    from fedge.server.deploy import start_server
    from fedge.server.settings import ServerSettings

    config = _config_file(args, ("round", "server"))
    round_settings = _settings(RoundSettings, args, "round", config)
    server = _settings(ServerSettings, args, "server", config)
    _check_writable_dir(server.state, "--state")
    return start_server(server, round_settings, _cache(args), Console())


def cmd_client_start(args) -> int:
    from fedge.edge_client.federation.service import ClientSettings, start_client
    from fedge.edge_client.federation.settings import Device

    config = _config_file(args, ("client", "device"))
    client = _settings(ClientSettings, args, "client", config)
    if not client.server:
        raise FedgeError("--server is required (the server's HOST:PORT), or server in the config's [client] table")
    device = _settings(Device, args, "device", config)
    if args.cache_dir is not None:  # the flag wins over a [device] cache_dir, which wins over the default
        device = dataclasses.replace(device, cache_dir=args.cache_dir)
    _check_writable_dir(device.state_dir, "--state")
    return start_client(client, device, _say)


def cmd_certs(args) -> int:
    from fedge.server.certs import make

    m = make(args.out, args.host, args.node, args.days)
    keys = " ".join(f"--auth-key {pub}" for _, pub in m.node_keys.values())
    console.print(f"[green]wrote[/] {m.ca_cert}, {m.server_cert} and {len(m.node_keys)} node key pair(s) to {args.out}")
    console.print(
        f"server: fedge server start --address {args.host[0]}:9092 --ssl-certfile {m.server_cert} --ssl-keyfile "
        f"{m.server_key} --ssl-ca-certfile {m.ca_cert} {keys}".rstrip(),
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    for name, (private, _) in m.node_keys.items():
        console.print(
            f"{name}: copy {m.ca_cert} and {private} to it, then fedge client start --server {args.host[0]}:9092 "
            f"--root-certificates ca.crt --auth-key {private.name} --name {name} --data ...",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
    console.print(f"keep {m.ca_key} off the network: it signs certificates anyone's clients will trust")
    return 0


def cmd_demo(args) -> int:
    from fedge.common.wire import RoundSettings
    from fedge.demo import DemoSettings, adaptive_defaults, run_demo
    from fedge.server.settings import ServerSettings

    demo = _settings(DemoSettings, args, "demo")
    round_settings = adaptive_defaults(demo, _settings(RoundSettings, args, "round"), set(vars(args)))
    return run_demo(demo, round_settings, _settings(ServerSettings, args, "server"), _cache(args), Console())


if __name__ == "__main__":
    sys.exit(main())
