"""Exact match scores answers of any length: the generation limit comes from the references, not a constant."""

from __future__ import annotations

import torch

from fedge.common.modeling import LoraSettings, add_lora
from fedge.edge_client.training.data import Example
from fedge.edge_client.training.evaluate import answer_token_limit, evaluate
from fedge.edge_client.training.session import epoch_maker
from fedge.edge_client.training.train import TrainConfig, train

# Replies of 21-27 tokens in the tiny tokenizer: longer than any fixed cap of 16 new tokens.
LONG = [
    Example(
        messages=(
            ("user", f"Code for ledger line {i}?"),
            ("assistant", f"FUEL-520 TRAVEL-{i}10 GROCERY-31{i} RENT-9{i}0"),
        )
    )
    for i in range(4)
]


def test_the_limit_covers_the_longest_reference(tiny_session):
    tok = tiny_session.tokenizer
    longest = max(len(tok(ex.answer, add_special_tokens=False)["input_ids"]) for ex in LONG)
    assert longest > 16
    assert answer_token_limit(tok, LONG) > longest
    assert answer_token_limit(tok, [Example(text="plain text has no reference reply")]) > 0


def test_a_model_that_learned_long_answers_scores_them(fresh_session):
    # Memorize four long replies, then score them: every greedy answer must come out whole.
    lora = LoraSettings(r=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    cfg = TrainConfig(steps=80, micro_batch=4, lr=1e-2, warmup_steps=0, lr_schedule="constant", seq_len=64, lora=lora)
    model = add_lora(fresh_session.model, cfg.lora, seed=0)
    train(model, epoch_maker(fresh_session.tokenizer, LONG, cfg), cfg, torch.device("cpu"))
    result = evaluate(model, fresh_session.tokenizer, [], LONG, torch.device("cpu"))
    assert result.exact_match == 1.0
    capped = evaluate(model, fresh_session.tokenizer, [], LONG, torch.device("cpu"), max_new_tokens=16)
    assert capped.exact_match == 0.0  # what a fixed 16-token cap scored


def _generation_only(model, tok, examples, limit) -> list[bool]:
    from fedge.edge_client.training.evaluate import generate_answers, normalize_answer

    replies = generate_answers(model, tok, examples, torch.device("cpu"), max_new_tokens=limit)
    return [normalize_answer(r) == normalize_answer(ex.answer) for r, ex in zip(replies, examples)]


def test_the_teacher_forced_check_decides_exact_match_as_generation_does(fresh_session, monkeypatch):
    # References the model reproduces (its own greedy replies, trimmed to end where it ends), references it does not
    # (the demo's), and the same with a changed last character: every verdict must equal generation's.
    from fedge.edge_client.training import demo_data
    from fedge.edge_client.training.evaluate import generate_answers, teacher_forced_matches

    lora = LoraSettings(r=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    cfg = TrainConfig(steps=40, micro_batch=4, lr=1e-2, warmup_steps=0, lr_schedule="constant", seq_len=64, lora=lora)
    model = add_lora(fresh_session.model, cfg.lora, seed=0)
    train(model, epoch_maker(fresh_session.tokenizer, LONG, cfg), cfg, torch.device("cpu"))
    tok, cpu = fresh_session.tokenizer, torch.device("cpu")
    demo = [Example(messages=(("user", r["instruction"] + "\n\n" + r["input"]), ("assistant", r["output"])))
            for r in demo_data.generate("finance")[:12]]  # fmt: skip
    own = generate_answers(model, tok, LONG + demo, cpu, max_new_tokens=30)
    mine = [Example(messages=(ex.messages[0], ("assistant", reply))) for ex, reply in zip(LONG + demo, own) if reply]
    changed = [Example(messages=(ex.messages[0], ("assistant", ex.answer[:-1] + "#"))) for ex in mine]
    examples = LONG + demo + mine + changed
    limit = answer_token_limit(tok, examples)
    check = teacher_forced_matches(model, tok, examples, cpu, limit)
    truth = _generation_only(model, tok, examples, limit)
    decided = [(i, v) for i, v in enumerate(check.verdicts) if v is not None]
    assert all(truth[i] == v for i, v in decided), [(i, v, truth[i]) for i, v in decided if truth[i] != v]
    assert any(v for _, v in decided) and any(not v for _, v in decided)
    assert len(check.undecided) <= len(examples) // 4, check.undecided  # generation left for the few
    result = evaluate(model, tok, [], examples, cpu, max_new_tokens=limit)
    assert result.exact_match == sum(truth) / len(truth) and result.n_decoded == len(check.undecided)
    # the held-out loss from the same pass: as the loss batches measure it, every labelled token counted once
    from fedge.edge_client.training.session import eval_batches

    separate = evaluate(model, tok, eval_batches(tok, examples, 256), examples, cpu, max_new_tokens=limit)
    shared = evaluate(model, tok, None, examples, cpu, max_new_tokens=limit, seq_len=256)
    assert shared.exact_match == separate.exact_match and shared.n_loss == separate.n_loss > 0
    assert abs(shared.loss - separate.loss) <= 1e-4 * separate.loss
    # rows longer than seq_len are cut as training cuts them: then the loss has a pass of its own, on those rows
    cut = evaluate(model, tok, None, examples, cpu, max_new_tokens=limit, seq_len=20)
    assert cut.n_loss == evaluate(model, tok, eval_batches(tok, examples, 20), [], cpu).n_loss != shared.n_loss
    assert cut.exact_match == shared.exact_match
    # near ties (bf16 or quantized weights: `tie_margin`) are left to generation: with every gap a tie, all are
    from fedge.edge_client.training import evaluate as ev

    monkeypatch.setattr(ev, "tie_margin", lambda *modules: float("inf"))
    assert ev.teacher_forced_matches(model, tok, examples, cpu, limit).verdicts == [None] * len(examples)
    tied = evaluate(model, tok, [], examples, cpu, max_new_tokens=limit)
    assert tied.n_decoded == len(examples) and tied.exact_match == result.exact_match


def test_tie_margin_is_wider_where_the_arithmetic_is_not_exact():
    from fedge.edge_client.training.evaluate import tie_margin

    fp32, bf16 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert tie_margin(fp32) < 0.01 < tie_margin(fp32, bf16) == tie_margin(bf16)
