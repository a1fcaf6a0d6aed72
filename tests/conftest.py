"""Shared fixtures: a tiny random-init Llama with a tiny trained tokenizer, saved as an HF directory.

Unit tests use it through the same code paths as the real model (``open_model(str(dir), ...)``), so
no network and no model download is needed; the tier runs in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# The fuzz tests draw the same examples on every run (a landing must not depend on a lucky draw); explore new ones
# with HYPOTHESIS_PROFILE=explore (or pytest --hypothesis-seed=N) and keep what they find as explicit cases.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model_dir(path: Path, layers: int = 2, hidden: int = 64) -> Path:
    """Write a tiny LlamaForCausalLM (random init, seed 0) and a BPE tokenizer trained on demo text."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers import decoders as tk_decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fedge.edge_client.training import demo_data

    corpus = [
        f"{r['instruction']}\n\n{r['input']} {r['output']}" for d in demo_data.DOMAINS for r in demo_data.generate(d)
    ]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_session(tiny_model_dir, tmp_path_factory):
    """A ModelSession on the tiny model, fp32 on CPU. Tests must not keep LoRA wrappers on it: use a fresh one."""
    from fedge.common.modeling import open_model

    return open_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"), precision="fp32", device="cpu")


@pytest.fixture()
def fresh_session(tiny_model_dir, tmp_path):
    from fedge.common.modeling import open_model

    return open_model(str(tiny_model_dir), tmp_path / "cache", precision="fp32", device="cpu")
