"""Model families beyond the tests' four, each trained the way people train: every step's FLOPs against rho.

The catalogue (``CASES``) holds tiny random models of transformers families whose profiles differ in what they must
follow: fused or grouped attention projections, parallel attention and MLP blocks (Falcon, GPT-J, Phi, Cohere),
sliding windows and soft caps (Gemma 2/3), stacked experts (Qwen3-MoE), state-space and recurrent blocks (Mamba,
RWKV), an audio encoder (Whisper), and the classification, token-classification and question-answering heads PEFT
wraps. ``tests/test_architectures.py`` checks one selection of each; this script trains each in a ``Trainer`` with
the recipe's usual settings (bf16 autocast, activation checkpointing, warmup then cosine, gradient accumulation,
rows of different lengths padded per batch) and measures every step with ``FlopCounterMode``: forward and backward
with the flags it trained with, against full fine-tuning of the base model on the same batch, measured the same way.

Steps at a batch shape the tuner had not seen yet also run that shape's one-row profile inside the step; they are
reported apart (``profiling steps``), since their count includes the profile.

Usage: ``python benchmarks/families.py [--families qwen2 gemma2 ...] [--rho-tensors 0.5] [--rho-lora 0.6]``: one
JSON per run under ``benchmarks/results/families/``, then ``families.md`` rebuilt from every file there (about 4
minutes for all on 2 CPU cores). A run whose file exists is skipped (``--again`` reruns).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig
from peft_greentrainer.engine.profile import measure_flops

RESULTS = Path(__file__).resolve().parent / "results" / "families"
VOCAB = 128
# the common size; each family's config names what it calls differently
SIZE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
)
LINEAR_ATTENTION = dict(
    head_dim=16,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    layer_types=["linear_attention", "full_attention"],
)
ENCODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
SEQ2SEQ = dict(
    vocab_size=VOCAB,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
)


@dataclass
class Case:
    """A family: its config, the head class, its LoRA targets and PEFT's task type for that head."""

    config: Callable[[], transformers.PretrainedConfig]
    head: type = transformers.AutoModelForCausalLM
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    task_type: str | None = "CAUSAL_LM"

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.head.from_config(self.config())

    def peft_config(self, units: str, rho: float) -> GreenTrainerConfig:
        lora = {"r": 4, "target_modules": self.targets} if units == "lora" else {}
        return GreenTrainerConfig(units=units, rho=rho, task_type=self.task_type, **lora)


def _causal(model_type: str, **overrides) -> Callable[[], transformers.PretrainedConfig]:
    return lambda: transformers.AutoConfig.for_model(model_type, **{**SIZE, **overrides})


CASES = {
    "qwen2": Case(_causal("qwen2")),
    "qwen3": Case(_causal("qwen3", head_dim=16)),
    "mistral": Case(_causal("mistral")),
    "gemma": Case(_causal("gemma", head_dim=16)),
    "gemma2": Case(_causal("gemma2", head_dim=16, sliding_window=8)),
    "gemma3_text": Case(_causal("gemma3_text", head_dim=16, sliding_window=8)),
    "phi3": Case(_causal("phi3"), targets=["qkv_proj"]),
    "phi": Case(_causal("phi")),
    "gpt_neox": Case(_causal("gpt_neox"), targets=["query_key_value"]),
    "falcon": Case(
        lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
        targets=["query_key_value"],
    ),
    "stablelm": Case(_causal("stablelm")),
    "starcoder2": Case(_causal("starcoder2")),
    "olmo2": Case(_causal("olmo2")),
    "granite": Case(_causal("granite")),
    "cohere": Case(_causal("cohere")),
    "gptj": Case(lambda: transformers.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
    "qwen3_moe": Case(
        _causal("qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    ),
    # DeepSeek-V3.2's sparse attention (GLM-5): an indexer scores tokens under torch.no_grad, which has no backward
    "glm_moe_dsa": Case(
        _causal(
            "glm_moe_dsa",
            num_key_value_heads=4,
            head_dim=8,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            index_head_dim=16,
            index_n_heads=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            mlp_layer_types=["dense", "sparse"],
        ),
        targets=["q_b_proj", "kv_b_proj", "wq_b"],  # wq_b: the indexer's, whose adapter takes no gradient
    ),
    # hybrids of linear and full attention, whose scans also compute a final state that training discards
    "qwen3_5_text": Case(_causal("qwen3_5_text", **LINEAR_ATTENTION), targets=["q_proj", "v_proj", "in_proj_qkv"]),
    "qwen3_next": Case(
        _causal(
            "qwen3_next",
            **LINEAR_ATTENTION,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        targets=["q_proj", "v_proj", "in_proj_qkvz"],
    ),
    "minimax": Case(
        _causal(
            "minimax",
            head_dim=16,
            num_local_experts=2,
            num_experts_per_tok=1,
            layer_types=["linear_attention", "full_attention"],
            block_size=16,
        )
    ),
    "mamba": Case(
        lambda: transformers.MambaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=8),
        targets=["in_proj", "x_proj"],  # PEFT refuses LoRA on Mamba's out_proj
    ),
    "rwkv": Case(
        lambda: transformers.RwkvConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64, intermediate_size=128
        ),
        targets=["key", "value"],
    ),
    "bart": Case(
        lambda: transformers.BartConfig(**SEQ2SEQ), head=transformers.AutoModelForSeq2SeqLM, task_type="SEQ_2_SEQ_LM"
    ),
    "whisper": Case(  # PEFT's seq2seq wrapper would pass input_ids, which Whisper does not take: no task type
        lambda: transformers.WhisperConfig(
            **SEQ2SEQ,
            num_mel_bins=16,
            max_source_positions=32,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            decoder_start_token_id=1,
            eos_token_id=2,
        ),
        head=transformers.AutoModelForSpeechSeq2Seq,
        task_type=None,
    ),
    "bert-classification": Case(
        lambda: transformers.BertConfig(**ENCODER, num_labels=3),
        head=transformers.AutoModelForSequenceClassification,
        targets=["query", "value"],
        task_type="SEQ_CLS",
    ),
    "modernbert-classification": Case(
        lambda: transformers.ModernBertConfig(**ENCODER, num_labels=3, pad_token_id=0),
        head=transformers.AutoModelForSequenceClassification,
        targets=["Wqkv"],
        task_type="SEQ_CLS",
    ),
    "llama-classification": Case(
        _causal("llama", num_labels=3), head=transformers.AutoModelForSequenceClassification, task_type="SEQ_CLS"
    ),
    "bert-token-classification": Case(
        lambda: transformers.BertConfig(**ENCODER, num_labels=3),
        head=transformers.AutoModelForTokenClassification,
        targets=["query", "value"],
        task_type="TOKEN_CLS",
    ),
    "qwen2-question-answering": Case(
        _causal("qwen2"), head=transformers.AutoModelForQuestionAnswering, task_type="QUESTION_ANS"
    ),
}


def example(config: transformers.PretrainedConfig, task_type: str | None, length: int, seed: int) -> dict:
    """One unpadded example of ``length`` tokens with the targets its head's loss takes."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(config, transformers.WhisperConfig):  # log-mel features of the one length Whisper takes
        features = torch.randn(config.num_mel_bins, 2 * config.max_source_positions, generator=generator)
        return {"input_features": features, "labels": torch.randint(3, VOCAB, (length // 2,), generator=generator)}
    ids = torch.randint(3, VOCAB, (length,), generator=generator)
    if task_type == "SEQ_CLS":
        return {"input_ids": ids, "labels": torch.tensor(seed % 3)}
    if task_type == "TOKEN_CLS":
        return {"input_ids": ids, "labels": ids % 3}
    if task_type == "QUESTION_ANS":
        return {"input_ids": ids, "start_positions": torch.tensor(1), "end_positions": torch.tensor(length - 2)}
    if task_type == "SEQ_2_SEQ_LM":
        return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (length // 2,), generator=generator)}
    return {"input_ids": ids, "labels": ids.clone()}


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Pad per batch: inputs with 0 and an attention mask, per-token labels with -100; stack the rest."""
    batch = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key in ("input_ids", "labels") and values[0].dim() == 1:
            pad = 0 if key == "input_ids" else -100
            batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)
        else:
            batch[key] = torch.stack(values)
    if "input_ids" in batch:
        lengths = torch.tensor([len(e["input_ids"]) for e in examples])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
    return batch


def full_fine_tuning_flops(model, batch: dict) -> float:
    """Forward and backward of the base model with every tensor trainable and no adapter, measured."""
    base = model.base_model.model
    names = [n for n, p in base.named_parameters() if "lora_" not in n and p.dtype.is_floating_point]
    if model.base_model.units_kind == "lora":
        with model.disable_adapter():
            return sum(measure_flops(base, batch, names))
    return sum(measure_flops(base, batch, names))


class _MeasuredTrainer(transformers.Trainer):
    """Counts each step's FLOPs; the step's flags are the ones it trained with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[dict] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        tuner = model.base_model
        shapes = len(tuner._pricer.shape_costs)
        with FlopCounterMode(display=False) as counter:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if tuner.greentrainer_state.history:  # steps before the first selection train everything
            self.steps.append({"flops": counter.get_total_flops(), "profiled": len(tuner._pricer.shape_costs) > shapes})
            self.steps[-1]["full"] = full_fine_tuning_flops(model, inputs)
        return loss


def run(family: str, units: str, rho: float) -> dict:
    """Train ``family`` for two epochs of 48 examples (6 to 16 tokens) and measure every step."""
    case = CASES[family]
    model = get_peft_model(case.model(), case.peft_config(units, rho))
    lengths = random.Random(0)
    rows = [example(model.config, case.task_type, lengths.randint(6, 16), seed) for seed in range(48)]
    data = datasets.Dataset.from_list([{k: v.tolist() for k, v in row.items()} for row in rows]).with_format("torch")
    checkpointing = next(
        n
        for n in ("activation_checkpointing", "gradient_checkpointing")
        if n in transformers.TrainingArguments.__dataclass_fields__
    )
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            use_cpu=True,
            bf16=True,
            report_to=[],
            save_strategy="no",
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            num_train_epochs=2,
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
            **{checkpointing: True},
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        trainer = _MeasuredTrainer(
            model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[GreenTrainerCallback()]
        )
        try:
            trainer.train()
        except ValueError as error:  # a rho below what this model can do at all: the clear error users get
            if "smallest feasible rho" not in str(error):
                raise
            return {"family": family, "units": units, "rho": rho, "refused": str(error).split(":")[0]}
    steady = [s["flops"] / s["full"] for s in trainer.steps if not s["profiled"]]
    profiling = [s["flops"] / s["full"] for s in trainer.steps if s["profiled"]]
    return {
        "family": family,
        "units": units,
        "rho": rho,
        "selections": len(model.base_model.greentrainer_state.history),
        "steps": len(steady),
        "max_ratio": max(steady, default=None),
        "min_ratio": min(steady, default=None),
        "profiling_steps": len(profiling),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def report(results: Path = RESULTS) -> str:
    """The table of every result file there."""
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    lines = [
        "| family | units | rho | selections | steps measured | max step / full | min | profiling steps | within rho |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['family']} | {r['units']} | {r['rho']} | refused: {r['refused']} | | | | | |")
            continue
        within = "yes" if r["max_ratio"] is not None and r["max_ratio"] <= r["rho"] else "NO"
        figures = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("max_ratio", "min_ratio")]
        lines.append(
            f"| {r['family']} | {r['units']} | {r['rho']} | {r['selections']} | {r['steps']} | {figures[0]} | "
            f"{figures[1]} | {r['profiling_steps']} | {within} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rho-tensors", type=float, default=0.5)
    parser.add_argument("--rho-lora", type=float, default=0.6)  # the tiniest LoRA models need just above 0.5
    parser.add_argument("--again", action="store_true", help="rerun runs whose result file exists")
    args = parser.parse_args()
    logging.getLogger("peft_greentrainer").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for family in args.families:
        for units, rho in (("tensors", args.rho_tensors), ("lora", args.rho_lora)):
            path = RESULTS / f"{family}-{units}.json"
            if path.exists() and not args.again:
                continue
            result = run(family, units, rho)
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{family} {units}: {result.get('max_ratio', result.get('refused'))}", flush=True)
    (RESULTS.parent / "families.md").write_text(report())
    print(report())


if __name__ == "__main__":
    main()
