"""Every setting survives every path it travels: CLI flags, a TOML config file, Flower's run config and node config.

Each settings class gets a value for every field that differs from its default; a field that a path drops or
garbles comes back as its default (or fails), and the comparison names it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from fedge.cli import build_parser
from fedge.common import settings as S
from fedge.common.wire import RoundSettings
from fedge.demo import DEMO_SETS, DemoSettings, write_config
from fedge.edge_client.federation.service import ClientSettings, prepare_device, supernode_command
from fedge.edge_client.federation.settings import Device
from fedge.server.settings import ServerSettings

# A value other than the default for every field: the round trip must carry each one.
NON_DEFAULT = {
    RoundSettings: dict(
        model="some/model", steps=7, lr=0.01, batch=3, seq_len=96, seed=5, lora_r=4, lora_alpha=12,
        lora_targets="q_proj,v_proj", eval_examples=9, lora_merge="svd", lora_freeze_a=False, deadline_s=120.5,
        codec="int8",
        plan="",  # a pinned plan must be a real plan: tested on its own in test_local_work
    ),
    ServerSettings: dict(
        rounds=9, min_clients=3, address="10.0.0.1:9000", state=Path("/tmp/state"), stage_deadline=321.0,
        norm_factor=5.0, max_change_rms=0.5, insecure=True, server_lr=1.5, ssl_certfile=Path("/c.pem"),
        ssl_keyfile=Path("/k.pem"), ssl_ca_certfile=Path("/ca.pem"), auth_key=[Path("/a.pub"), Path("/b.pub")],
        clientapp="my.mods:app", norm_floor=0.02, max_share=0.6, examples_growth=3.0, aggregation="trimmed-mean",
        trim=0.1, krum_f=2, clip_rms=0.5, clip_factor=4.0, retry_after=60.0, eval_every=2, eval_in_train=False,
    ),
    ClientSettings: dict(
        server="10.0.0.1:9000", model="none", root_certificates=Path("/ca.pem"), auth_key=Path("/node.key"),
        max_retries=4, worker=False, launcher=False, unreachable_after=5.0,
    ),
    Device: dict(
        name="clinic-3", data="/data/notes.jsonl", eval_data="/data/held.jsonl", state_dir=Path("/var/fedge"),
        cache_dir=Path("/cache"), precision="int4", threads=2, worker_port=4321, profile="pi4-2gb",
        emulated_time="virtual", energy_budget_j=1500.0, turns="/run/fedge/turns:2",
    ),
    DemoSettings: dict(clients=2, devices=["pi4-2gb", "laptop"], out=Path("/tmp/demo-out"), simulation=2,
                       launcher=False),
}  # fmt: skip


@pytest.mark.parametrize("cls", list(NON_DEFAULT), ids=lambda c: c.__name__)
def test_every_field_differs_from_its_default_here(cls):
    obj, default = cls(**NON_DEFAULT[cls]), _default(cls)
    same = [f.name for f in dataclasses.fields(cls) if getattr(obj, f.name) == getattr(default, f.name)]
    assert same in ([], ["plan"]), f"pick non-default values for {same}"
    assert set(NON_DEFAULT[cls]) == {f.name for f in dataclasses.fields(cls)}, "a field is missing from NON_DEFAULT"


@pytest.mark.parametrize("cls", list(NON_DEFAULT), ids=lambda c: c.__name__)
def test_flags_round_trip(cls):
    obj = cls(**NON_DEFAULT[cls])
    parser = argparse.ArgumentParser()
    S.add_flags(parser, cls)
    _same(S.resolve(cls, None, parser.parse_args(S.to_argv(obj))), obj)


@pytest.mark.parametrize("cls", list(NON_DEFAULT), ids=lambda c: c.__name__)
def test_toml_round_trip(cls, tmp_path):
    obj = cls(**NON_DEFAULT[cls])
    path = write_config(tmp_path / "c.toml", section=obj)
    _same(S.resolve(cls, S.read_toml(path)["section"], None, str(path)), obj)


@pytest.mark.parametrize("cls", list(NON_DEFAULT), ids=lambda c: c.__name__)
def test_flower_config_round_trip(cls):
    obj = cls(**NON_DEFAULT[cls])
    config = S.to_config(obj)
    assert all(isinstance(v, str | int | float | bool) for v in config.values())  # what Flower's records hold
    _same(S.from_config(cls, config), obj)


def test_the_commands_offer_every_setting_and_flags_override_the_file(tmp_path):
    parser = build_parser()
    r, server = RoundSettings(**NON_DEFAULT[RoundSettings]), ServerSettings(**NON_DEFAULT[ServerSettings])
    path = write_config(tmp_path / "fed.toml", round=r, server=server)
    args = parser.parse_args(["server", "start", "--config", str(path), "--steps", "11", "--no-lora-freeze-a"])
    from fedge.cli import _config_file, _settings

    config = _config_file(args, ("round", "server"))
    _same(_settings(RoundSettings, args, "round", config), dataclasses.replace(r, steps=11))
    _same(_settings(ServerSettings, args, "server", config), server)
    args = parser.parse_args(["server", "start", *S.to_argv(r), *S.to_argv(server)])
    _same(_settings(RoundSettings, args, "round"), r)
    _same(_settings(ServerSettings, args, "server"), server)
    client, device = ClientSettings(**NON_DEFAULT[ClientSettings]), Device(**NON_DEFAULT[Device])
    runtime = ("cache_dir", "worker_port")  # set by `fedge client start` itself, not flags
    args = parser.parse_args(["client", "start", *S.to_argv(client), *S.to_argv(device, skip=runtime)])
    _same(_settings(ClientSettings, args, "client"), client)
    back = _settings(Device, args, "device")
    _same(dataclasses.replace(back, cache_dir=device.cache_dir, worker_port=device.worker_port), device)
    demo = DemoSettings(**NON_DEFAULT[DemoSettings])
    args = parser.parse_args(["demo", *S.to_argv(demo), *S.to_argv(r), *S.to_argv(server, skip=DEMO_SETS)])
    _same(_settings(DemoSettings, args, "demo"), demo)
    _same(_settings(RoundSettings, args, "round"), r)
    got, kept = _settings(ServerSettings, args, "server"), {f.name for f in dataclasses.fields(ServerSettings)}
    assert {k: getattr(got, k) for k in kept - set(DEMO_SETS)} == {k: getattr(server, k) for k in kept - set(DEMO_SETS)}


def test_a_device_reaches_the_clientapp_whole_through_the_supernodes_node_config(tmp_path):
    from flwr.common.config import parse_config_args

    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n')
    values = {**NON_DEFAULT[Device], "data": str(data), "eval_data": str(data), "state_dir": tmp_path / "state",
              "profile": "base=pi5-8gb,slowdown=2"}  # fmt: skip
    device = prepare_device(Device(**values))
    cmd, _ = supernode_command(ClientSettings("127.0.0.1:9092"), device)
    node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])  # as the SuperNode reads it
    _same(Device.from_node_config({**node_config, "partition-id": 0}), device)  # Flower's own keys are left alone


def test_unknown_keys_and_wrong_types_name_the_file_and_key(tmp_path):
    path = tmp_path / "fed.toml"
    path.write_text("[round]\nstepz = 3\n")
    with pytest.raises(ValueError, match=r"fed.toml \[round\]: unknown setting 'stepz'"):
        S.resolve(RoundSettings, S.read_toml(path)["round"], None, f"{path} [round]")
    with pytest.raises(ValueError, match="steps: expected int, got 'three'"):
        S.resolve(RoundSettings, {"steps": "three"}, None, "fed.toml [round]")
    path.write_text("[round\n")
    with pytest.raises(ValueError, match="fed.toml: not valid TOML"):
        S.read_toml(path)


def _default(cls):
    required = {"data": "x"} if cls is Device else {}
    return cls(**required)


def _same(got, want) -> None:
    diffs = {f.name: (getattr(got, f.name), getattr(want, f.name)) for f in dataclasses.fields(want)
             if getattr(got, f.name) != getattr(want, f.name)}  # fmt: skip
    assert not diffs, f"fields lost or changed on the way (got, want): {diffs}"


@pytest.mark.parametrize(
    ("text", "argv", "expected"),
    [
        ("[round]\nstepz = 3\n", [], "[round]: unknown setting 'stepz'"),  # named once, brackets kept
        ("round = 5\n", [], "'round' must be a table"),
        ("[[server]]\nrounds = 2\n", [], "'server' must be a table"),
        ("[devices]\n", [], "unknown 'devices'"),
        ("[server]\nrounds = 'three'\n", [], "[server]: rounds: expected int, got 'three'"),
        ("", ["--rounds", "0"], "bad server setting: rounds must be >= 1"),
        ("", ["--lr", "inf"], "bad round setting: lr must be a finite number > 0"),
        ("", ["--deadline", "nan"], "bad round setting: deadline_s must be a finite number >= 0"),
    ],
)
def test_a_bad_config_or_flag_is_one_clear_line(text, argv, expected, tmp_path, capsys):
    from fedge.cli import main

    path = tmp_path / "fed.toml"
    path.write_text(text)
    code = main(["server", "start", "--config", str(path), "--state", str(tmp_path / "s"), *argv])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and expected in err and "Traceback" not in err and err.count(str(path)) <= 1
    assert not (tmp_path / "s").exists()


def test_a_resumed_federation_must_keep_its_lora_scale():
    assert RoundSettings(lora_r=16).defining()["lora_alpha"] == 32
    assert RoundSettings(lora_r=16, lora_alpha=64).defining() != RoundSettings(lora_r=16).defining()


def test_a_config_naming_the_old_clientapp_path_runs_fedges_clientapp_and_says_so(caplog):
    """fedge 0.2 named its ClientApp fedge.edge_client.flower_client:app; config files written then keep working."""
    import importlib
    import warnings

    from fedge.server.settings import CLIENTAPP, OLD_CLIENTAPP

    assert ServerSettings(clientapp=OLD_CLIENTAPP).clientapp == CLIENTAPP
    assert f"is now {CLIENTAPP}" in caplog.text
    module, _, attr = OLD_CLIENTAPP.partition(":")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.reload(importlib.import_module(module))
    new_module, _, _ = CLIENTAPP.partition(":")
    assert getattr(old, attr) is getattr(importlib.import_module(new_module), attr)
    assert any(issubclass(w.category, DeprecationWarning) and new_module in str(w.message) for w in caught)
