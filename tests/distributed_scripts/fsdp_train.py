"""Train a tiny LLaMA with ``Trainer`` + ``GreenTrainerCallback`` under FSDP2; used by ``tests/test_fsdp.py``.

Run under ``torchrun --nproc_per_node=2 ... --fsdp`` (FSDP2 on CPU with gloo) or as a plain script without ``--fsdp``
(the single-process reference on the same global batches). Rank 0 writes ``result.pt`` to ``--out``: the gathered
full parameters, every rank's selection history and trainable tensors, the FLOPs FlopCounterMode counted in each
training step next to the tuner's prediction, and the adapter written by ``peft_greentrainer.fsdp.save_adapter``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode
from train import collate, dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
from conftest import CHECKPOINTING, enable_activation_checkpointing, end_rank_process, tiny_model
from fsdp import fsdp_on_cpu  # examples/fsdp.py: accelerate enables FSDP on GPU-like devices only
from peft import get_peft_model

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig, fsdp, save_adapter
from peft_greentrainer.engine.profile import measure_flops
from peft_greentrainer.ranks import gather, rank_and_world_size


class Recorder(TrainerCallback):
    """After GreenTrainerCallback: the trainable tensors (unwrapped names) at every step where they changed."""

    def __init__(self):
        self.trainable: list[tuple[int, list[str]]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        names = sorted(fsdp.canonical_name(n) for n, p in model.named_parameters() if p.requires_grad)
        if not self.trainable or self.trainable[-1][1] != names:
            self.trainable.append((state.global_step, names))


class CountingTrainer(Trainer):
    """Counts each training step's FLOPs with FlopCounterMode, next to what the selection predicted for it."""

    steps: list[tuple[int, float, float]]
    freeze_before_wrap = False
    resuming = False

    def create_optimizer(self, model=None):
        """--freeze-before-train: AdamW over every candidate, then all but the first unit frozen before FSDP wraps the
        model (the Trainer refuses a user's optimizer under FSDP). Not when resuming: the checkpoint's optimizer state
        is loaded for the parameters that require grad then (as in any resumed GreenTrainer run, all candidates)."""
        if not self.freeze_before_wrap:
            return super().create_optimizer(model)
        tuner = self.model.base_model
        params = [p for unit in tuner.candidate_units() for p in unit.parameters(tuner.model)]
        self.optimizer = torch.optim.AdamW(params, lr=self.args.learning_rate, eps=self.args.adam_epsilon)
        if not self.resuming:
            tuner.restore_selection([tuner.candidate_units()[0].name])
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        with FlopCounterMode(display=False) as counter:
            loss = super().training_step(model, inputs, num_items_in_batch)
        predicted = self.model.base_model.step_flops_ratios()
        self.steps.append((self.state.global_step, float(counter.get_total_flops()), predicted[0]))
        return loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--units", choices=["tensors", "lora"], default="tensors")
    parser.add_argument("--batch-size", type=int, default=2, help="per device")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 through TrainingArguments")
    parser.add_argument("--state-dict-type", default="FULL_STATE_DICT", help="checkpoint format under FSDP2")
    parser.add_argument("--activation-checkpointing", action="store_true", help="through the FSDP config under FSDP")
    parser.add_argument("--mixed-precision", action="store_true", help="bf16 parameters, fp32 gradient reduction")
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument(
        "--freeze-before-train",
        action="store_true",
        help="train only the first candidate unit until the first selection, so FSDP wraps the others frozen",
    )
    cli = parser.parse_args()

    torch.set_num_threads(1)
    if cli.fsdp:
        fsdp_on_cpu()
    lora = {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 4} if cli.units == "lora" else {}
    # dense LM head in both runs: FSDP2 keeps it dense (fsdp.py), and the single process must compute the same
    config = GreenTrainerConfig(rho=cli.rho, units=cli.units, importance_batches=2, sparse_lm_head=False, **lora)
    model = get_peft_model(tiny_model("llama"), config)
    tuner = model.base_model
    sharding = {}
    if cli.activation_checkpointing and not cli.fsdp:  # the single-process reference: transformers' own
        sharding = {CHECKPOINTING: True, f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}}
    if cli.fsdp:
        fsdp_config = {
            "version": 2,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "state_dict_type": cli.state_dict_type,
            "activation_checkpointing": cli.activation_checkpointing,
        }
        sharding = {"fsdp": "full_shard", "fsdp_config": fsdp_config}
    args = TrainingArguments(
        output_dir=os.path.join(cli.out, "trainer"),
        use_cpu=True,
        report_to=[],
        save_strategy="steps" if cli.save_steps else "no",
        save_steps=cli.save_steps or 500,
        learning_rate=1e-3,
        adam_epsilon=1e-6,  # near-zero gradients (float noise) do not get full-size Adam steps
        lr_scheduler_type="constant",
        logging_steps=1,
        num_train_epochs=cli.epochs,
        per_device_train_batch_size=cli.batch_size,
        train_sampling_strategy="sequential",
        dataloader_drop_last=True,
        seed=0,
        disable_tqdm=True,
        **sharding,
    )
    recorder = Recorder()
    train_data = dataset(cli.samples)
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        data_collator=collate,
        callbacks=[GreenTrainerCallback(), recorder],
    )
    trainer.steps, trainer.freeze_before_wrap, trainer.resuming = [], cli.freeze_before_train, bool(cli.resume)
    if cli.mixed_precision:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = policy
    compute_dtypes = set()
    q_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    q_proj.register_forward_pre_hook(lambda module, args: compute_dtypes.add(str(module.weight.dtype)))
    trainer.train(resume_from_checkpoint=cli.resume)

    rank, world_size = rank_and_world_size()
    root = trainer.model
    if cli.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(root, options=options)
        fsdp.save_adapter(root, os.path.join(cli.out, "adapter"))
    else:
        state = {name: value.detach().clone() for name, value in root.state_dict().items()}
        save_adapter(root, os.path.join(cli.out, "adapter"))
    history = [(r.step, r.selected, r.predicted_ratio) for r in tuner.greentrainer_state.history]
    batch = collate([train_data[i] for i in range(cli.batch_size)])  # one per-device batch
    per_rank = {
        "history": history,
        "trainable": recorder.trainable,
        "steps": trainer.steps,
        "full_predicted": tuner.cost_profile(batch)[1],
        "shard_dtypes": sorted({str(p.dtype) for p in root.parameters()}),
        "local_values": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in root.parameters()),
        "total_values": sum(p.numel() for p in root.parameters()),
        "compute_dtypes": sorted(compute_dtypes),
        "trained_tensors": list(tuner.greentrainer_state.trained_tensors),
        "importance": dict(tuner.greentrainer_state.importance),
    }
    ranks = gather(per_rank)
    if rank == 0:
        reference = tiny_model("llama")
        if cli.activation_checkpointing:
            enable_activation_checkpointing(reference)
        full_measured = sum(measure_flops(reference, batch, [n for n, _ in reference.named_parameters()]))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        payload = {"state": state, "ranks": ranks, "losses": losses, "world_size": world_size}
        payload["full_measured"] = full_measured
        torch.save(payload, os.path.join(cli.out, "result.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # Gloo's worker threads outliving the interpreter abort the process at exit


if __name__ == "__main__":
    main()
    end_rank_process()
