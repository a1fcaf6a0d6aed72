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


class ForkExecutor:
    """Flower's ``Executor`` protocol (``flwr.supercore.superexec.executor.types``): ClientApp tasks run in a
    process forked from the fork server; any other task type in Flower's subprocess executor."""

    def __init__(self, preload: list[str]) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(preload)
        self.others = SubprocessExecutor()
        self.running: list[multiprocessing.process.BaseProcess] = []
        warm = self.context.Process(target=_nothing, name="fedge-launcher-warmup")  # start the fork server now
        warm.start()
        warm.join()

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
        for process in [p for p in self.running if p.exitcode is not None]:
            process.close()
            self.running.remove(process)

    def close(self) -> None:
        """Stop the ClientApps still running (SIGTERM: each reports its task failed): the launcher goes when its
        SuperNode does, and their work has nowhere to go."""
        for process in self.running:
            if process.exitcode is None:
                process.terminate()


def _nothing() -> None:
    pass


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m fedge.edge_client.federation.launcher", description=__doc__.split("\n")[0]
    )
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    p.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the SuperNode) exits")
    p.add_argument("--insecure", action="store_true", help="the Runtime API without TLS (loopback)")
    p.add_argument("--root-certificates", default=None, help="PEM file the Runtime API's certificate chains to")
    p.add_argument("--superexec-auth-secret-file", default=None, help="the secret the SuperNode was given")
    p.add_argument("--poll-interval", type=float, default=POLL_INTERVAL_S, help="seconds between asks for a task")
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
