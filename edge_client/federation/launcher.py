"""The ClientApp launcher: Flower's SuperExec, whose ClientApp processes fork from one that has done the imports.

Flower's deployment engine runs each message in a fresh ``flwr-clientapp`` process. On a small device the
interpreter's start and Flower's imports cost ~1 s of CPU per message before the handler runs (four clients on
two cores: 2.7 s per client and round at the median, up to 3.9 s; forked from here 0.4 s: ``benchmarks/demo.py``).
fedge's client therefore runs its SuperNode with ``--isolation process`` and this launcher beside it: Flower's own
SuperExec loop (``run_superexec``: it takes the node's tasks and launches them), given an executor that starts each
ClientApp process by forking it from a fork server that imported Flower's ClientApp runtime and fedge's ClientApp
once (:mod:`multiprocessing`'s forkserver: a process that only imports and forks, never this one with its HTTP
client and watcher threads). Each message still gets a process of its own, as Flower means it to (what one round
leaks or crashes on ends with it); only the imports are shared. Task types other than ClientApp go to Flower's
own subprocess executor.

    python -m fedge.edge_client.federation.launcher --runtime-api-address 127.0.0.1:PORT --parent-pid PID
        [--insecure | --root-certificates PEM] [--superexec-auth-secret-file FILE] [--poll-interval S]
    python -m fedge.edge_client.federation.launcher --check    # exit 3 and say why if it does not fit this Flower

Flower has no public hook for an executor of one's own: the launcher replaces one name in Flower's SuperExec loop
(``run_superexec.get_executor``) and uses Flower's ``Executor`` protocol, its ``ExecutionSpec`` and its ClientApp
runtime's entry point. `misfit` checks all of them against the installed Flower (1.41 and 1.42 fit) as the
launcher starts; on a Flower that moved one the launcher exits with `MISFIT_EXIT`, and ``fedge client start``
says why in one line and runs the node as Flower does (tests/test_launcher.py fails on such a Flower).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

# What the fork server imports once: Flower's ClientApp runtime and fedge's own ClientApp (a ClientApp from
# elsewhere, e.g. a FAB's module, is imported in its process as Flower would).
PRELOAD = ["flwr.supernode.runtime.run_clientapp", "fedge.edge_client.federation.clientapp"]
# Seconds between the launcher's asks for a new task: Flower's default. Every 0.2 s would save a message 0.4 s of
# waiting on average, but an idle device then spent 2.9% of a core on the asks and their answers (the SuperNode's
# HTTP server) against 0.7% (benchmarks/agent.py): a device waits far more than it works.
POLL_INTERVAL_S = 1.0
# The fork server (Flower's ClientApp runtime and fedge's ClientApp imported, ~93 MB RSS, and multiprocessing's
# resource tracker, ~13 MB) starts with a node's first ClientApp and stops once no ClientApp has run for this long,
# so that a device waiting between rounds or for its conditions does not hold it (benchmarks/agent.py). Rounds
# that follow each other (the demo's) keep it; after a pause the first message pays its start again (~1 s).
FORK_SERVER_IDLE_S = 120.0
MISFIT_EXIT = 3  # ``--check``'s exit status when the launcher does not fit the installed Flower
# What the launcher reads off Flower's ExecutionSpec and passes to Flower's run_clientapp.
SPEC_FIELDS = ("task_type", "task_id", "runtime_api_address", "token", "insecure", "root_certificates_path",
               "parent_pid", "runtime_dependency_install")  # fmt: skip
RUN_CLIENTAPP_ARGS = ("runtime_api_address", "token", "insecure", "certificates", "parent_pid",
                      "runtime_dependency_install")  # fmt: skip
RUN_SUPEREXEC_ARGS = ("runtime_api_address", "insecure", "root_certificates_path", "superexec_auth_secret",
                      "parent_pid")  # fmt: skip


class ForkExecutor:
    """Flower's ``Executor`` protocol (``flwr.supercore.superexec.executor.types``): ClientApp tasks run in a
    process forked from the fork server; any other task type in Flower's subprocess executor."""

    def __init__(self, preload: list[str], idle_s: float = FORK_SERVER_IDLE_S) -> None:
        import time

        from flwr.supercore.superexec.executor import SubprocessExecutor

        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(preload)
        self.others = SubprocessExecutor()
        self.running: list[multiprocessing.process.BaseProcess] = []
        self.idle_s, self.last_busy = idle_s, time.monotonic()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return self.others.get_eligible_capacity(
            supported_task_types, insecure=insecure, root_certificates_path=root_certificates_path
        )

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None  # processes have no capacity gate, as in Flower's subprocess executor

    def launch(self, spec):
        from logging import INFO

        from flwr.supercore import log
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.others.launch(spec)
        process = self.context.Process(target=run_clientapp, args=(spec,), name=f"flwr-clientapp-{spec.task_id}")
        try:
            process.start()
        except OSError as err:
            return LaunchResult.failed(f"cannot fork a ClientApp process: {err}")
        self.running.append(process)
        log(INFO, "ClientApp task %d: process %d forked by fedge's launcher", spec.task_id, process.pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Let go of finished ClientApp processes (the fork server waits for them; their outcome is Flower's to
        report, by the Runtime API)."""
        import time

        for process in [p for p in self.running if p.exitcode is not None]:
            process.close()
            self.running.remove(process)
        now = time.monotonic()
        if self.running:
            self.last_busy = now
        elif now - self.last_busy >= self.idle_s and fork_server_running():
            stop_fork_server()

    def close(self) -> None:
        """Stop the ClientApps still running (SIGTERM: each reports its task failed): the launcher goes when its
        SuperNode does, and their work has nowhere to go."""
        for process in self.running:
            if process.exitcode is None:
                process.terminate()


def fork_server_running() -> bool:
    """Whether this process's fork server runs (multiprocessing starts it with the first forked process) and can
    be stopped: by multiprocessing's own stop methods, which are private (a Python without them keeps it)."""
    from multiprocessing import forkserver, resource_tracker

    server, tracker = forkserver._forkserver, resource_tracker._resource_tracker
    stoppable = hasattr(server, "_stop") and hasattr(tracker, "_stop")
    return stoppable and getattr(server, "_forkserver_pid", None) is not None


def stop_fork_server() -> None:
    """Stop this process's fork server and resource tracker; the next forked process starts both again."""
    from multiprocessing import forkserver, resource_tracker

    forkserver._forkserver._stop()
    resource_tracker._resource_tracker._stop()


def misfit() -> str | None:
    """Why the launcher does not fit the installed Flower, in one line (None if it does): every Flower name it
    uses, public or not, is where it expects and takes what it passes."""
    import dataclasses
    import importlib
    import inspect

    try:
        loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
        types = importlib.import_module("flwr.supercore.superexec.executor.types")
        runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
        executor = importlib.import_module("flwr.supercore.superexec.executor")
        for module, name in [(executor, "SubprocessExecutor"), (executor, "LaunchResult"),
                             ("flwr.supercore.constant", "TaskType"), ("flwr.supercore.auth",
                             "load_superexec_auth_secret"), ("flwr.supercore.utils", "disable_process_dumping"),
                             ("flwr.supercore.tls", "validate_and_resolve_root_certificates")]:  # fmt: skip
            module = importlib.import_module(module) if isinstance(module, str) else module
            if not hasattr(module, name):
                return f"{module.__name__} has no {name}"
    except ImportError as err:
        return f"cannot import {err.name or err}"
    if not hasattr(loop, "get_executor") or "get_executor(" not in inspect.getsource(loop.run_superexec):
        return "run_superexec no longer picks its executor by get_executor"
    checks = [
        ("run_superexec", RUN_SUPEREXEC_ARGS, set(inspect.signature(loop.run_superexec).parameters)),
        ("run_clientapp", RUN_CLIENTAPP_ARGS, set(inspect.signature(runtime.run_clientapp).parameters)),
        ("ExecutionSpec", SPEC_FIELDS, {f.name for f in dataclasses.fields(types.ExecutionSpec)}),
        ("the Executor protocol", [n for n in vars(types.Executor) if not n.startswith("_")], set(dir(ForkExecutor))),
        ("LaunchResult", ("accepted", "failed"), set(dir(executor.LaunchResult))),
        ("TaskType", ("CLIENT_APP",), set(vars(importlib.import_module("flwr.supercore.constant").TaskType))),
    ]
    for what, needed, present in checks:
        missing = [n for n in needed if n not in present]
        if missing:
            return f"{what} has changed (no {', '.join(missing)} {'in fedge' if what.startswith('the') else 'there'})"
    return None


def run_clientapp(spec) -> None:
    """One ClientApp task in this (forked) process, exactly as ``flwr-clientapp`` would run it."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp as flower_run_clientapp

    flower_run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


def misfit_here(env: dict[str, str]) -> str | None:
    """`misfit`, one line, asked of the launcher in a process of its own with ``env`` (as it will run), so that
    Flower's SuperExec imports stay out of the caller (``fedge client start``, the agent)."""
    import subprocess

    cmd = [sys.executable, "-P", "-m", "fedge.edge_client.federation.launcher", "--check"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"fedge's ClientApp launcher could not be checked ({err})"
    if done.returncode == 0:
        return None
    lines = (done.stdout + done.stderr).strip().splitlines() or [f"exit {done.returncode}"]
    return lines[0] if done.returncode == MISFIT_EXIT else f"fedge's ClientApp launcher failed its check: {lines[-1]}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m fedge.edge_client.federation.launcher", description=__doc__.split("\n")[0]
    )
    p.add_argument("--check", action="store_true", help=f"only check that the launcher fits the installed Flower "
                   f"(exit {MISFIT_EXIT} and say why if not)")  # fmt: skip
    p.add_argument("--runtime-api-address", help="the SuperNode's Runtime API, host:port (required)")
    p.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the SuperNode) exits")
    p.add_argument("--insecure", action="store_true", help="the Runtime API without TLS (loopback)")
    p.add_argument("--root-certificates", default=None, help="PEM file the Runtime API's certificate chains to")
    p.add_argument("--superexec-auth-secret-file", default=None, help="the secret the SuperNode was given")
    p.add_argument("--poll-interval", type=float, default=POLL_INTERVAL_S, help="seconds between asks for a task")
    args = p.parse_args(argv)
    why = misfit()
    if args.check or why is not None:
        if why is not None:
            print(f"fedge's ClientApp launcher does not fit Flower {_flower_version()}: {why}", flush=True)
        raise SystemExit(MISFIT_EXIT if why is not None else 0)
    if not args.runtime_api_address:
        p.error("--runtime-api-address is required")
    if not 0.01 <= args.poll_interval <= 60:
        p.error(f"--poll-interval: expected 0.01 to 60 seconds, got {args.poll_interval:g}")
    # Flower reads its poll interval from the environment only (validated there, in the same range)
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(args.poll_interval)

    import importlib

    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.utils import disable_process_dumping

    disable_process_dumping(strict=False)  # it holds the node's secret and task tokens, as flower-superexec does
    flower = importlib.import_module("flwr.supercore.superexec.run_superexec")
    try:
        secret = load_superexec_auth_secret(secret_file=args.superexec_auth_secret_file)
    except ValueError as err:
        p.error(f"--superexec-auth-secret-file: {err}")
    executor = ForkExecutor(PRELOAD)
    # Flower's loop picks its executor by name from a fixed list (subprocess, kubernetes): give it this one.
    flower.get_executor = lambda *_args, **_kwargs: executor
    flower.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        superexec_auth_secret=secret,
        parent_pid=args.parent_pid,
    )


def _flower_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr")
    except PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
