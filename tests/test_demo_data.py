"""fedge.edge_client.training.demo_data: determinism, sizes, split disjointness, answer spaces, errors."""

from __future__ import annotations

import pytest

from fedge.edge_client.training import demo_data
from fedge.edge_client.training.demo_data import DOMAINS, answer_space, describe, generate

FIELDS = ("instruction", "input", "output")


def _pairs(records: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(r["instruction"], r["input"]) for r in records]


@pytest.mark.parametrize("domain", DOMAINS)
def test_same_seed_same_records(domain: str) -> None:
    assert generate(domain, "train", n=50, seed=3) == generate(domain, "train", n=50, seed=3)
    assert generate(domain, "test", n=20, seed=3) == generate(domain, "test", n=20, seed=3)


@pytest.mark.parametrize("domain", DOMAINS)
def test_different_seed_different_records(domain: str) -> None:
    assert generate(domain, "train", n=50, seed=0) != generate(domain, "train", n=50, seed=1)


def test_pinned_first_record() -> None:
    """Guards cross-machine determinism: a change here means every seeded dataset changed."""
    assert generate("finance", "train", n=1, seed=0) == [
        {
            "instruction": "Categorise the transaction for the branch books.",
            "input": "POS 04/17 SAFEHAVEN #4381 1578.53 USD",
            "output": "6800-INSURANCE",
        }
    ]


def test_smaller_n_is_a_prefix() -> None:
    assert generate("iot", "train", n=30) == generate("iot", "train", n=60)[:30]


@pytest.mark.parametrize("domain", DOMAINS)
def test_default_sizes(domain: str) -> None:
    assert len(generate(domain)) == 400
    assert len(generate(domain, "test")) == 100
    assert len(generate(domain, "train", n=7)) == 7
    assert generate(domain, "test", n=0) == []


@pytest.mark.parametrize("domain", DOMAINS)
def test_train_test_disjoint_and_unique(domain: str) -> None:
    train = _pairs(generate(domain, "train", n=2000))
    test = _pairs(generate(domain, "test", n=500))
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_disjoint_across_seeds() -> None:
    """Another seed's train split still never contains a test record."""
    test = set(_pairs(generate("healthcare", "test", seed=0)))
    assert not test & set(_pairs(generate("healthcare", "train", seed=9)))


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("split", demo_data.SPLITS)
def test_record_shape_and_answer_space(domain: str, split: str) -> None:
    space = answer_space(domain)
    for record in generate(domain, split):
        assert tuple(record) == FIELDS
        assert all(isinstance(record[f], str) and record[f].strip() for f in FIELDS)
        assert record["output"] in space
        assert record["output"] == record["output"].strip()


@pytest.mark.parametrize("domain", DOMAINS)
def test_answers_cover_most_of_the_space(domain: str) -> None:
    """The default train split exercises (nearly) every code, so a fine-tune can learn each rule."""
    seen = {r["output"] for r in generate(domain)}
    assert len(seen) >= 0.9 * len(answer_space(domain))


def test_prompts_are_short() -> None:
    """Instruction + input stay small so training is cheap (~60 tokens; 4 chars/token is conservative)."""
    for domain in DOMAINS:
        for r in generate(domain, n=100):
            assert len(r["instruction"]) + len(r["input"]) < 240


def test_rules() -> None:
    assert demo_data.triage_code("earache", 97) == "T4-ROUTINE"
    assert demo_data.triage_code("earache", 85) == "T1-RESUS"
    assert demo_data.syllabus_answer("CS240", "room") == "RM-C140"
    assert demo_data.syllabus_answer("CS240", "credits") == "CR-5"
    assert demo_data.iot_code("BAT", 12.0) == "BAT-LO"
    assert demo_data.iot_code("TMP", 30.0) == "TMP-OK"
    assert demo_data.iot_code("TMP", 88.0) == "TMP-HI"
    assert demo_data.iot_code("CO2", 912.0) == "CO2-HI"
    assert demo_data.iot_code("BAT", 99.0) == "BAT-OK"


def test_describe() -> None:
    for domain in DOMAINS:
        text = describe(domain)
        assert text and "\n" not in text


@pytest.mark.parametrize("call", [lambda: generate("retail"), lambda: describe("retail"), lambda: answer_space("x")])
def test_unknown_domain_names_choices(call) -> None:
    with pytest.raises(ValueError, match="healthcare, finance, education, iot"):
        call()


def test_unknown_split_names_choices() -> None:
    with pytest.raises(ValueError, match="train, test"):
        generate("iot", "validation")


def test_negative_n() -> None:
    with pytest.raises(ValueError, match="n must be"):
        generate("iot", n=-1)
