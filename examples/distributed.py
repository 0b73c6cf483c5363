"""GreenTrainer on several processes: transformers.Trainer + DistributedDataParallel, one selection on every rank.

torchrun --nproc_per_node=2 examples/distributed.py               # CPU (gloo): tiny config-built LLaMA, offline
torchrun --nproc_per_node=2 examples/distributed.py --model PATH  # a real causal LM; the same command uses the GPUs
python examples/distributed.py                                    # also runs as a single process
"""

import argparse

import torch.distributed as dist
import transformers
from peft import get_peft_model
from trainer_tensors import load

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--units", choices=["tensors", "lora"], default="tensors")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (smoke tests)")
    args = parser.parse_args()

    # Every rank builds the same model; DDP broadcasts rank 0's weights when the Trainer wraps it.
    base, dataset = load(args.model)
    lora = {"r": 8, "target_modules": ["q_proj", "v_proj"]} if args.units == "lora" else {}
    model = get_peft_model(base, GreenTrainerConfig(rho=args.rho, units=args.units, **lora))
    training_args = transformers.TrainingArguments(
        output_dir="greentrainer-example",
        num_train_epochs=2,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,  # per rank: the global batch is 4 x number of processes
        learning_rate=1e-3,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        # Nothing distributed to configure: torchrun sets the environment and the Trainer wraps the model in DDP.
        # The callback makes DDP follow the changing selections (find_unused_parameters=True, every unit
        # registered), overriding ddp_find_unused_parameters=False / ddp_static_graph=True if they are set.
        # FSDP and DeepSpeed are refused with an error.
    )
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=dataset, callbacks=[GreenTrainerCallback()]
    )
    trainer.train()

    # Each rank evaluated importance on its part of the same global batches and the gradients were averaged, so
    # every rank made the same selections; the FLOPs ratio is per rank and the same on all of them.
    last = model.greentrainer_state.last
    rank = dist.get_rank() if dist.is_initialized() else 0
    report = f"rank {rank}: trained {len(last.selected)} of {last.num_units} units at {last.predicted_ratio:.2f}x FLOPs"
    print(report, flush=True)  # now, not at exit: the ranks share one stdout
    if trainer.is_world_process_zero():  # the ranks hold identical weights: one of them saves
        model.save_pretrained("greentrainer-example/adapter-distributed")
    # tear the process group down before exit: a gloo group left alive can abort a rank at interpreter shutdown
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
