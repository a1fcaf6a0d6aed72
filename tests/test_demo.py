"""``fedge demo``: the processes it starts and the settings it gives them (no process is started here)."""

from __future__ import annotations

import pytest

from fedge.cli import main


def test_demo_with_devices_becomes_adaptive_unless_told_otherwise(monkeypatch, tmp_path):
    import fedge.demo

    seen = []
    monkeypatch.setattr(fedge.demo, "run_demo", lambda demo, r, server, cache, console: seen.append((demo, r)) or 0)
    assert main(["demo", "--devices", "pi4-2gb,laptop", "--devices", "base=pi5-8gb,slowdown=2"]) == 0
    demo, r = seen[-1]
    assert demo.devices == ["pi4-2gb", "laptop", "base=pi5-8gb,slowdown=2"] and demo.clients == 3
    assert r.deadline_s == 240 and r.codec == "auto"
    assert main(["demo", "--devices", "laptop", "--deadline", "90", "--codec", "int4"]) == 0
    assert seen[-1][1].deadline_s == 90 and seen[-1][1].codec == "int4"
    assert main(["demo", "--clients", "2"]) == 0  # without devices: the fixed configuration, as before
    demo, r = seen[-1]
    assert demo.devices == [] and r.deadline_s == 0 and r.codec == ""


def test_simulated_clients_get_the_devices_in_turn(tmp_path):
    from fedge.simulate import node_config

    configs = [node_config(pid, tmp_path, tmp_path / "cache", 1, ["pi4-2gb", "laptop"]) for pid in range(3)]
    assert [c["profile"] for c in configs] == ["pi4-2gb", "laptop", "pi4-2gb"]
    assert [c["name"] for c in configs] == ["healthcare-0", "finance-1", "education-2"]
    assert node_config(0, tmp_path, tmp_path / "cache", 1)["profile"] == ""


def test_the_demo_reports_the_settings_it_ran_with(tmp_path):
    from fedge.common.wire import RoundSettings
    from fedge.demo import DemoSettings, demo_processes
    from fedge.server.settings import ServerSettings

    server, clients = demo_processes(
        DemoSettings(clients=3), RoundSettings(), ServerSettings(server_lr=1.5), tmp_path, tmp_path / "cache", 4242
    )
    assert server.address == "127.0.0.1:4242" and server.state == tmp_path / "server" and server.min_clients == 3
    assert server.server_lr == 1.5 and len(clients) == 3
    assert all(c.server == server.address and d.cache_dir == tmp_path / "cache" for c, d in clients)


@pytest.mark.parametrize("cores, clients, threads, turns", [(2, 4, 1, 2), (8, 4, 2, None), (2, 2, 1, None)])
def test_the_demo_gives_its_clients_one_turn_per_core_when_they_outnumber_the_cores(
    cores, clients, threads, turns, tmp_path, monkeypatch
):
    from fedge.common.wire import RoundSettings
    from fedge.demo import DemoSettings, demo_processes
    from fedge.server.settings import ServerSettings

    monkeypatch.setattr("os.cpu_count", lambda: cores)
    server, placed = demo_processes(
        DemoSettings(clients=clients), RoundSettings(deadline_s=100), ServerSettings(), tmp_path, tmp_path, 4242
    )
    assert {d.threads for _, d in placed} == {threads}
    assert {d.turns for _, d in placed} == ({f"{tmp_path / 'turns'}:{turns}"} if turns else {""})
    waves = -(-clients // turns) if turns else 1  # with turns the server waits for every wave's deadline
    assert server.stage_deadline_s(100) == ServerSettings().stage_deadline_s(100, waves)
