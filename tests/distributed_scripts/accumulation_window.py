"""A new batch shape inside a gradient-accumulation window, or at its start, under DDP or FSDP2 (plain loop).

The selection in force leaves out block 2, and the stored importances favour every unit left out, so a re-selection
free to choose takes some of them. Inside a window (the first micro-batch ran without gradient sync, as the Trainer and
accelerate accumulate) it must choose among the units selected so far: FSDP2 keeps that micro-batch's gradients in
unsharded copies, so ``.grad`` does not show them. At a window's start (after the optimizer's step, gradients zeroed
in place or set to None) it may choose any unit. Used by ``tests/test_distributed.py``; each rank writes
``rank{r}.pt`` (the selection before and after, the records' reasons) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import VOCAB, end_rank_process, tiny_model
from peft import get_peft_model

from peft_greentrainer import GreenTrainerConfig, fsdp
from peft_greentrainer.distributed import wrap_ddp


def counting_batch(seq_len: int, size: int = 2) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3 + (s + t) % (VOCAB - 3) for t in range(seq_len)] for s in range(size)])
    return {"input_ids": ids, "labels": ids.clone()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--units", default="tensors")
    parser.add_argument("--wrap", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--window", choices=("inside", "start"), default="inside")
    parser.add_argument("--zero-in-place", action="store_true", help="zero_grad(set_to_none=False) after the step")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    extra = {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 4} if cli.units == "lora" else {}
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.75, units=cli.units, **extra))
    tuner = model.base_model
    if cli.wrap == "fsdp2":
        policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for layer in tuner.model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        fsdp.attach(tuner, model)
        wrapped = model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    short, long = counting_batch(8), counting_batch(128)
    tuner.select_units([short], optimizer)
    before = sorted(n for n in tuner.greentrainer_state.selected if "layers.2." not in n)
    tuner.restore_selection(before)
    tuner.greentrainer_state.importance = {u.name: 1.0 if u.name in before else 1e6 for u in tuner.candidate_units()}
    if cli.wrap == "ddp":
        wrapped = wrap_ddp(model)
    if cli.window == "inside":  # the window's first micro-batch, accumulated without gradient sync
        if cli.wrap == "ddp":
            with wrapped.no_sync():
                wrapped(**short).loss.backward()
        else:
            model.set_requires_gradient_sync(False)
            wrapped(**short).loss.backward()
            model.set_requires_gradient_sync(True)
    else:  # a whole step, then the next window starts
        wrapped(**short).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not cli.zero_in_place)
    wrapped(**long).loss.backward()  # a new shape: selected again inside this forward
    state = tuner.greentrainer_state
    result = {"before": before, "after": list(state.selected), "reasons": [r.reason for r in state.history]}
    torch.save(result, os.path.join(cli.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()  # Gloo's worker threads outliving the interpreter abort the process at exit
    end_rank_process()  # before main's locals (DDP, its process group) are freed: see train.py


if __name__ == "__main__":
    main()  # which ends the process itself
