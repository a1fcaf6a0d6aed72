"""Emulated devices: profiles (built-in and custom, validated), throttling, the RSS watchdog, the link model."""

from __future__ import annotations

import json
import threading

import pytest

from fedge.common.errors import FedgeError
from fedge.edge_client.device.emulated import (
    PROFILES,
    EmulatedOutOfMemory,
    Link,
    RssWatchdog,
    Throttle,
    apply_threads,
    chain,
    emulate,
    load_profile,
)
from fedge.edge_client.planning.plan import GIB, HOST


@pytest.mark.parametrize("name", ["pi4-2gb", "pi5-8gb", "jetson-orin-nano", "laptop"])
def test_builtin_profiles_give_planner_caps(name):
    profile = load_profile(name)
    caps = profile.caps()
    assert caps.name == name and caps.memory_bytes == profile.memory_bytes
    assert set(caps.train_gflops) <= set(profile.precisions)
    assert all(g <= max(HOST.train_gflops.values()) for g in caps.train_gflops.values())


def test_pi4_has_no_bf16_and_no_bitsandbytes_and_is_slower_than_a_pi5():
    pi4, pi5 = PROFILES["pi4-2gb"], PROFILES["pi5-8gb"]
    assert not pi4.bf16_native and "bf16" not in pi4.precisions
    assert not any(p.startswith("bnb-") for p in pi4.precisions)
    assert pi4.caps().train_gflops["int4"] == pytest.approx(HOST.train_gflops["int4-fp32"] / pi4.slowdown)
    assert pi4.caps().train_gflops["fp32"] < pi5.caps().train_gflops["fp32"]
    assert pi4.memory_bytes < 2 * GIB


def test_custom_profile_from_key_value_text_with_a_base():
    profile = load_profile("base=pi4-2gb,name=pi4-slow,slowdown=30,memory_bytes=1.2e9,precisions=fp32,int4")
    assert (profile.name, profile.slowdown, profile.memory_bytes) == ("pi4-slow", 30.0, 1_200_000_000)
    assert profile.precisions == ("fp32", "int4")
    assert profile.link == PROFILES["pi4-2gb"].link


def test_custom_profile_from_json_and_toml_files(tmp_path):
    full = {
        "name": "box",
        "threads": 2,
        "slowdown": 3,
        "memory_bytes": 4 * GIB,
        "precisions": ["fp32", "int8"],
        "bf16_native": False,
        "uplink_bytes_per_s": 1e6,
        "downlink_bytes_per_s": 2e6,
        "latency_s": 0.1,
    }
    (tmp_path / "box.json").write_text(json.dumps(full))
    (tmp_path / "box.toml").write_text('base = "laptop"\nname = "toml-box"\nslowdown = 2.5\n')
    assert load_profile(str(tmp_path / "box.json")).precisions == ("fp32", "int8")
    toml = load_profile(str(tmp_path / "box.toml"))
    assert (toml.name, toml.slowdown, toml.threads) == ("toml-box", 2.5, PROFILES["laptop"].threads)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("base=pi5-8gb,threads=many", "threads"),
        ("base=pi5-8gb,slowdown=0.5", "slowdown"),
        ("base=pi5-8gb,memory_bytes=0", "memory_bytes"),
        ("base=pi5-8gb,precisions=fp32,tf32", "precisions"),
        ("base=pi5-8gb,precisions=bf16", "bf16_native"),
        ("base=pi5-8gb,bf16_native=maybe", "bf16_native"),
        ("base=pi5-8gb,colour=red", "colour"),
        ("base=pi9", "pi9"),
        ("name=x,threads=2", "missing field"),
        ("pi9-16gb", "unknown device"),
    ],
)
def test_bad_custom_profiles_name_the_field(spec, named):
    with pytest.raises(FedgeError, match=named):
        load_profile(spec)


def test_unreadable_profile_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FedgeError, match="bad.json"):
        load_profile(str(bad))


def test_throttle_stretches_each_step_by_the_slowdown():
    slept = []
    throttle = Throttle(4.0, sleep=slept.append)
    for step, seconds in enumerate([0.5, 2.0, 1.0], start=1):
        assert throttle(step, 1.0, 100, seconds) is None  # never asks the loop to stop
    assert slept == pytest.approx([1.5, 6.0, 3.0])
    assert throttle.step_s == pytest.approx([2.0, 8.0, 4.0])
    no_op = Throttle(1.0, sleep=slept.append)
    no_op(1, 1.0, 1, 3.0)
    assert len(slept) == 3 and no_op.step_s == [3.0]
    with pytest.raises(ValueError, match="slowdown"):
        Throttle(0.5)


def test_chain_calls_every_callback_and_stops_if_any_asks():
    seen = []
    on_step = chain(lambda *a: seen.append("a"), lambda *a: seen.append("b") or a[0] == 2)
    assert on_step(1, 0.0, 1, 0.1) is False
    assert on_step(2, 0.0, 1, 0.1) is True
    assert seen == ["a", "b", "a", "b"]


def test_apply_threads_sets_torch_threads():
    import torch

    before = torch.get_num_threads()
    try:
        apply_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_rss_watchdog_trips_on_a_fake_reader_and_stops_training_at_the_step():
    readings = iter([100, 200, 900, 300])
    watchdog = RssWatchdog(cap_bytes=500, read_rss=lambda: next(readings), device="pi4-2gb")
    watchdog(1, 1.0, 10, 0.1)
    watchdog.sample()
    with pytest.raises(EmulatedOutOfMemory, match="pi4-2gb"):
        watchdog(2, 1.0, 10, 0.1)  # the sample at 900 is over the cap
    assert watchdog.peak_bytes == 900 and watchdog.tripped_at == 900
    with pytest.raises(EmulatedOutOfMemory):  # stays tripped after RSS falls back
        watchdog(3, 1.0, 10, 0.1)
    assert issubclass(EmulatedOutOfMemory, MemoryError)


def test_rss_watchdog_thread_samples_in_the_background_and_raises_on_exit():
    over = threading.Event()
    rss = [100]

    def read():
        if rss[0] > 500:
            over.set()
        return rss[0]

    with pytest.raises(EmulatedOutOfMemory):
        with RssWatchdog(cap_bytes=500, read_rss=read, interval_s=0.001) as watchdog:
            rss[0] = 800  # the training process grows past the cap
            assert over.wait(timeout=10)
    assert watchdog.peak_bytes == 800 and watchdog._thread is None


def test_rss_watchdog_under_the_cap_is_silent():
    with RssWatchdog(cap_bytes=10 * GIB, interval_s=0.001) as watchdog:  # the real process RSS
        watchdog.sample()
    assert 0 < watchdog.peak_bytes < 10 * GIB and watchdog.tripped_at is None


def test_link_seconds_and_emulated_transfer():
    link = Link(uplink_bytes_per_s=2e6, downlink_bytes_per_s=8e6, latency_s=0.05)
    assert link.seconds(4_000_000) == pytest.approx(2.05)
    assert link.seconds(4_000_000, "down") == pytest.approx(0.55)
    assert link.seconds(0) == pytest.approx(0.05)
    slept = []
    assert link.transfer(1_000_000, sleep=slept.append) == pytest.approx(0.55)
    assert slept == pytest.approx([0.55])
    with pytest.raises(ValueError, match="direction"):
        link.seconds(1, "sideways")


def test_emulate_throttles_and_enforces_the_cap_from_one_callback():
    import torch

    before = torch.get_num_threads()
    slept, rss = [], [100]
    profile = load_profile("base=pi4-2gb,slowdown=3,memory_bytes=1000,threads=1")
    try:
        with pytest.raises(EmulatedOutOfMemory, match="pi4-2gb"):
            with emulate(profile, sleep=slept.append, read_rss=lambda: rss[0]) as on_step:
                assert torch.get_num_threads() == 1
                assert on_step(1, 1.0, 10, 2.0) is False
                rss[0] = 5000
                on_step(2, 1.0, 10, 2.0)
        assert slept == pytest.approx([4.0, 4.0])
    finally:
        torch.set_num_threads(before)


def test_on_a_virtual_clock_a_busy_host_does_not_slow_the_emulated_device():
    slept, rewound = [], []
    throttle = Throttle(3.0, sleep=slept.append, rewind=rewound.append)
    throttle(1, 1.0, 100, 1.0)  # 0.01 s per token: the fastest so far
    throttle(2, 1.0, 100, 3.0)  # the host was busy: 2 s of it waited for a core
    throttle(3, 1.0, 50, 0.25)  # faster still: 0.005 s per token
    throttle(4, 1.0, 100, 1.0)  # held to the fastest rate of a step no longer than it (0.005, step 3)
    throttle(5, 1.0, 20, 0.5)  # shorter than any before: a longer step's rate would undercount it, so as timed
    assert rewound == pytest.approx([2.0, 0.5])  # the waiting comes off the device's clock
    assert throttle.step_s == pytest.approx([3.0, 3.0, 0.75, 1.5, 1.5])  # 3 x the host compute, whatever the load
    assert slept == pytest.approx([2.0, 2.0, 0.5, 1.0, 1.0])
    wall = Throttle(3.0, sleep=slept.append)  # wall-clock emulation: time spent is spent
    wall(1, 1.0, 100, 1.0)
    wall(2, 1.0, 100, 3.0)
    assert wall.step_s == pytest.approx([3.0, 9.0])


def test_this_machine_plans_from_its_own_profile_when_there_is_one(tmp_path, monkeypatch):
    # `fedge profile --model M` keeps its report; the planner then uses this device's measured speed, and the plan
    # says where its figures come from. Without one (or one copied from another machine): the reference calibration.
    import json
    import platform

    from fedge.edge_client.device.emulated import profile_path, saved_profile, this_machine
    from fedge.edge_client.device.profiling import save_for_planner
    from fedge.edge_client.planning.costs import SMOLLM2_135M, RoundBudget
    from fedge.edge_client.planning.plan import make_plan

    slow = {"model": {"name": "smollm2-135m"}, "matmul_gflops": {"fp32": {"median": 8.0}, "bf16": None}}
    assert save_for_planner(slow, tmp_path) == profile_path(tmp_path, "smollm2-135m")
    assert save_for_planner({"model": None}, tmp_path) is None  # nothing profiled, nothing kept
    measured = this_machine("dev", measured=saved_profile(tmp_path, "smollm2-135m"))
    reference = this_machine("dev", measured=saved_profile(tmp_path, "another-model"))
    assert "fedge profile" in measured.source and "reference" in reference.source
    assert measured.train_gflops["fp32"] < reference.train_gflops["fp32"] / 5  # 8 of the reference's 306 GFLOP/s
    budget = RoundBudget(deadline_s=600, steps=15)
    plans = [make_plan(caps, budget, SMOLLM2_135M) for caps in (measured, reference)]
    assert "fedge profile" in plans[0].reasons["device"] and "reference" in plans[1].reasons["device"]
    assert plans[0].predicted_step_s > plans[1].predicted_step_s
    path = profile_path(tmp_path, "smollm2-135m")
    path.write_text(json.dumps({**json.loads(path.read_text()), "machine": platform.node() + "-elsewhere"}))
    assert saved_profile(tmp_path, "smollm2-135m") is None
