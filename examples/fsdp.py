"""GreenTrainer under FSDP2: transformers.Trainer shards parameters, gradients and optimizer state across processes.

accelerate launch --config_file examples/fsdp_config.yaml examples/fsdp.py               # 2 processes, tiny LLaMA
accelerate launch --config_file examples/fsdp_config.yaml examples/fsdp.py --model PATH  # a real causal LM
accelerate launch --config_file examples/fsdp_config.yaml examples/fsdp.py --units lora

The config asks for FSDP2 (``fsdp_version: 2``) with one shard group per decoder layer, activation checkpointing and
bf16 mixed precision; without it (``torchrun`` alone) the same script trains with DDP. Every rank computes importance
on its shards and the ranks sum the partial importances, so all of them select the same units.
"""

import argparse
import os

import torch
import torch.distributed as dist
import transformers
from peft import get_peft_model
from torch.distributed.tensor import DTensor
from trainer_tensors import load

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig, fsdp

OUTPUT = "greentrainer-example"


def fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on CPU processes (gloo), to try this example, or test FSDP2, without GPUs.

    accelerate 1.15 turns its FSDP plugin on for GPU-like devices only and trains with DDP on CPU instead, although
    ``fully_shard`` itself works there. GPUs need none of this.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_fsdp_on_cpu", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self.mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self.mixed_precision)

    __init__._fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--units", choices=["tensors", "lora"], default="tensors")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (smoke tests)")
    args = parser.parse_args()

    on_cpu = not (torch.cuda.is_available() or torch.xpu.is_available())
    if on_cpu:
        fsdp_on_cpu()
    base, dataset = load(args.model)
    lora = {"r": 8, "target_modules": ["q_proj", "v_proj"]} if args.units == "lora" else {}
    model = get_peft_model(base, GreenTrainerConfig(rho=args.rho, units=args.units, **lora))
    training_args = transformers.TrainingArguments(
        output_dir=OUTPUT,
        use_cpu=on_cpu,  # CPU processes talk over gloo
        num_train_epochs=2,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,  # per rank: the global batch is 4 x number of processes
        learning_rate=1e-3,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        # FSDP comes from the accelerate config; TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2, ...})
        # does the same without it. FSDP1 and DeepSpeed are refused with an error.
    )
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=dataset, callbacks=[GreenTrainerCallback()]
    )
    if trainer.is_fsdp_enabled and trainer.accelerator.mixed_precision == "bf16":
        # compute in bf16, keep the sharded fp32 weights and reduce gradients in fp32 (accelerate's bf16 default
        # reduces in bf16); GreenTrainer's importance then reads fp32 gradients and optimizer state
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = policy
    trainer.train()

    last = model.greentrainer_state.last
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in trainer.model.parameters())
    total = sum(p.numel() for p in trainer.model.parameters())
    report = f"rank {rank}: trained {len(last.selected)} of {last.num_units} units at {last.predicted_ratio:.2f}x FLOPs"
    print(report, flush=True)  # now, not at exit: the ranks share one stdout
    print(f"rank {rank} holds {local} of {total} parameter values", flush=True)
    # every rank takes part (the adapter's tensors are gathered); rank 0 writes it, atomically
    directory = os.path.join(OUTPUT, "adapter-fsdp")
    if trainer.is_fsdp_enabled:
        fsdp.save_adapter(trainer.model, directory)
    elif trainer.is_world_process_zero():
        model.save_pretrained(directory)
    # tear the process group down before exit: a gloo group left alive can abort a rank at interpreter shutdown
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
