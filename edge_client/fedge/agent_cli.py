"""``fedge agent``: run the background device agent, install it as a service, and talk to it.

    fedge agent run --config device.toml           # what the service runs (foreground)
    fedge agent install [--system] --config device.toml
    fedge agent status [--json] --config device.toml
    fedge agent pause | resume | stop | logs --config device.toml
    fedge agent uninstall --config device.toml

The config file has the tables ``[client]`` (how it joins), ``[device]`` (what it is and holds), ``[conditions]``
(when it may train: `fedge.edge_client.agent.conditions.RunConditions`) and ``[agent]`` (`AgentSettings`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from fedge.cli_common import _cache, _check_writable_dir, _config_file, _say, _settings, console
from fedge.common.errors import FedgeError

TABLES = ("client", "device", "conditions", "agent")


def add_agent_commands(sub) -> None:
    from fedge.common.settings import add_flags
    from fedge.edge_client.agent.conditions import RunConditions
    from fedge.edge_client.agent.daemon import AgentSettings
    from fedge.edge_client.federation.service import ClientSettings
    from fedge.edge_client.federation.settings import Device

    agent = sub.add_parser("agent", help="the background agent: trains when the device allows it").add_subparsers(
        title="agent commands"
    )
    config_help = "the agent's TOML file: [client], [device], [conditions], [agent] tables; flags override it"
    run = agent.add_parser("run", help="run the agent in the foreground (what the installed service runs)")
    run.add_argument("--config", type=Path, help=config_help)
    add_flags(run.add_argument_group("client: how this device joins"), ClientSettings)
    add_flags(run.add_argument_group("device: what it is and holds"), Device, skip=("cache_dir", "worker_port"))
    add_flags(run.add_argument_group("conditions: when it may train"), RunConditions)
    add_flags(run.add_argument_group("agent"), AgentSettings)
    run.set_defaults(run=cmd_agent_run)

    for name, text in (("status", "what the agent is doing, and why"), ("pause", "hold training until resume"),
                       ("resume", "allow training again (when the conditions hold)"), ("stop", "stop the agent"),
                       ("logs", "the agent's log files, and their last lines")):  # fmt: skip
        p = agent.add_parser(name, help=text)
        p.add_argument("--config", type=Path, help="the agent's config file (finds its state directory)")
        p.add_argument("--state", type=Path, help="the device's state directory (instead of --config)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the status as JSON")
        p.set_defaults(run=cmd_agent_talk, command=name)

    for name, text in (("install", "install and start the agent as a service (systemd, launchd)"),
                       ("uninstall", "stop and remove the agent's service")):  # fmt: skip
        p = agent.add_parser(name, help=text)
        p.add_argument("--config", type=Path, required=True, help="the agent's config file")
        scope = p.add_mutually_exclusive_group()
        scope.add_argument("--user", dest="scope", action="store_const", const="user", help="for this user (default)")
        scope.add_argument("--system", dest="scope", action="store_const", const="system", help="system-wide (root)")
        p.add_argument("--unit-dir", type=Path, default=None, help="write the unit here instead (packaging, tests)")
        p.add_argument("--no-start", action="store_true", help="only write (remove) the unit file")
        p.set_defaults(run=cmd_agent_service, command=name, scope="user")


def _agent_parts(args):
    """(client, device, conditions, agent settings) from the config file and the flags."""
    import dataclasses

    from fedge.edge_client.agent.conditions import RunConditions
    from fedge.edge_client.agent.daemon import AgentSettings
    from fedge.edge_client.federation.service import ClientSettings
    from fedge.edge_client.federation.settings import Device

    config = _config_file(args, TABLES)
    client = _settings(ClientSettings, args, "client", config)
    device = _settings(Device, args, "device", config)
    if getattr(args, "cache_dir", None) is not None:
        device = dataclasses.replace(device, cache_dir=args.cache_dir)
    return (
        client,
        device,
        _settings(RunConditions, args, "conditions", config),
        _settings(AgentSettings, args, "agent", config),
    )


def cmd_agent_run(args) -> int:
    import signal

    from fedge.edge_client.agent.daemon import Agent, setup_logging
    from fedge.edge_client.federation.service import Supervisor

    client, device, conditions, settings = _agent_parts(args)
    if not client.server:
        raise FedgeError("--server is required (the server's HOST:PORT), or server in the config's [client] table")
    _check_writable_dir(device.state_dir, "--state")
    args.cache_dir = _cache(args)
    setup_logging(device.state_dir.resolve(), settings.log_mb)
    supervisor = Supervisor(client, device, _say, log_path=device.state_dir.resolve() / "supernode.log")
    agent = Agent(supervisor, conditions, settings)

    def on_signal(signum, _frame) -> None:
        agent.stopping.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _say(f"agent for {device.name}: status with `fedge agent status --state {supervisor.device.state_dir}`")
    return agent.run()


def _state_dir(args) -> Path:
    if args.state is not None:
        return args.state
    if args.config is None:
        raise FedgeError("give --config (the agent's config file) or --state (its device's state directory)")
    from fedge.edge_client.federation.settings import Device

    return _settings(Device, _NoFlags(args.config), "device", _config_file(args, TABLES)).state_dir


class _NoFlags:
    """An argparse namespace with only ``config``: settings from the file alone."""

    def __init__(self, config: Path) -> None:
        self.config = config


def cmd_agent_talk(args) -> int:
    from fedge.edge_client.agent.daemon import LOGS, request, socket_path

    state_dir = _state_dir(args)
    if args.command == "logs":
        for name in LOGS:
            path = state_dir / name
            console.print(f"[bold]{path}[/]")
            if path.is_file():
                print("\n".join(path.read_text(errors="replace").splitlines()[-20:]))
        return 0
    try:
        reply = request(socket_path(state_dir), args.command)
    except (OSError, ValueError):
        raise FedgeError(f"no agent is running for {state_dir} (start it: fedge agent run, or install it)") from None
    if "error" in reply:
        raise FedgeError(reply["error"])
    if args.command == "stop":
        console.print(f"the agent of {state_dir} is stopping")
    elif getattr(args, "json", False):
        print(json.dumps(reply, indent=1))
    else:
        _print_status(reply)
    return 0


def _print_status(status: dict) -> None:
    say = functools.partial(console.print, soft_wrap=True, highlight=False)  # a line per item, however narrow
    state = status.get("state", "?")
    say(f"[bold]{status.get('device', '?')}[/] -> {status.get('server', '?')}: [bold]{state}[/]"
                  + (f" ({status['reason']})" if status.get("reason") else ""))  # fmt: skip
    current = status.get("round")
    if current and current.get("kind") == "train":
        say(f"  training round {current.get('round')}, step {current.get('step')} of {current.get('steps')}")
    elif current:
        say(f"  evaluating round {current.get('round')}")
    say(f"  model {status.get('model', '?')}")
    for r in status.get("readings", []):
        mark = {True: "[green]ok[/]", False: "[red]no[/]", None: "[yellow]unknown[/]"}[r.get("ok")]
        say(f"  {r.get('name'):8} {mark}  {r.get('detail')}  [dim]({r.get('source')})[/]")
    for r in status.get("rounds", [])[-5:]:
        cost = [
            f"{r['seconds']:.0f} s" if isinstance(r.get("seconds"), (int, float)) else None,
            f"{r['energy_j']:.0f} J" if isinstance(r.get("energy_j"), (int, float)) else None,
            f"{r['upload_bytes'] / 1e6:.1f} MB up" if isinstance(r.get("upload_bytes"), (int, float)) else None,
        ]
        cost_text = ", ".join(c for c in cost if c)
        say(f"  round {r.get('round')}: {r.get('kind')}, {r.get('step')} of {r.get('steps')} steps"
            + (f" ({cost_text})" if cost_text else ""))  # fmt: skip


def cmd_agent_service(args) -> int:
    from fedge.edge_client.agent.units import Service, install, uninstall
    from fedge.edge_client.federation.settings import Device

    config = args.config.resolve()
    if not config.is_file():
        raise FedgeError(f"--config {config}: no such file")
    device = _settings(Device, _NoFlags(config), "device", _config_file(args, TABLES))
    service = Service(device.name, config, args.scope, args.unit_dir)
    if args.command == "install":
        _agent_parts(_NoFlags(config))  # the whole file must be valid before a service runs it at every boot
        install(service, start=not args.no_start, say=_say)
    else:
        uninstall(service, stop=not args.no_start, say=_say)
    return 0
