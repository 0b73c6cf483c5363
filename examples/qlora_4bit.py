"""GreenTrainer on a 4-bit (bitsandbytes nf4) backbone, prepared the usual QLoRA way (works on the CPU too).

python examples/qlora_4bit.py                  # tiny LLaMA saved to a temp dir and re-loaded in 4 bits
python examples/qlora_4bit.py --model PATH     # a real causal LM, loaded in 4 bits
"""

import argparse
import logging
import tempfile

import torch
import transformers
from peft import get_peft_model, prepare_model_for_kbit_training
from trainer_tensors import load

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (smoke tests)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # shows what GreenTrainer changes in the preparation, and why

    base, dataset = load(args.model)
    with tempfile.TemporaryDirectory() as directory:
        base.save_pretrained(directory)
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization)
    # The standard QLoRA preparation turns on reentrant checkpointing and forces input gradients, which would make
    # backprop run to the embeddings; GreenTrainer undoes that at its first selection and says so in the log.
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(
        model, GreenTrainerConfig(rho=0.6, units="lora", r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
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
    transformers.Trainer(
        model=model, args=training_args, train_dataset=dataset, callbacks=[GreenTrainerCallback()]
    ).train()
    last = model.greentrainer_state.last
    print(
        f"4-bit backbone: trained {len(last.selected)} of {last.num_units} adapters at "
        f"{last.predicted_ratio:.2f}x full FT FLOPs"
    )


if __name__ == "__main__":
    main()
