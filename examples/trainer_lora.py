"""GreenTrainer with transformers.Trainer, units="lora": insert LoRA adapters, train only those that pay.

python examples/trainer_lora.py                         # tiny config-built LLaMA, synthetic data, offline
python examples/trainer_lora.py --model PATH            # a real causal LM (local dir or hub id)
"""

import argparse

import transformers
from peft import get_peft_model
from trainer_tensors import load

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig, export_lora_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--rho", type=float, default=0.6)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (smoke tests)")
    args = parser.parse_args()

    base, dataset = load(args.model)
    # The usual LoRA fields apply; rho is still a fraction of *full fine-tuning* FLOPs of the base model.
    config = GreenTrainerConfig(
        rho=args.rho,
        units="lora",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    training_args = transformers.TrainingArguments(
        output_dir="greentrainer-example",
        num_train_epochs=2,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=4,
        report_to=[],
        save_strategy="no",
    )
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=dataset, callbacks=[GreenTrainerCallback()]
    )
    trainer.train()
    last = model.greentrainer_state.last
    print(
        f"trained {len(last.selected)} of {last.num_units} adapters: {last.predicted_ratio:.2f}x full FT FLOPs, "
        f"{last.ratio_vs_lora:.2f}x plain LoRA"
    )
    model.save_pretrained("greentrainer-example/adapter")
    # A plain LoraConfig adapter: loads with PEFT alone, or in any serving stack that accepts LoRA adapters.
    export_lora_adapter(model, "greentrainer-example/lora-export")


if __name__ == "__main__":
    main()
