"""Tiny config-built transformers models shared by the tests (no hub access needed)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers.logging.set_verbosity_error()

VOCAB = 128


def tiny_config(arch: str, **overrides):
    """Config of a ~100k-parameter model of the given architecture."""
    configs = {
        "llama": lambda: transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        ),
        "opt": lambda: transformers.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=VOCAB,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        "bloom": lambda: transformers.BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=VOCAB),
        "gpt2": lambda: transformers.GPT2Config(
            n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0
        ),
        "t5": lambda: transformers.T5Config(
            d_model=64,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            d_kv=16,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
    }
    config = configs[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    cls = transformers.T5ForConditionalGeneration if arch == "t5" else transformers.AutoModelForCausalLM
    model = cls(config) if arch == "t5" else cls.from_config(config)
    model.train()
    return model


def tiny_batch(model: torch.nn.Module, batch_size: int = 2, seq_len: int = 24, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    if model.config.is_encoder_decoder:
        labels = torch.randint(3, VOCAB, (batch_size, seq_len // 2), generator=generator)
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture(params=["llama", "opt", "bloom", "gpt2", "t5"])
def arch(request) -> str:
    return request.param
