"""GreenTrainer with transformers.Trainer, units="tensors": train the model's own tensors that pay, under rho.

python examples/trainer_tensors.py                      # tiny config-built LLaMA, synthetic data, offline
python examples/trainer_tensors.py --model PATH         # a real causal LM (local dir or hub id)
"""

import argparse

import torch
import transformers
from datasets import Dataset
from peft import get_peft_model

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig

TEXTS = [
    "GreenTrainer selects the tensors whose update reduces the loss most per FLOP.",
    "Frozen tensors cost no weight gradient, and nothing below the deepest trained one is backpropagated.",
] * 16


def load(model_name: str | None):
    """A (model, dataset) pair: a tiny random LLaMA on synthetic ids, or a real model on a few sentences."""
    if model_name is None:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=256
        )
        ids = [[(3 * i + j) % 256 for j in range(32)] for i in range(32)]
        return transformers.LlamaForCausalLM(config), Dataset.from_dict({"input_ids": ids, "labels": ids})
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_name)
    ids = [tokenizer(t, max_length=32, truncation=True, padding="max_length")["input_ids"] for t in TEXTS]
    return transformers.AutoModelForCausalLM.from_pretrained(model_name), Dataset.from_dict(
        {"input_ids": ids, "labels": ids}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (smoke tests)")
    args = parser.parse_args()

    base, dataset = load(args.model)
    # Every float tensor is a candidate; each epoch the callback keeps those that pay and freezes the rest.
    model = get_peft_model(base, GreenTrainerConfig(rho=args.rho, units="tensors"))
    training_args = transformers.TrainingArguments(
        output_dir="greentrainer-example",
        num_train_epochs=2,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=4,
        report_to=[],
        save_strategy="no",
    )
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=dataset, callbacks=[GreenTrainerCallback()]
    )
    trainer.train()
    last = model.greentrainer_state.last
    print(f"trained {len(last.selected)} of {last.num_units} tensors at {last.predicted_ratio:.2f}x full FT FLOPs")
    model.save_pretrained("greentrainer-example/adapter")  # only the tensors that were ever trained


if __name__ == "__main__":
    main()
