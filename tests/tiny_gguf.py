"""Write a tiny random-init Qwen2 model as a GGUF file (fp32 tensors), for tests of the GGUF path.

Qwen2 rather than Llama on purpose: fedge must take any GGUF architecture transformers reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if name in fixed:
        return fixed[name]
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, *rest = name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{_TENSORS[module]}.{kind}"


def write_tiny_qwen2_gguf(path: Path, tokenizer_dir: Path, layers: int = 2, hidden: int = 64):
    """Write the GGUF and return the torch model it holds (to compare against after loading)."""
    import gguf
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [""] * len(tok)
    for text, idx in {**spec["model"]["vocab"], **added}.items():
        tokens[idx] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_block_count(layers)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in added else 1 for t in tokens])  # 3: control token
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    for name, value in model.state_dict().items():
        writer.add_tensor(_gguf_name(name), value.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
