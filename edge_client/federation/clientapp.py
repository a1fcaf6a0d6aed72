"""The Flower ClientApp: train the global adapter on this device's data, evaluate it, reply with the update.

In a deployment each message runs in a process of its own (forked by fedge's launcher from one that imported
this module, :mod:`fedge.edge_client.federation.launcher`, or a fresh ``flwr-clientapp`` as Flower starts it), so this
module stays light: it reads the message and hands the work to the device's warm worker
(:mod:`fedge.edge_client.federation.worker`), which keeps the model loaded between rounds; without a worker (simulation,
or ``--no-worker``) it does the work itself (:mod:`fedge.edge_client.federation.local_work`). Either way the reply
carries the fixed costs it paid: process start to handler (``startup-seconds``) and getting the model ready
(``load-seconds``).
"""

from __future__ import annotations

import os
import platform
import time

import psutil
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.common import wire
from fedge.edge_client.federation.frozen_a import complete
from fedge.edge_client.federation.settings import Device

app = ClientApp()


def _since_process_start() -> float:
    """Seconds since this process started, read per message: the module may have been imported in the process
    this one was forked from (fedge's launcher, :mod:`fedge.edge_client.federation.launcher`).

    On Linux from the kernel's own clocks (start tick in /proc against CLOCK_BOOTTIME: 10 ms resolution);
    psutil's ``create_time`` adds the boot time, which /proc gives in whole seconds: up to 1 s too much or too
    little on every reading (0.5 s too much on the machine the demo was measured on).
    """
    try:
        with open("/proc/self/stat", "rb") as stat:
            after_name = stat.read().rsplit(b")", 1)[1].split()  # the name may hold spaces and parentheses
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return time.time() - psutil.Process().create_time()


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """Train the received global adapter for the round's steps; reply with the new adapter and the costs."""
    startup = _since_process_start()
    device = Device.from_node_config(context.node_config)
    config = dict(msg.content[wire.CONFIG])
    arrays = wire.from_record(msg.content[wire.ADAPTER])
    rnd = int(config.get(wire.Cfg.ROUND, 0))
    arrays, metrics, warm, holds = _work(device, "train", config, arrays, rnd)
    info = {k: metrics.pop(k) for k in [k for k, v in metrics.items() if isinstance(v, str)]}  # e.g. energy method
    info.update(holds)
    content = RecordDict(
        {
            wire.ADAPTER: wire.to_record(arrays),
            wire.METRICS: MetricRecord({**metrics, wire.Metric.STARTUP_SECONDS: startup, wire.Metric.WARM: warm}),
            wire.CLIENT: _client_info(device, info),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_round(msg: Message, context: Context) -> Message:
    """Held-out loss and exact match of the global adapter on this device's held-out examples."""
    startup = _since_process_start()
    device = Device.from_node_config(context.node_config)
    config = dict(msg.content[wire.CONFIG])
    _, metrics, warm, holds = _work(device, "evaluate", config, wire.from_record(msg.content[wire.ADAPTER]), 0)
    metrics = {**metrics, wire.Metric.STARTUP_SECONDS: startup, wire.Metric.WARM: warm}
    content = RecordDict({wire.METRICS: MetricRecord(metrics), wire.CLIENT: _client_info(device, holds)})
    return Message(content, reply_to=msg)


def _work(device: Device, kind: str, config: dict, arrays: dict, rnd: int) -> tuple[dict, dict, int, dict]:
    """(arrays, metrics, 1 if the warm worker did it else 0, what the reply's client record adds: the LoRA A this
    node holds). A device its background agent holds back (power, heat, network, load, the owner:
    :mod:`fedge.edge_client.agent.hold`) declines at once, so the server need not wait."""
    from fedge.edge_client.agent.hold import held
    from fedge.edge_client.federation.limits import RoundDeclined

    reason = held(device.state_dir)
    if reason is not None:
        raise RoundDeclined(f"{device.name}: not eligible: {reason}")
    arrays, lora_a = complete(arrays, config, device.state_dir)  # A from this node's store if the message left it out
    holds = {wire.Client.LORA_A: lora_a} if lora_a else {}
    if device.worker_port:
        from fedge.edge_client.federation.worker import call

        done = call(device, kind, config, arrays, rnd)
        if done is not None:
            return done[0], done[1], 1, holds
    from fedge.edge_client.federation import local_work

    settings = wire.RoundSettings.from_config(config)
    holder = _holder(device)
    if kind == "train":
        from fedge.edge_client.federation.worker import score_first

        out, metrics = local_work.do_train(holder, device, settings, arrays, rnd, score_first(config))
        return out, metrics, 0, holds
    return {}, local_work.do_evaluate(holder, device, settings, arrays), 0, holds


_HOLDERS: dict[tuple, object] = {}  # this process's model, when it does the work itself (see _holder)


def _holder(device: Device):
    """The model holder of this ClientApp process for ``device``.

    A deployment starts a process per message, so it lives one round; the simulation engine runs many messages in
    one process, where keeping it saves a model load per round.
    """
    from fedge.common.modeling import ModelHolder

    key = (str(device.cache_dir), device.precision, device.threads)
    if key not in _HOLDERS:
        _HOLDERS.clear()  # a device has no memory for two models
        _HOLDERS[key] = ModelHolder(device.cache_dir, device.precision, device.threads)
    return _HOLDERS[key]


def _client_info(device: Device, extra: dict | None = None) -> ConfigRecord:
    return ConfigRecord(
        {
            wire.Client.NAME: device.name,
            wire.Client.DATA: device.data,
            wire.Client.DEVICE: f"{platform.machine()} {psutil.cpu_count()} cpus",
            **(extra or {}),
        }
    )
