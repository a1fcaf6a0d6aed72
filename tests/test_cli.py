"""The ``fedge`` command as a user runs it: a real adapter from a JSONL file, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedge.cli import main
from fedge.common.adapters import META_FILE, read_meta


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def user_data(tmp_path):
    from fedge.edge_client.training.demo_data import generate

    return _jsonl(tmp_path / "my.jsonl", generate("finance", "train", n=120))


def test_train_on_a_users_jsonl_lowers_heldout_loss_and_saves_a_peft_adapter(tiny_model_dir, user_data, tmp_path):
    out = tmp_path / "adapter"
    code = main(
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "train",
            "--data",
            str(user_data),
            "--model",
            str(tiny_model_dir),
            "--steps",
            "15",
            "--lr",
            "1e-2",
            "--rank",
            "8",
            "--batch",
            "8",
            "--targets",
            "q_proj,v_proj,up_proj,down_proj",
            "--precision",
            "fp32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    meta = read_meta(out)
    assert meta["metrics"]["after"]["loss"] < meta["metrics"]["before"]["loss"] - 0.3
    assert meta["lora"]["r"] == 8 and len(meta["data"]["fingerprint"]) == 64 and meta["data"]["examples"] == 108
    assert not (tmp_path / ".adapter.progress").exists()  # resumable state is removed once the adapter is saved

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, out)  # plain PEFT format
    assert any("lora_A" in n for n, _ in loaded.named_parameters())

    code = main(
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "eval",
            "--data",
            str(user_data),
            "--adapter",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--precision",
            "fp32",
            "--limit",
            "20",
        ]
    )
    assert code == 0


BAD_INPUTS = {
    "malformed JSONL": ('{"text": "a"}\n{oops\n', "my.jsonl:2: not valid JSON"),
    "empty file": ("", "my.jsonl: no examples"),
    "wrong fields": ('{"question": "q", "answer": "a"}\n', "my.jsonl:1: expected one of the fields"),
    "non-UTF-8 bytes": (b'{"text": "\xff\xfe"}\n', "my.jsonl:1: not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_data_is_one_clear_line_and_exit_2(case, tmp_path, tiny_model_dir, capsys):
    content, expected = BAD_INPUTS[case]
    data = tmp_path / "my.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = main(["train", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "ad")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data", "MISSING.jsonl"], "no such file"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "/nonexistent/model.gguf"], "no such file or directory"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--out", "FILE/adapter"], "cannot write the adapter here"),
    ],
)
def test_bad_arguments_are_clear_errors(args, expected, user_data, tmp_path, tiny_model_dir, capsys):
    blocker = tmp_path / "FILE"
    blocker.write_text("a file, so nothing can be created below it")
    argv = [
        "--cache-dir",
        str(tmp_path / "cache"),
        "train",
        "--data",
        str(user_data),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "ad"),
    ]
    for flag, value in zip(args[::2], args[1::2]):
        value = str(tmp_path / value) if value.startswith(("MISSING", "FILE")) else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


def test_data_sample_and_export(tmp_path, capsys):
    assert main(["data", "sample", "iot", "--n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["output"] for line in lines)
    out = tmp_path / "sub" / "iot.jsonl"
    assert main(["data", "export", "iot", str(out), "--split", "test"]) == 0
    assert len(out.read_text().splitlines()) > 10
    assert main(["data", "sample", "mars"]) == 2
    assert "mars" in capsys.readouterr().err


def test_eval_rejects_a_directory_that_is_not_an_adapter(tmp_path, user_data, capsys):
    code = main(["eval", "--data", str(user_data), "--adapter", str(tmp_path)])
    assert code == 2 and "not an adapter directory" in capsys.readouterr().err


def test_console_script_runs_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fedge", "train", "--data", str(tmp_path / "x.jsonl")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "no such file" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["client", "start", "--help"], ["server", "start", "--help"], ["export", "--help"],
     ["generate", "--help"], ["--version"]],
)  # fmt: skip
def test_help_and_version_do_not_import_torch(argv):
    # `fedge --help` on a Raspberry Pi should answer at once: torch alone takes seconds to import there.
    code = (
        f"import sys\nfrom fedge.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'flwr', 'onnxruntime') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_version_is_the_packages():
    import fedge

    done = subprocess.run([sys.executable, "-m", "fedge", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"fedge {fedge.__version__}" and fedge.__version__.count(".") == 2


def test_meta_file_name_is_stable():
    assert META_FILE == "fedge_adapter.json"


# --- adaptive rounds and emulated devices from the command line ------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["client", "start", "--device-profile", "pi9"], "unknown device 'pi9'"),
        (["client", "start", "--device-profile", "base=pi5-8gb,slowdown=fast"], "field 'slowdown': expected float"),
        (["client", "start", "--device-profile", "base=pi5-8gb,cores=2"], "unknown field(s) ['cores']"),
        (["server", "start", "--codec", "int9"], "'int9': unknown codec"),
        (["server", "start", "--address", "0.0.0.0:9"], "plaintext; give it TLS"),
        (["server", "start", "--deadline", "-5"], "deadline_s must be a finite number >= 0"),
        (["demo", "--devices", "pi4-2gb,toaster"], "unknown device 'toaster'"),
        (["demo", "--devices", "base=laptop,slowdown=0.5"], "slowdown must be >= 1"),
        (["demo", "--devices", "pi4-2gb,laptop", "--clients", "3"], "clients 3 but devices lists 2"),
    ],
)
def test_device_and_round_options_are_checked_up_front(argv, expected, tmp_path, capsys):
    if argv[0] == "client":
        argv = [*argv[:2], "--server", "127.0.0.1:1", "--data", "demo:iot", "--model", "none",
                "--state", str(tmp_path / "c"), *argv[2:]]  # fmt: skip
    elif argv[0] == "server":
        argv = [*argv[:2], "--state", str(tmp_path / "s"), *argv[2:]]
    else:
        argv = [*argv, "--out", str(tmp_path / "demo")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and expected in " ".join(err.split()) and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_device_profile_reaches_the_supernodes_node_config(tmp_path):
    from flwr.common.config import parse_config_args

    from fedge.edge_client.federation.service import ClientSettings, prepare_device, supernode_command
    from fedge.edge_client.federation.settings import Device

    client = ClientSettings("127.0.0.1:9092")

    def node_config(**device) -> dict:
        device = prepare_device(Device(data="demo:iot", state_dir=tmp_path, worker_port=1234, **device))
        cmd, _ = supernode_command(client, device)
        return parse_config_args([cmd[cmd.index("--node-config") + 1]])  # as the SuperNode parses it

    config = node_config(profile="base=pi5-8gb,slowdown=2")
    assert config["profile"] == "base=pi5-8gb,slowdown=2" and config["worker-port"] == 1234
    assert config["emulated-time"] == "wall"  # a device of its own: its slowness is slept
    assert node_config(profile="pi4-2gb", emulated_time="virtual")["emulated-time"] == "virtual"
    assert Device.from_node_config(node_config(name="kitchen")).name == "kitchen"


def test_stage_deadline_follows_the_round_deadline(tmp_path):
    import tomllib

    from fedge.common.wire import RoundSettings
    from fedge.server.app import run_config
    from fedge.server.deploy import _write_app
    from fedge.server.settings import DEFAULT_STAGE_DEADLINE_S, STAGE_SLACK_S, ServerSettings

    server = ServerSettings(state=tmp_path)
    assert (
        server.stage_deadline_s(0) == DEFAULT_STAGE_DEADLINE_S and server.stage_deadline_s(240) == 240 + STAGE_SLACK_S
    )
    assert server.stage_deadline_s(100, waves=2) == 200 + STAGE_SLACK_S
    assert ServerSettings(stage_deadline=99.0).stage_deadline_s(240) == 99.0
    config = run_config(RoundSettings(deadline_s=240, codec="auto"), server, tmp_path / "cache")
    app = tomllib.loads((_write_app(tmp_path / "flwr", config, server.clientapp) / "pyproject.toml").read_text())
    config = app["tool"]["flwr"]["app"]["config"]
    assert config["deadline-s"] == 240 and config["codec"] == "auto" and "stage-deadline" not in config


def test_library_notices_go_to_the_log_not_the_console(tiny_model_dir, tmp_path):
    # A device owner sees fedge's own lines; deprecation warnings, weight-loading bars and backend notices go to
    # fedge's log (XDG state directory), where a developer can still find them.
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "fedge", "--cache-dir", str(tmp_path / "cache"), "train", "--data", "demo:iot",
           "--model", str(tiny_model_dir), "--steps", "2", "--out", str(tmp_path / "adapter")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    for noise in ("Warning", "warnings.warn", "Loading weights", "kernels"):
        assert noise not in done.stderr, noise
    log = (tmp_path / "state" / "fedge" / "fedge.log").read_text()
    assert "FutureWarning" in log and "adapter saved" in done.stderr


def test_fedges_warnings_and_everyones_errors_still_reach_the_console(tmp_path):
    code = (
        "import logging, warnings\nfrom fedge.cli import route_library_notices\nroute_library_notices()\n"
        "logging.getLogger('fedge.server').warning('rejected the update of pi')\n"
        "logging.getLogger('transformers').warning('an advisory')\n"
        "logging.getLogger('transformers').error('a library error')\n"
        "warnings.warn('deprecated thing', FutureWarning)\n"
    )
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
    env.pop("PYTHONWARNINGS", None)  # set by an in-process `fedge` run earlier in this test session
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "rejected the update of pi" in done.stderr and "a library error" in done.stderr
    assert "an advisory" not in done.stderr and "deprecated thing" not in done.stderr
    log = (tmp_path / "fedge" / "fedge.log").read_text()
    assert all(m in log for m in ("rejected the update", "an advisory", "a library error", "deprecated thing"))


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["server", "start", "--address", f"127.0.0.1:{port}", "--state", str(tmp_path / "s")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "cannot listen there" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


# --- every number is checked before anything starts ----------------------------------------------------------

COMMANDS = {  # each command with what it needs besides the bad value; paths under the test's own directory
    "server": ["server", "start", "--state", "{tmp}/s"],
    "client": ["client", "start", "--server", "127.0.0.1:1", "--data", "demo:iot", "--model", "none",
               "--state", "{tmp}/c"],
    "demo": ["demo", "--out", "{tmp}/d"],
    "train": ["train", "--data", "demo:iot", "--out", "{tmp}/a"],
    "eval": ["eval", "--data", "demo:iot"],
    "profile": ["profile", "--model", "none", "--plot", "{tmp}/t.png"],
    "sample": ["data", "sample", "iot"],
    "certs": ["certs", "--out", "{tmp}/certs", "--host", "127.0.0.1"],
}  # fmt: skip
BAD_NUMBERS = [  # (command, flag, value, what the error must say was expected)
    ("server", "--steps", "0", ">= 1"),
    ("server", "--steps", "nan", "invalid int value"),
    ("server", "--steps", "99999999999999999999", "fits in 64 bits"),
    ("server", "--lr", "nan", "finite number > 0"),
    ("server", "--batch", "-1", ">= 1"),
    ("server", "--seq-len", "8", ">= 16"),
    ("server", "--seed", "-1", "in 0..4294967295"),
    ("server", "--rank", "0", ">= 1"),
    ("server", "--alpha", "-1", ">= 1"),
    ("server", "--eval-examples", "0", ">= 1"),
    ("server", "--deadline", "inf", "finite number >= 0"),
    ("server", "--rounds", "0", ">= 1"),
    ("server", "--min-clients", "0", ">= 1"),
    ("server", "--stage-deadline", "0", "> 0"),
    ("server", "--norm-factor", "1", "> 1"),
    ("server", "--max-change-rms", "nan", "> 0"),
    ("server", "--server-lr", "nan", "> 0"),
    ("client", "--max-retries", "-1", ">= 0"),
    ("client", "--threads", "-1", ">= 0"),
    ("client", "--unreachable-after", "0", "finite number > 0"),
    ("demo", "--clients", "0", "1..16"),
    ("demo", "--simulation", "0", ">= 1"),
    ("demo", "--lr", "inf", "finite number > 0"),
    ("demo", "--seed", "4294967296", "in 0..4294967295"),
    ("demo", "--stage-deadline", "-1", "> 0"),
    ("train", "--steps", "0", ">= 1"),
    ("train", "--steps", "ten", "must be an integer"),
    ("train", "--batch", "-1", ">= 1"),
    ("train", "--grad-accum", "0", ">= 1"),
    ("train", "--lr", "nan", "finite number > 0"),
    ("train", "--lr", "inf", "finite number > 0"),
    ("train", "--seq-len", "8", ">= 16"),
    ("train", "--rank", "0", ">= 1"),
    ("train", "--alpha", "-1", ">= 1"),
    ("train", "--top-layers", "0", ">= 1"),
    ("train", "--seed", "-1", "in 0..4294967295"),
    ("eval", "--limit", "0", ">= 1"),
    ("eval", "--max-new-tokens", "0", ">= 1"),
    ("profile", "--steps", "0", ">= 1"),
    ("profile", "--warmup", "-1", ">= 0"),
    ("profile", "--batch", "0", ">= 1"),
    ("profile", "--seq-len", "8", ">= 16"),
    ("profile", "--gen-tokens", "0", ">= 1"),
    ("profile", "--tdp-watts", "inf", "finite number > 0"),
    ("profile", "--threads", "-1", ">= 0"),
    ("profile", "--budget", "nan", "finite number >= 0"),
    ("sample", "--n", "-1", ">= 0"),
    ("certs", "--days", "0", "expected 1..3650"),
]


def _bad_argv(command: str, flag: str, value: str, tmp) -> list[str]:
    return [arg.format(tmp=tmp) for arg in COMMANDS[command]] + [flag, value]


@pytest.mark.parametrize(("command", "flag", "value", "expected"), BAD_NUMBERS, ids=lambda v: str(v))
def test_every_bad_number_is_one_line_naming_its_flag_before_anything_starts(
    command, flag, value, expected, tmp_path, capsys, monkeypatch
):
    def started(*_args, **_kwargs):
        raise AssertionError(f"{flag} {value} was accepted: the command went ahead")

    # What would start processes or load a model; certs and data sample check their numbers themselves.
    for target in (
        "fedge.server.deploy.start_server",
        "fedge.edge_client.federation.service.start_client",
        "fedge.demo.run_demo",
        "fedge.cli.cmd_train",
        "fedge.cli.cmd_eval",
        "fedge.cli.cmd_profile",
    ):
        monkeypatch.setattr(target, started)  # fmt: skip
    code = main(_bad_argv(command, flag, value, tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert flag in err and expected in err, err
    assert not list(tmp_path.iterdir())  # nothing written, not even a directory


def test_bad_numbers_are_refused_before_torch_loads(tmp_path):
    # The real command in a fresh interpreter: a typo costs a moment, not torch's seconds of import on a Pi.
    argvs = [_bad_argv(command, flag, value, tmp_path) for command, flag, value, _ in BAD_NUMBERS]
    code = (
        "import json, sys\nfrom fedge.cli import main\n"
        f"codes = [main(argv) for argv in {argvs!r}]\n"
        "print(json.dumps([codes, sorted(m for m in ('torch', 'transformers') if m in sys.modules)]))"
    )
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    codes, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == [2] * len(BAD_NUMBERS) and heavy == [] and "Traceback" not in done.stderr


def test_a_bad_number_in_the_config_file_names_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "fed.toml"
    path.write_text("[server]\nstage_deadline = 0.0\n")
    code = main(["server", "start", "--config", str(path), "--state", str(tmp_path / "s")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and f"({path} [server], key stage_deadline)" in err and "Traceback" not in err


# --- a --state that cannot be written is one line --------------------------------------------------------------

STATE_PLACES = {
    "a file": ("FILE", "is a file, not a directory"),
    "below a file": ("FILE/state", "is a file, not a directory"),
    "below /proc": ("/proc/fedge-state", "cannot write in /proc"),
    "/proc itself": ("/proc", "cannot write there"),
}


@pytest.mark.parametrize("command", ["server", "client"])
@pytest.mark.parametrize("place", list(STATE_PLACES))
def test_an_unwritable_state_is_one_line_and_exit_2(command, place, tmp_path, capsys):
    state, expected = STATE_PLACES[place]
    if state.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    (tmp_path / "FILE").write_text("a file, where a directory is expected")
    state = state if state.startswith("/") else str(tmp_path / state)
    argv = [arg.format(tmp=tmp_path) for arg in COMMANDS[command]]
    argv[argv.index("--state") + 1] = state
    code = main([*argv, *(["--address", "127.0.0.1:9"] if command == "server" else [])])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"--state {state}" in err and expected in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["FILE"]  # nothing else written


def test_every_commands_help_prints_without_a_traceback():
    # argparse formats help text with %: a setting's "battery %" once made `fedge agent run --help` a traceback
    from fedge.cli import main

    for argv in (["agent", "run"], ["agent", "install"], ["client", "start"], ["server", "start"], ["demo"],
                 ["profile"], ["eval"], ["train"], ["model", "pull"], ["data"], ["certs"], ["export"]):  # fmt: skip
        try:
            code = main([*argv, "--help"])
        except SystemExit as done:
            code = done.code
        assert code in (0, None), argv
