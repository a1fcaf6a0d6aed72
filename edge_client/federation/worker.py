"""The warm worker: one long-lived process per device that keeps the base model loaded between rounds.

Flower's SuperNode starts a fresh ClientApp process for every message, which would import torch and load
the model again each round (measured on SmolLM2-135M, 2 cores: 20-45 s per message, more than the training of
a short round). ``fedge client start`` therefore also starts this worker; the ClientApp process stays thin
(Flower and numpy) and hands the round's work to it over an authenticated loopback connection. If the
worker is not there, the ClientApp does the work itself, so a round never depends on it.

    python -m fedge.edge_client.federation.worker --state DIR --port N --cache-dir DIR [--model M] [--precision P]
    [--threads T]
"""

from __future__ import annotations

import argparse
import logging
import secrets
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path

from fedge.common import wire
from fedge.edge_client.federation.limits import RoundDeclined

KEY_FILE = "worker.key"
log = logging.getLogger("fedge.worker")


def auth_key(state_dir: Path) -> bytes:
    """The worker's shared secret (created once, readable by this user only)."""
    path = state_dir / KEY_FILE
    if not path.is_file():
        from fedge.common.fsutil import atomic_write_bytes

        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, secrets.token_hex(32).encode())
        path.chmod(0o600)
    return path.read_bytes()


def call(device, kind: str, config: dict, arrays: dict, rnd: int) -> tuple[dict, dict] | None:
    """Ask the device's worker to do a round's work: (arrays, metrics), or None if no worker answers.

    A round the worker declined (no plan fits, the agent's hold) is raised here as `RoundDeclined` with its reason,
    so the server records a decline; any other error in the worker as ``RuntimeError`` with one line saying what
    failed (its traceback is in the worker's log).
    """
    try:
        conn = Client(("127.0.0.1", device.worker_port), authkey=auth_key(device.state_dir))
    except (OSError, EOFError, AuthenticationError):  # not there, or not ours: do the work in-process
        return None
    with conn:
        conn.send({"kind": kind, "node": device.to_node_config(), "config": config, "arrays": arrays, "round": rnd})
        reply = conn.recv()
    if "error" in reply:
        if reply.get("declined"):
            raise RoundDeclined(reply["error"])
        raise RuntimeError(f"the worker failed: {reply['error']}")
    return reply["arrays"], reply["metrics"]


def serve(state_dir: Path, port: int, model: str | None, precision: str, threads: int, cache_dir: Path) -> None:
    """Answer work requests one at a time, forever; the model loads once, up front when ``model`` is given."""
    from fedge.common.modeling import ModelHolder

    listener = Listener(("127.0.0.1", port), authkey=auth_key(state_dir))
    log.info("worker listening on 127.0.0.1:%d", port)
    holder = ModelHolder(cache_dir, precision, threads)  # the model this worker keeps between rounds
    if model:
        t0 = time.time()
        holder.base(model)
        log.info("%s loaded in %.1f s", model, time.time() - t0)
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError):  # a wrong key, or a peer gone mid-handshake (a port probe)
            continue
        with conn:
            try:
                request = conn.recv()
                conn.send(_handle(holder, request))
            except (EOFError, OSError):
                continue  # the ClientApp went away mid-request (its process was killed)


def _handle(holder, request: dict) -> dict:
    from fedge.edge_client.federation import local_work
    from fedge.edge_client.federation.settings import Device

    try:
        device = Device.from_node_config(request["node"])
        settings = wire.RoundSettings.from_config(request["config"])
        if request["kind"] == "train":
            arrays, metrics = local_work.do_train(
                holder, device, settings, request["arrays"], request["round"], score_first(request["config"])
            )
            return {"arrays": arrays, "metrics": metrics}
        return {"arrays": {}, "metrics": local_work.do_evaluate(holder, device, settings, request["arrays"])}
    except RoundDeclined as declined:  # not a failure: the device sits the round out, and says why
        return {"error": str(declined), "declined": True}
    except Exception as err:  # noqa: BLE001 (sent back to the ClientApp, which reports it to the server)
        log.warning("the %s work failed", request.get("kind") if isinstance(request, dict) else "", exc_info=True)
        return {"error": one_line(err)}


def one_line(err: BaseException) -> str:
    """What failed, in one line for the server's records and a device owner: ``Kind: message`` (the traceback
    belongs in the log)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__


def score_first(config: dict) -> bool:
    """Whether the round asks the client to score the received adapter before training (`wire.Cfg.SCORE_FIRST`)."""
    return config.get(wire.Cfg.SCORE_FIRST) == 1


def main() -> None:
    p = argparse.ArgumentParser(description="fedge's warm worker (started by `fedge client start`)")
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--model", default=None, help="base model to load before the first round")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(args.state, args.port, args.model, args.precision, args.threads, args.cache_dir)


if __name__ == "__main__":
    main()
