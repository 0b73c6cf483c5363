"""Train a tiny model with ``transformers.Trainer`` + ``GreenTrainerCallback``; used by ``tests/test_distributed.py``.

Run under ``torchrun --nproc_per_node=2`` (DDP on CPU with gloo) or as a plain script (the single-process reference).
Each rank writes ``rank{r}.pt`` to ``--out``: its final parameters, the selection history, the units each selection
trained and what it found out about the DDP wrapper.
"""

from __future__ import annotations

import argparse
import os
import sys

import datasets
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import CHECKPOINTING, VOCAB, end_rank_process, tiny_model
from peft import get_peft_model

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig
from peft_greentrainer import ddp as gt_ddp
from peft_greentrainer import distributed as gt_distributed

SEQ_LEN = 16


def dataset(n: int) -> datasets.Dataset:
    """Counting sequences with varied starts and steps: every sample (and so every rank's batch) differs."""
    ids = [[3 + (7 * i + (1 + i % 3) * t) % (VOCAB - 3) for t in range(SEQ_LEN)] for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": [list(row) for row in ids]})


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def varied_dataset(n: int) -> datasets.Dataset:
    """Counting sequences of 5 to 40 tokens: with pad-to-longest batches, every rank sees its own shapes."""
    lengths = [5 + (17 * i) % 36 for i in range(n)]
    ids = [[3 + (7 * i + t) % (VOCAB - 3) for t in range(length)] for i, length in enumerate(lengths)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": [list(row) for row in ids]})


def pad_to_longest(rows: list[dict]) -> dict[str, torch.Tensor]:
    """What DataCollatorForSeq2Seq(padding="longest") does, without a tokenizer."""
    longest = max(len(row["input_ids"]) for row in rows)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([row[key] + [value] * (longest - len(row[key])) for row in rows])

    mask = torch.tensor([[1] * len(row["input_ids"]) + [0] * (longest - len(row["input_ids"])) for row in rows])
    return {"input_ids": padded("input_ids", 0), "attention_mask": mask, "labels": padded("labels", -100)}


class AuditedTrainer(Trainer):
    """Keeps, for every training step, the inputs the model's forward received and the tensors it trained."""

    def start_audit(self) -> None:
        self.steps: list[tuple[dict, frozenset]] = []
        self._inputs: dict | None = None
        base = self.model.base_model.model
        # prepend: the inputs as the Trainer passed them, before the sparse LM head's hook rewrites them; the step's
        # own forward is the first (a step at a new shape profiles one row inside it, after its hook ran)
        base.register_forward_pre_hook(self._keep_first_inputs, with_kwargs=True, prepend=True)

    def _keep_first_inputs(self, module, args, kwargs) -> None:
        if self._inputs is None:
            self._inputs = kwargs

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._inputs = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if hasattr(self, "steps"):
            base = self.model.base_model.model
            trainable = frozenset(n for n, p in base.named_parameters() if p.requires_grad)
            batch = {k: v.detach().clone() for k, v in self._inputs.items() if isinstance(v, torch.Tensor)}
            self.steps.append((batch, trainable))
        return loss


def audit(model, steps: list[tuple[dict, frozenset]]) -> list[tuple[tuple, float]]:
    """(input shape, measured step FLOPs / full fine-tuning FLOPs) for each distinct shape and trained set."""
    from peft_greentrainer.engine.profile import measure_flops

    base = model.base_model.model
    everything = [n for n, _ in base.named_parameters() if "lora_" not in n]
    results, seen = [], set()
    for batch, trainable in steps:
        key = (tuple(batch["input_ids"].shape), trainable)
        if key in seen:
            continue
        seen.add(key)
        step = sum(measure_flops(base, batch, trainable))
        if model.base_model.units_kind == "lora":
            with model.disable_adapter():
                full = sum(measure_flops(base, batch, everything))
        else:
            full = sum(measure_flops(base, batch, everything))
        results.append((key[0], step / full))
    return results


class Recorder(TrainerCallback):
    """After GreenTrainerCallback: what DDP registered at the start, and the trainable tensors of each selection."""

    def __init__(self):
        self.info: dict = {"trainable_after_selection": []}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        ddp = gt_distributed.find_ddp(model)
        self.info["ddp_found"] = ddp is not None
        if ddp is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            self.info["find_unused_parameters"] = ddp.find_unused_parameters
            self.info["static_graph"] = ddp.static_graph
            self.info["registered"] = sorted(names[i] for i in gt_distributed.registered_parameters(ddp))
            self.comm = gt_distributed.trained_gradients_state(ddp)

    def on_train_end(self, args, state, control, **kwargs):
        comm = getattr(self, "comm", None)
        if comm is not None:  # gradient elements all-reduced, and in DDP's buckets, over the run
            self.info["elements_sent"], self.info["elements_in_buckets"] = comm.elements_sent, comm.elements_in_buckets

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        if not self.info["trainable_after_selection"] or self.info["trainable_after_selection"][-1][1] != trainable:
            self.info["trainable_after_selection"].append((state.global_step, trainable))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--units", choices=["tensors", "lora"], default="tensors")
    parser.add_argument("--batch-size", type=int, default=2, help="per device")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--interval-steps", type=int, default=None)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--find-unused", choices=["default", "true", "false"], default="default")
    parser.add_argument("--static-graph", action="store_true")
    parser.add_argument(
        "--freeze-before-train",
        action="store_true",
        help="train only the first candidate unit until the first selection, so DDP wraps the others frozen",
    )
    parser.add_argument(
        "--skip-prepare-ddp", action="store_true", help="negative control: keep the DDP wrapper the Trainer built"
    )
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument(
        "--dynamic-padding",
        action="store_true",
        help="sequences of varied length padded per batch, an uneven last batch, warmup; audit every step's FLOPs",
    )
    parser.add_argument("--fsdp", default="", help="TrainingArguments(fsdp=...), e.g. 'full_shard'")
    parser.add_argument("--fsdp-version", type=int, default=None, help="fsdp_config={'version': ...}")
    parser.add_argument("--deepspeed", default=None, help="TrainingArguments(deepspeed=...)")
    cli = parser.parse_args()

    torch.set_num_threads(1)
    if cli.skip_prepare_ddp:
        # the callback's call at train begin, and select_units' for loops that wrap the model themselves
        gt_distributed.prepare_ddp = gt_ddp.prepare_ddp = lambda ddp, candidates: False
    config = GreenTrainerConfig(
        rho=cli.rho,
        units=cli.units,
        selection_interval_steps=cli.interval_steps,
        importance_batches=2,
        **({"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 4} if cli.units == "lora" else {}),
    )
    model = get_peft_model(tiny_model("llama"), config)
    tuner = model.base_model
    optimizers = (None, None)
    if cli.freeze_before_train:
        # the user's own optimizer over every candidate, then a selection before the Trainer wraps the model
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-6)
        optimizers = (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
        tuner.restore_selection([tuner.candidate_units()[0].name])
    args = TrainingArguments(
        output_dir=os.path.join(cli.out, "trainer"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        learning_rate=cli.lr,
        adam_epsilon=1e-6,  # near-zero gradients (float noise) do not get full-size Adam steps: compare at atol 1e-5
        lr_scheduler_type="cosine" if cli.dynamic_padding else "constant",
        warmup_steps=2 if cli.dynamic_padding else 0,
        logging_steps=1,
        num_train_epochs=cli.epochs,
        per_device_train_batch_size=cli.batch_size,
        train_sampling_strategy="random" if cli.dynamic_padding else "sequential",
        dataloader_drop_last=not cli.dynamic_padding,
        seed=0,
        disable_tqdm=True,
        ddp_find_unused_parameters={"default": None, "true": True, "false": False}[cli.find_unused],
        ddp_static_graph=cli.static_graph or None,
        **{CHECKPOINTING: cli.activation_checkpointing},
        fsdp=cli.fsdp,
        # FSDP1 syncs module states through an accelerator device, which a CPU run lacks
        fsdp_config={"version": cli.fsdp_version, "sync_module_states": False} if cli.fsdp_version else None,
        deepspeed=cli.deepspeed,
    )
    recorder = Recorder()
    trainer = AuditedTrainer(
        model=model,
        args=args,
        train_dataset=varied_dataset(cli.samples) if cli.dynamic_padding else dataset(cli.samples),
        data_collator=pad_to_longest if cli.dynamic_padding else collate,
        callbacks=[GreenTrainerCallback(), recorder],
        optimizers=optimizers,
    )
    if cli.dynamic_padding:
        trainer.start_audit()
    trainer.train()

    rank, world_size = gt_distributed.rank_and_world_size()
    history = [(r.step, r.selected, r.predicted_ratio) for r in tuner.greentrainer_state.history]
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    payload = {"state": state, "history": history, "info": recorder.info, "losses": losses, "world_size": world_size}
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # the audit measures this rank's steps alone
    if cli.dynamic_padding:
        payload["shapes"] = [tuple(batch["input_ids"].shape) for batch, _ in trainer.steps]
        payload["audit"] = audit(model, trainer.steps)
        payload["reasons"] = [r.reason for r in tuner.greentrainer_state.history]
    torch.save(payload, os.path.join(cli.out, f"rank{rank}.pt"))
    # here, not after main returns: freeing main's locals (the DDP model, its destroyed process group) joined a gloo
    # thread that never ended, twice in full suites under load (py-spy: std::thread::join below main's return)
    end_rank_process()


if __name__ == "__main__":
    main()
