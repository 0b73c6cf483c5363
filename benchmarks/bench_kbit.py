"""Backward FLOPs under ``prepare_model_for_kbit_training`` + GreenTrainer, before and after its handling.

``prepare_model_for_kbit_training`` (reentrant checkpointing + forced input gradients) makes backprop run to the
embeddings whatever is frozen. GreenTrainer removes that at selection time (``peft_greentrainer/backprop.py``). This
measures, with FlopCounterMode on a real bitsandbytes-quantized model on the CPU, one training step's backward:
as PEFT leaves it, after GreenTrainer's handling, and what the selection predicted.

Usage: ``python benchmarks/bench_kbit.py`` (a LLaMA-shaped model, hidden 256, 4 layers, saved and re-loaded quantized).
"""

from __future__ import annotations

import logging
import tempfile

import torch
import transformers
from peft import get_peft_model, prepare_model_for_kbit_training

from peft_greentrainer import GreenTrainerConfig
from peft_greentrainer.engine.profile import measure_flops

QUANTIZATIONS = {
    "int8": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
}


def main() -> None:
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("peft_greentrainer.backprop").setLevel(logging.ERROR)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, vocab_size=1000
    )
    ids = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    print(
        "| quantization | backward as PEFT prepares it | after GreenTrainer's handling | predicted backward | "
        "full fine-tuning step (fwd + bwd) |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
        for name, quantization in QUANTIZATIONS.items():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                directory, quantization_config=transformers.BitsAndBytesConfig(**quantization), dtype=torch.float32
            )
            model = prepare_model_for_kbit_training(model)
            model = get_peft_model(
                model, GreenTrainerConfig(units="lora", rho=0.5, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
            )
            model.train()
            _, before = measure_flops(model, batch)
            selection = model.select_units([batch], None, lr=1e-4)
            _, after = measure_flops(model, batch)
            profile, full = model.base_model.cost_profile(batch)
            predicted = selection.flops - profile.forward_flops
            print(f"| {name} | {before:.3e} | {after:.3e} ({after / before:.2f}x) | {predicted:.3e} | {full:.3e} |")


if __name__ == "__main__":
    main()
