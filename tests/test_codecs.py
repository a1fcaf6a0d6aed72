"""Update codecs (codecs.py) and what a client sends with them (updates.py): round-trip error, payload size,
composition, error feedback, validation, the codec ladder."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.quantization.codecs import LADDER, Codec, Encoded, decode, encode, parse_codec
from fedge.quantization.updates import ErrorFeedback, apply_delta, estimate_bytes, make_delta, measure, pick_codec

B = "base_model.model.model.layers.{}.self_attn.q_proj.lora_B.weight"


def gaussian(seed: int = 0, layers: int = 4, scale: float = 1e-3) -> dict[str, np.ndarray]:
    """LoRA-B-shaped Gaussian deltas, (out, r) = (576, 16) and one odd-sized tensor."""
    rng = np.random.default_rng(seed)
    arrays = {B.format(i): (rng.normal(size=(576, 16)) * scale).astype(np.float32) for i in range(layers)}
    arrays["odd.lora_B.weight"] = (rng.normal(size=(7, 3)) * scale).astype(np.float32)
    return arrays


def rel_error(a: dict, b: dict) -> float:
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b)
    return float(np.sqrt(num / sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)))


def fp32_bytes(arrays: dict) -> int:
    return sum(a.size * 4 for a in arrays.values())


@pytest.mark.parametrize(
    ("spec", "max_error"),
    # Uniform 16-level int4 on Gaussian blocks of 64: step = absmax / 8 ~ 0.3 sigma, so ~9.5% is the floor;
    # int2 (4 levels) is for nearly flat data (Adam updates), a Gaussian is its worst case.
    [
        ("none", 0.0),
        ("fp16", 1e-3),
        ("int8", 0.01),
        ("int8:32", 0.01),
        ("int4", 0.10),
        ("int4:32", 0.095),
        ("int3", 0.20),
        ("int2", 0.40),
    ],
)
def test_round_trip_error(spec: str, max_error: float) -> None:
    x = gaussian()
    y = decode(encode(x, spec))
    assert set(y) == set(x)
    assert all(y[k].shape == x[k].shape and y[k].dtype == x[k].dtype for k in x)
    assert rel_error(y, x) <= max_error


@pytest.mark.parametrize(
    ("spec", "ratio"),
    [
        ("none", 1.0),
        ("fp16", 0.5),
        ("int8", (8 + 16 / 64) / 32),
        ("int4", (4 + 16 / 64) / 32),
        ("int3", (3 + 16 / 64) / 32),
        ("int2", (2 + 16 / 64) / 32),
    ],
)
def test_bytes_ratio(spec: str, ratio: float) -> None:
    x = gaussian(layers=8)
    enc = encode(x, spec)
    got = enc.encoded_bytes() / fp32_bytes(x)
    assert ratio <= got <= ratio + 0.01  # + the header, per-tensor scales and block padding
    assert abs(estimate_bytes(spec, fp32_bytes(x)) / fp32_bytes(x) - ratio) < 0.01


@pytest.mark.parametrize(("spec", "bits"), [("int4", 4), ("int3", 3), ("int2", 2)])
def test_packing_and_tiny_values_survive(spec: str, bits: int) -> None:
    x = {"t": (np.random.default_rng(1).uniform(-1, 1, size=(64, 16)) * 1e-9).astype(np.float32)}  # below fp16
    enc = encode(x, spec)
    assert enc.arrays["values"].dtype == np.uint8 and enc.arrays["values"].size == 64 * 16 * bits // 8
    cells = 2**bits  # uniform data: error = cell width / sqrt(12) against an rms of 1 / sqrt(3)
    assert rel_error(decode(enc), x) < 1.1 * (2 / cells) / np.sqrt(12) * np.sqrt(3)


def test_topk_keeps_exactly_the_largest_entries() -> None:
    rng = np.random.default_rng(2)
    x = {"a": rng.permutation(np.arange(1, 1001, dtype=np.float32) * rng.choice([-1, 1], 1000)).reshape(50, 20)}
    y = decode(encode(x, "topk:0.1"))["a"]
    kept = np.abs(x["a"]) > 900
    assert np.array_equal(y[kept], x["a"][kept])
    assert not y[~kept].any()


@pytest.mark.parametrize(("fraction", "mode"), [(0.5, "bitmap"), (0.1, "bitmap"), (0.05, "u16"), (0.001, "u16")])
def test_topk_index_encodings(fraction: float, mode: str) -> None:
    """A bitmap (n/8 bytes) for large fractions, uint16 gaps (2k bytes) below 1/16."""
    x = {"t": np.random.default_rng(3).normal(size=(400, 25)).astype(np.float32)}
    enc = encode(x, f"topk:{fraction}")
    assert enc.header["index"] == [mode]
    k = int(np.ceil(fraction * x["t"].size))
    y = decode(enc)["t"]
    assert np.count_nonzero(y) == k
    assert np.array_equal(np.sort(np.abs(y[y != 0])), np.sort(np.abs(x["t"]).ravel())[-k:])


def test_topk_positions_as_uint32_when_a_gap_exceeds_uint16() -> None:
    big = np.zeros(200_000, np.float32)
    big[[5, 150_000]] = [3.0, -4.0]
    enc = encode({"big": big}, "topk:0.00001")  # k = 2, gap 149,995
    assert enc.header["index"] == ["u32"] and enc.arrays["index"].nbytes == 8
    assert np.array_equal(decode(enc)["big"], big)


def test_composition_quantizes_the_kept_values() -> None:
    x = gaussian(layers=8)
    sparse = decode(encode(x, "topk:0.25+none"))
    both = decode(encode(x, "topk:0.25+int8"))
    assert rel_error(both, sparse) < 0.01  # int8 of the kept values, relative to what top-k keeps
    assert all(np.array_equal(both[k] != 0, sparse[k] != 0) for k in x)
    ratio = encode(x, "topk:0.25+int8").encoded_bytes() / fp32_bytes(x)
    assert ratio < 0.125  # the target: <= 1/8 of fp32
    assert ratio == pytest.approx(0.25 * (8 + 16 / 64) / 32 + 1 / 32, abs=0.01)  # values + scales + bitmap


def test_spec_parsing() -> None:
    assert parse_codec("topk:0.1+int8") == Codec(values="int8", topk=0.1)
    assert parse_codec(" INT4:32 ") == Codec(values="int4", block=32)
    assert parse_codec("topk:0.5") == Codec(values="none", topk=0.5)
    assert parse_codec("mix:0.9+int4:256") == Codec(values="int4", block=256, mix=0.9)
    for spec in ["none", "fp16", "int8", "int4:128", "topk:0.1+int4", "topk:0.25+fp16", "mix:0.5+int3"]:
        assert parse_codec(parse_codec(spec).spec) == parse_codec(spec)


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("int5", "'int5'"),
        ("topk:1.5+int8", "'topk:1.5'"),
        ("topk:x", "'topk:x'"),
        ("int8+topk:0.1", "'topk:0.1'"),
        ("int8+int4", "'int4'"),
        ("fp16:64", "'fp16:64'"),
        ("int4:7", "'int4:7'"),
        ("mix:1.5+int4", "'mix:1.5'"),
        ("mix:0.5+int8", "mix takes int4 or int3"),
        ("int4+mix:0.5", "'mix:0.5'"),
        ("topk:0.5+mix:0.5+int4", "'mix:0.5'"),
        ("", "non-empty"),
    ],
)
def test_bad_specs_name_the_part(spec: str, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        parse_codec(spec)


def test_flat_arrays_round_trip() -> None:
    """to_arrays/from_arrays: everything in one flat dict of arrays (an ArrayRecord), few arrays."""
    x = gaussian()
    enc = encode(x, "topk:0.1+int4")
    flat = enc.to_arrays()
    assert all(isinstance(a, np.ndarray) and a.ndim == 1 for a in flat.values())
    assert len(flat) == 5  # header, index, values, scale, tscale: not per tensor
    back = Encoded.from_arrays({k: a.copy() for k, a in flat.items()})
    assert back.header == enc.header
    assert all(np.array_equal(decode(back)[k], decode(enc)[k]) for k in x)
    assert enc.encoded_bytes() == sum(a.nbytes for a in flat.values())


def test_decode_validates_shapes_and_names() -> None:
    x = gaussian()
    enc = encode(x, "int8")
    shapes = {k: v.shape for k, v in x.items()}
    assert decode(enc, shapes).keys() == x.keys()
    with pytest.raises(ValueError, match=r"odd.lora_B.weight: shape \(7, 3\), expected \(3, 7\)"):
        decode(enc, {**shapes, "odd.lora_B.weight": (3, 7)})
    with pytest.raises(ValueError, match="odd.lora_B.weight: not in the adapter"):
        decode(enc, {k: s for k, s in shapes.items() if k != "odd.lora_B.weight"})


@pytest.mark.parametrize("spec", ["none", "fp16", "int8", "int4", "topk:0.1+int8", "topk:0.01+int4"])
def test_truncated_payload_names_the_tensor(spec: str) -> None:
    x = gaussian()
    enc = encode(x, spec)
    key = "values"
    cut = Encoded(enc.header, {**enc.arrays, key: enc.arrays[key][:-1]})
    with pytest.raises(ValueError, match=r"tensor odd\.lora_B\.weight: payload truncated"):
        decode(cut)
    extra = Encoded(enc.header, {**enc.arrays, key: np.concatenate([enc.arrays[key], enc.arrays[key][:1]])})
    with pytest.raises(ValueError, match="extra entries"):
        decode(extra)


def test_bad_payloads_are_clear_errors() -> None:
    enc = encode(gaussian(), "topk:0.1+int8")
    with pytest.raises(ValueError, match="unknown codec"):
        decode(Encoded({**enc.header, "codec": "zstd"}, enc.arrays))
    with pytest.raises(ValueError, match="no 'scale' array"):
        decode(Encoded(enc.header, {k: v for k, v in enc.arrays.items() if k != "scale"}))
    with pytest.raises(ValueError, match="'values' must be 1-d int8"):
        decode(Encoded(enc.header, {**enc.arrays, "values": enc.arrays["values"].astype(np.float32)}))
    with pytest.raises(ValueError, match="no 'codec-header'"):
        Encoded.from_arrays(enc.arrays)
    with pytest.raises(ValueError, match="encoded with 'topk:0.1\\+int8', not 'int8'"):
        parse_codec("int8").decode(enc)
    with pytest.raises(ValueError, match="tensor t: non-finite"):
        encode({"t": np.array([1.0, np.nan], np.float32)}, "int8")


def test_error_feedback_residual_stays_bounded_and_sums_match() -> None:
    """Sum of decoded updates = sum of true deltas - the final residual, and the residual does not grow."""
    ef = ErrorFeedback("topk:0.05+int4")
    sent, true, norms = None, None, []
    for rnd in range(30):
        delta = gaussian(seed=rnd)
        decoded = decode(ef.encode(delta))
        sent = decoded if sent is None else {k: sent[k] + decoded[k] for k in delta}
        true = delta if true is None else {k: true[k] + delta[k] for k in delta}
        assert all(np.allclose(sent[k] + ef.residual[k], true[k], atol=1e-6) for k in delta)
        norms.append(ef.residual_norm())
    assert max(norms[15:]) < 1.5 * max(norms[:15])  # bounded, not growing with rounds
    assert rel_error(sent, true) < 0.5  # 5% of entries per round, yet most of the total arrives


def test_error_feedback_transmits_a_constant_delta_fully() -> None:
    """A constant delta under top-k 10% + int4: the residual saturates, so the sent total converges to T x delta."""
    delta = {"t": np.random.default_rng(0).normal(size=(30, 10)).astype(np.float32)}
    ef = ErrorFeedback("topk:0.1+int4")
    total, norms = np.zeros_like(delta["t"]), []
    for _ in range(100):
        total += decode(ef.encode(delta))["t"]
        norms.append(ef.residual_norm())
    assert max(norms[50:]) < 1.2 * max(norms[:30])  # bounded: small entries wait, then go out
    assert np.allclose(total + ef.residual["t"], 100 * delta["t"], atol=1e-3)
    assert rel_error({"t": total}, {"t": 100 * delta["t"]}) < 0.05  # ~ residual / T: every entry arrives


def test_error_feedback_save_load(tmp_path) -> None:
    ef = ErrorFeedback("topk:0.1+int8")
    ef.encode(gaussian())
    path = tmp_path / "residual.npz"
    path.write_bytes(ef.to_bytes())
    again = ErrorFeedback.load(path)
    assert again.codec == ef.codec
    assert again.residual.keys() == ef.residual.keys()
    assert all(np.array_equal(again.residual[k], ef.residual[k]) for k in ef.residual)
    assert not list(tmp_path.glob(".residual*"))  # no temporary file left behind
    assert ErrorFeedback.load(tmp_path / "missing.npz", "int8").residual == {}
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: not a residual file"):
        ErrorFeedback.load(tmp_path / "bad.npz")


def test_error_feedback_resets_a_tensor_whose_shape_changed() -> None:
    ef = ErrorFeedback("topk:0.1")
    ef.encode({"t": np.ones((8, 4), np.float32)})
    ef.encode({"t": np.ones((8, 2), np.float32)})  # the client's rank went from 4 to 2
    assert ef.residual["t"].shape == (8, 2)


def test_measure_reports_error_and_ratio() -> None:
    x = gaussian()
    none, int8 = measure(x, ["none", "int8"])
    assert none.rel_error == 0 and none.ratio == pytest.approx(1.0, abs=0.01)
    assert 0 < int8.rel_error < 0.01 and int8.ratio < 0.3


def test_pick_codec_ladder() -> None:
    fp32 = 10_000_000  # ~ SmolLM2-135M LoRA-B r=16
    assert pick_codec(fp32, 1e6, 20) == "none"
    assert pick_codec(fp32, 1e6, 6) == "fp16"
    assert pick_codec(fp32, 1e6, 3) == "int8"
    assert pick_codec(fp32, 1e6, 1.4) == "int4"
    assert pick_codec(fp32, 1e6, 1.25) == "mix:0.9+int4:256"
    assert pick_codec(fp32, 1e6, 1.0) == "int2"
    assert pick_codec(fp32, 1e6, 0.6) == "topk:0.25+int2"
    assert pick_codec(fp32, 1e6, 0.001) == LADDER[-1]  # nothing fits: the smallest
    assert pick_codec(fp32, 0, 10) == LADDER[-1]
    sizes = [estimate_bytes(s, fp32) for s in LADDER]
    assert sizes == sorted(sizes, reverse=True)  # the ladder shrinks step by step
    with pytest.raises(ValueError, match="empty"):
        pick_codec(fp32, 1e6, 1, ladder=())


def test_delta_helpers() -> None:
    ref = {"A": np.ones((2, 3), np.float32), "B": np.zeros((3, 2), np.float32)}
    trained = {"A": ref["A"].copy(), "B": np.full((3, 2), 0.5, np.float32)}
    delta = make_delta(trained, ref)
    assert list(delta) == ["B"]  # frozen A is not sent
    back = apply_delta(ref, delta)
    assert all(np.array_equal(back[k], trained[k]) for k in ref)
    with pytest.raises(ValueError, match="lacks"):
        apply_delta(ref, {"C": np.zeros(1, np.float32)})


def test_travels_in_an_array_record() -> None:
    """Through Flower's ArrayRecord (wire.to_record / from_record) and back, validated against the adapter shapes."""
    pytest.importorskip("flwr")
    from fedge.common import wire

    x = gaussian()
    enc = encode(x, "topk:0.1+int4")
    record = wire.to_record(enc.to_arrays())
    back = decode(Encoded.from_arrays(wire.from_record(record)), {k: v.shape for k, v in x.items()})
    assert all(np.array_equal(back[k], decode(enc)[k]) for k in x)
    assert wire.record_bytes(record) <= enc.encoded_bytes() + 128 * 5  # + an npy header per array


def test_mix_codes_the_largest_tensors_finer_under_an_eighth_of_fp32() -> None:
    rng = np.random.default_rng(3)
    # Tensors of different scales: the mix should spend its 4-bit values where 3 bits would cost the most.
    arrays = {B.format(i): (rng.uniform(-1, 1, size=(576, 16)) * 10.0**-i).astype(np.float32) for i in range(4)}
    mixed = encode(arrays, "mix:0.5+int4:256")
    assert mixed.header["bits"] == [4, 4, 3, 3]  # half the values, the two largest-scale tensors
    dec = decode(Encoded.from_arrays(mixed.to_arrays()))
    err = {s: rel_error(decode(encode(arrays, s)), arrays) for s in ("int4:256", "int3:256")}
    assert err["int4:256"] <= rel_error(dec, arrays) < 0.5 * err["int3:256"]  # the small tensors' error is tiny
    assert mixed.encoded_bytes() < fp32_bytes(arrays) / 8
    even = gaussian(layers=8)
    ninety = encode(even, "mix:0.9+int4:256")
    assert ninety.encoded_bytes() <= fp32_bytes(even) / 8
    estimate = estimate_bytes("mix:0.9+int4:256", fp32_bytes(even))
    assert abs(ninety.encoded_bytes() - estimate) < 0.02 * ninety.encoded_bytes()


def test_mix_header_must_give_every_tensor_a_known_width() -> None:
    enc = encode(gaussian(), "mix:0.5+int4")
    for bad in ([4] * (len(enc.header["bits"]) - 1), [5] * len(enc.header["bits"]), "44444"):
        forged = Encoded({**enc.header, "bits": bad}, enc.arrays)
        with pytest.raises(ValueError, match="'bits'"):
            decode(forged)
    flipped = Encoded({**enc.header, "bits": [7 - b for b in enc.header["bits"]]}, enc.arrays)
    with pytest.raises(ValueError, match="payload truncated|unexpected extra"):
        decode(flipped)  # widths that change the payload's total size show as a size mismatch (a swap between
        # tensors of one size would not: the header is trusted as far as the sizes agree)
