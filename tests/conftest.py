"""Tiny config-built transformers models shared by the tests (no hub access needed)."""

from __future__ import annotations

import gc
import os
import re
import socket
import sys

import pytest
import torch
import transformers
from packaging.version import Version

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers.logging.set_verbosity_error()
# Tiny models gain nothing from a second thread, and two threads on a shared 2-core machine thrash.
torch.set_num_threads(1)

VOCAB = 128


def pytest_collection_finish(session):
    """Every test module is imported by now: half a million objects that live to the end. Frozen out of the garbage
    collector, they are no longer scanned by each full collection, 0.5 s each (accelerate runs one at the end of every
    ``Trainer.train``; the benchmarks' harness one per run)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _fused_attention_switched_back_on():
    """A model whose SDPA takes a learned bias on the CPU switches the fused CPU kernel off for the process
    (``engine/attention_kernels.py``): each test starts with torch's default."""
    flash = torch.backends.cuda.flash_sdp_enabled()
    yield
    torch.backends.cuda.enable_flash_sdp(flash)


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
        "mixtral": lambda: transformers.MixtralConfig(  # experts stacked in one tensor per projection
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=128,
        ),
        "gpt2": lambda: transformers.GPT2Config(
            n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0
        ),
        "wav2vec2": lambda: transformers.Wav2Vec2Config(  # transformers' default layerdrop (0.1), which is refused
            vocab_size=32,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            mask_time_prob=0.0,
            pad_token_id=0,
            ctc_loss_reduction="mean",
        ),
        "bart": lambda: transformers.BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
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
    attention = overrides.pop("attn_implementation", None)  # a config attribute would be ignored: set it here
    config = tiny_config(arch, **overrides)
    if attention is not None:
        config._attn_implementation = attention
    cls = transformers.T5ForConditionalGeneration if arch == "t5" else transformers.AutoModelForCausalLM
    model = cls(config) if arch == "t5" else cls.from_config(config)
    model.train()
    return model


def _sparse_head_unavailable() -> str | None:
    from peft_greentrainer.sparse_head import unsupported_reason

    with torch.device("meta"):
        return unsupported_reason(transformers.AutoModelForCausalLM.from_config(tiny_config("llama")))


# why this transformers cannot run the sparse LM head (before 5.21 models slice logits_to_keep by hand), or None;
# there the head stays dense, which the tests of the fallback check
SPARSE_HEAD_UNAVAILABLE = _sparse_head_unavailable()
needs_sparse_head = pytest.mark.skipif(
    SPARSE_HEAD_UNAVAILABLE is not None, reason=f"this transformers' LM head stays dense: {SPARSE_HEAD_UNAVAILABLE}"
)
_TRANSFORMERS = Version(transformers.__version__)
# from 5.21 on the head must run: a reason found there is a regression, not an older transformers to skip on
assert SPARSE_HEAD_UNAVAILABLE is None or _TRANSFORMERS.release < (5, 21), SPARSE_HEAD_UNAVAILABLE
# before transformers 5.18 OPT's forward reads its own all-ones mask, which meta tensors cannot answer
needs_opt_on_meta = pytest.mark.skipif(
    Version("5.18") > _TRANSFORMERS, reason="OPT cannot run on meta before transformers 5.18"
)


# TrainingArguments' checkpointing switch: gradient_checkpointing before transformers 5.23 (the GPU machine has 5.17)
CHECKPOINTING = next(
    n
    for n in ("activation_checkpointing", "gradient_checkpointing")
    if n in transformers.TrainingArguments.__dataclass_fields__
)


def end_rank_process() -> None:
    """End a distributed test script's process once its results are written, without interpreter teardown: under
    load, teardown after a gloo process group hung now and then (the DDP negative control 3 runs in about 25, a
    rank of accumulation_window.py once in a full suite), which the test's timeout turns into a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def enable_activation_checkpointing(model: torch.nn.Module, use_reentrant: bool = False) -> None:
    """transformers' activation checkpointing, non-reentrant unless asked (``gradient_checkpointing_enable`` before
    5.23)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": use_reentrant})


def row_scaling_rel(rel: float) -> float:
    """The tolerance of a one-row profile scaled to the whole batch: exact, but before transformers 5.20 Llama's
    rotary embedding runs one small matmul for the whole batch, which scaling over-counts (a few parts per million)."""
    return rel if Version("5.20") <= _TRANSFORMERS else max(rel, 1e-4)


def tiny_batch(model: torch.nn.Module, batch_size: int = 2, seq_len: int = 24, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    if model.config.is_encoder_decoder:
        labels = torch.randint(3, VOCAB, (batch_size, seq_len // 2), generator=generator)
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": ids.clone()}


MISTRAL3_IMAGE_TOKEN = 100


def tiny_mistral3_config(hidden: int = 32) -> transformers.Mistral3Config:
    """A Pixtral vision tower (32x32 images in 4x4 patches, merged 2x2) under a Mistral text model."""
    vision = transformers.PixtralVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=4,
    )  # fmt: skip
    text = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return transformers.Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=MISTRAL3_IMAGE_TOKEN, spatial_merge_size=2
    )


def mistral3_batch(size: int, seed: int = 0, length: int = 48) -> dict[str, torch.Tensor]:
    """Two rows of ``length`` tokens, each with one ``size`` x ``size`` image (padded to 32x32 as Pixtral's processor
    pads a batch's images to its largest) and 8 labelled positions at the end."""
    generator = torch.Generator().manual_seed(seed)
    image_tokens = (size // 8) ** 2  # 4x4 patches, merged 2x2
    text = torch.randint(3, 90, (2, length - image_tokens), generator=generator)
    ids = torch.cat([text[:, :2], torch.full((2, image_tokens), MISTRAL3_IMAGE_TOKEN), text[:, 2:]], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -8:] = ids[:, -8:]
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "image_sizes": torch.tensor([[size, size]] * 2)}


QWEN2_AUDIO_TOKEN = 250


def tiny_qwen2_audio_config(hidden: int = 32) -> transformers.Qwen2AudioConfig:
    """Qwen2-Audio: an encoder over 16 mel bins (64 frames make 16 audio tokens) under a Qwen2 text model."""
    audio = transformers.Qwen2AudioEncoderConfig(
        num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=hidden,
        max_source_positions=32,
    )  # fmt: skip
    text = transformers.Qwen2Config(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    return transformers.Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=QWEN2_AUDIO_TOKEN)


@pytest.fixture(params=["llama", "opt", "bloom", "gpt2", "t5"])
def arch(request) -> str:
    return request.param


WORDS = (  # noqa: SIM905 - a sentence reads better than a list of 30 quoted words
    "the a of to and in model data paper we propose method results show improves task language learning neural "
    "training summary what problem does address do authors find did they"
).split()


def save_tiny_checkpoint(directory, arch: str = "llama", seed: int = 0, hidden: int = 32) -> None:
    """A tiny pretrained-style checkpoint folder (config, safetensors, word-level tokenizer), as a user would have."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in [*WORDS, "TL;DR:"]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    if arch == "t5":
        config = transformers.T5Config(
            d_model=32,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            d_kv=16,
            vocab_size=len(vocab),
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        transformers.T5ForConditionalGeneration(config).save_pretrained(directory)
    else:
        config = transformers.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(vocab),
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
            max_position_embeddings=256,
        )
        transformers.LlamaForCausalLM(config).save_pretrained(directory)


def write_tiny_dataset(path, rows: int = 40, seed: int = 0) -> None:
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            words = [rng.choice(WORDS[:20]) for _ in range(20)]
            handle.write(json.dumps({"document": " ".join(words), "summary": " ".join(words[:4])}) + "\n")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_checkpoint(directory)
    write_tiny_dataset(directory / "data.jsonl")
    return directory


def free_port() -> int:
    """A port nothing listens on, for a multi-process launch's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_reports(stdout: str) -> dict[str, str]:
    """Each rank's "rank N: trained ..." report from the examples' shared stdout, matched anywhere: one rank's line
    can land inside another's."""
    return dict(re.findall(r"rank (\d): (trained \d+ of \d+ units at [\d.]+x FLOPs)", stdout))
