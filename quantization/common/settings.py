"""Every setting defined once: a dataclass field with its default and help, from which the rest is generated.

A settings class is a ``@dataclass`` whose fields are made with :func:`setting` and which validates itself in
``__post_init__`` (ValueError naming the field). From it come, without a name or default typed twice:

- CLI flags (:func:`add_flags`): ``--seq-len`` for ``seq_len``, or the field's own ``flag``; a flag the user
  did not give is absent from the parsed namespace, so it never overrides a config file;
- a TOML table (:func:`to_toml_table`, :func:`from_table`): keys are the field names; an unknown key is an error
  naming the file and the key;
- Flower's run config, node config and ConfigRecords (:func:`to_config`, :func:`from_config`): keys are the field
  names with hyphens, values Flower's scalar types (a ``None`` is left out and reads back as ``None``).

:func:`resolve` builds a settings object from the defaults, a TOML table and the flags, in that order.
Supported field types: ``str``, ``int`` (64 bits, as Flower's configs hold), ``float``, ``bool``, ``Path``,
``X | None`` of those, and ``list[str]`` / ``list[Path]`` (a repeated flag; a list in TOML; comma-joined in a
Flower config).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_SCALARS = (str, int, float, bool, Path)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None, **argparse_kw: Any) -> Any:
    """A settings field. ``flag``: the CLI flag when it is not ``--field-name``; ``argparse_kw``: ``choices``,
    ``metavar``. A list default is copied per instance."""
    meta = {"help": help, "flag": flag, "argparse": argparse_kw}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """(field, its type without ``| None``) for every init field; ``list[...]`` stays a list type."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        out.append((f, tp))
    return out


def _item_type(tp: type) -> type | None:
    """``X`` for ``list[X]``, else None."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def config_key(name: str) -> str:
    """The Flower config key of a field name: ``seq_len`` -> ``seq-len``."""
    return name.replace("_", "-")


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + config_key(f.name)


# --- CLI flags ------------------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (but ``skip``), its help ending in the default; absent flags stay unset."""
    for f, tp in _fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        shown = "" if default in (None, "", []) else f"; default: {default}"
        key = f"; config key: {f.name}" if flag_of(f) != "--" + config_key(f.name) else ""
        helptext = f.metadata["help"] + (f" ({(shown + key)[2:]})" if shown or key else "")
        helptext = helptext.replace("%", "%%")  # argparse formats help with %: "battery %" is text
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": helptext}
        kw.update(f.metadata.get("argparse") or {})
        item = _item_type(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif item is not None:
            kw.update(action="append", type=item)
        else:
            kw["type"] = tp
        if tp is not bool and "choices" not in kw:
            kw.setdefault("metavar", flag_of(f)[2:].upper().replace("-", "_"))
        parser.add_argument(flag_of(f), **kw)


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for a flag no settings class defines: an integer in ``low..high`` (``high`` None: no limit).
    A mistake reads ``must be >= 1, got 0`` after the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be {f'>= {low}' if high is None else f'in {low}..{high}'}, got {value}"
            )
        return value

    return parse


def number(low: float, *, strict: bool) -> Callable[[str], float]:
    """An argparse type for a flag no settings class defines: a finite number above ``low`` (``strict``) or at least
    ``low``; nan and inf never are."""
    relation = ">" if strict else ">="

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise argparse.ArgumentTypeError(f"must be a finite number {relation} {low:g}, got {text}")
        return value

    return parse


def to_argv(obj: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that make :func:`add_flags`' parser give back ``obj``'s values (every field but ``skip``)."""
    argv: list[str] = []
    for f, tp in _fields(type(obj)):
        value = getattr(obj, f.name)
        if value is None or f.name in skip:
            continue
        if tp is bool:
            argv.append(flag_of(f) if value else "--no-" + flag_of(f)[2:])
        elif _item_type(tp) is not None:
            for item in value:
                argv += [flag_of(f), str(item)]
        else:
            argv += [flag_of(f), str(value)]
    return argv


# --- TOML -----------------------------------------------------------------------------------------------------


def read_toml(path: Path) -> dict:
    """A TOML file's tables; ValueError naming the file and what is wrong."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None


def from_table(cls: type, table: dict, where: str) -> dict:
    """A TOML table's values for ``cls`` (field name -> value, paths as Path); ValueError naming ``where`` and the
    key for an unknown key or a value of the wrong type."""
    fields = dict((f.name, tp) for f, tp in _fields(cls))
    out = {}
    for key, value in table.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown setting {key!r}; expected some of {', '.join(sorted(fields))}")
        out[key] = _convert(value, fields[key], f"{where}: {key}")
    return out


def to_toml_table(obj: Any) -> dict:
    """``obj`` as a TOML table (None left out, paths as strings)."""
    out = {}
    for f, _ in _fields(type(obj)):
        value = getattr(obj, f.name)
        if value is not None:
            out[f.name] = [str(v) for v in value] if isinstance(value, list) else _plain(value)
    return out


# --- Flower configs -------------------------------------------------------------------------------------------


def to_config(obj: Any) -> dict[str, Any]:
    """``obj`` as a Flower config (run config, node config, ConfigRecord): hyphenated keys, scalar values."""
    out = {}
    for f, _ in _fields(type(obj)):
        value = getattr(obj, f.name)
        if value is not None:
            out[config_key(f.name)] = ",".join(map(str, value)) if isinstance(value, list) else _plain(value)
    return out


def from_config(cls: type[T], config: Any) -> T:
    """``cls`` from a Flower config; keys it does not know are left alone (Flower adds its own), a missing one
    keeps its default. ValueError naming the key for a value of the wrong type, and ``cls``'s own checks."""
    values = {}
    for f, tp in _fields(cls):
        key = config_key(f.name)
        if key in config:
            value = config[key]
            if _item_type(tp) is not None and isinstance(value, str):
                value = [v for v in value.split(",") if v]
            values[f.name] = _convert(value, tp, f"config {key!r}")
    return cls(**values)


# --- together -------------------------------------------------------------------------------------------------


def resolve(
    cls: type[T],
    table: dict | None = None,
    args: argparse.Namespace | None = None,
    where: str = "",
    check: Callable[[T], None] | None = None,
) -> T:
    """``cls`` from its defaults, then a TOML table (``where`` names it in errors), then the flags given.

    ``check``: limits beyond ``cls``'s own. A ValueError from either that names a field first (``steps must be >= 1,
    got 0``) ends naming where the value came from: ``(--steps)``, or ``(where, key steps)``.
    """
    values = from_table(cls, table or {}, where or cls.__name__)
    fields = {f.name: (f, tp) for f, tp in _fields(cls)}
    given = {k: v for k, v in vars(args or argparse.Namespace()).items() if k in fields}
    values.update({k: _fits(v, flag_of(fields[k][0])) for k, v in given.items()})
    try:
        obj = cls(**values)
        if check is not None:
            check(obj)
    except ValueError as err:
        named = re.match(r"\w+", str(err))  # the field a settings check names first
        name = named.group() if named else ""
        if name in given:
            raise ValueError(f"{err} ({flag_of(fields[name][0])})") from None
        if name in (table or {}) and where:
            raise ValueError(f"{err} ({where}, key {name})") from None
        raise
    return obj


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _convert(value: Any, tp: type, where: str) -> Any:
    """``value`` as ``tp`` (a scalar or a list type); ValueError naming ``where`` if it is not one."""
    item = _item_type(tp)
    if item is not None:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item, where) for v in value]
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in _SCALARS and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return _fits(value, where)
    raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")


def _fits(value: Any, where: str) -> Any:
    """``value``, unless it is an int Flower's configs cannot hold (they are 64-bit): ValueError naming ``where``."""
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ValueError(f"{where}: expected an integer that fits in 64 bits (Flower's configs), got {value}")
    return value
