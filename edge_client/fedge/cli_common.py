"""What the command's subcommands share: the console, its one-line messages, and settings from flags and config
files (`fedge.common.settings`)."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fedge.common.errors import FedgeError

console = Console(stderr=True)


def _cache(args) -> Path:
    from fedge.common.models import default_cache_dir

    return args.cache_dir or default_cache_dir()


def _say(msg: str) -> None:
    console.print(f"[dim]{escape(msg)}[/]", soft_wrap=True)  # one line, however narrow the console


def _settings(cls, args, table: str, config: dict | None = None, check=None):
    """``cls`` from its defaults, the config file's ``[table]`` and the flags; a bad value is a FedgeError naming
    the file and key (a bad key or type in the file) or the setting and its flag or key (a value out of range).
    ``check``: limits beyond ``cls``'s own (`fedge.common.settings.resolve`)."""
    from fedge.common.settings import resolve

    where = f"{args.config} [{table}]" if getattr(args, "config", None) else f"[{table}]"
    try:
        return resolve(cls, (config or {}).get(table), args, where, check)
    except (ValueError, TypeError) as err:
        message = str(err)
        raise FedgeError(message if message.startswith(where) else f"bad {table} setting: {message}") from None


def _config_file(args, tables: tuple[str, ...]) -> dict:
    """The ``--config`` file's tables (only ``tables`` allowed); {} without one."""
    from fedge.common.settings import read_toml

    if not getattr(args, "config", None):
        return {}
    try:
        config = read_toml(args.config)
    except ValueError as err:
        raise FedgeError(str(err)) from None
    for key, value in config.items():
        if key not in tables:
            raise FedgeError(f"{args.config}: unknown {key!r}; expected the tables {', '.join(tables)}")
        if not isinstance(value, dict):
            raise FedgeError(f"{args.config}: {key!r} must be a table ([{key}] and its keys), got {value!r}")
    return config


def _check_writable_dir(path: Path, flag: str) -> None:
    """FedgeError (one line) unless ``path`` is, or can be made, a directory this process can write in.

    Leaves nothing behind: it probes the nearest existing ancestor with a directory it removes at once, so a later
    refusal (a port in use, a bad certificate) still finds nothing written.
    """
    import tempfile

    path = Path(os.path.abspath(path.expanduser()))
    existing = path
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise FedgeError(f"{flag} {path}: {existing} is a file, not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".fedge-probe-", dir=existing))
    except OSError as err:
        where = "there" if existing == path else f"in {existing}"
        raise FedgeError(f"{flag} {path}: cannot write {where} ({err.strerror or err})") from None
