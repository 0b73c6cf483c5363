"""A plain DDP loop with gradient accumulation whose last micro-batch brings a new batch shape on every rank.

The shape is priced inside that micro-batch's forward and the selection made again, among the units selected so far:
those it drops already hold gradients from the window's earlier micro-batch, which DDP must find to reduce. Used by
``tests/test_distributed.py``; each rank writes ``rank{r}.pt`` (selections, the state of the tensors it froze before
and after the step) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import end_rank_process, tiny_batch, tiny_model
from peft import get_peft_model

from peft_greentrainer import GreenTrainerConfig
from peft_greentrainer.distributed import candidate_parameters, gradients_averaged_across_ranks, wrap_ddp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--units", default="tensors")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    extra = {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 4} if cli.units == "lora" else {}
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.6, units=cli.units, **extra))
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    short, long = (tiny_batch(model, batch_size=2, seq_len=n, seed=rank + n) for n in (8, 128))
    with gradients_averaged_across_ranks(candidate_parameters(tuner)):
        tuner.select_units([short], optimizer)
    selected = {
        id(p)
        for u in tuner.candidate_units()
        if u.name in tuner.greentrainer_state.selected
        for p in u.parameters(tuner.model)
    }
    ddp = wrap_ddp(model)
    with ddp.no_sync():
        (ddp(**short).loss / 2).backward()
    (ddp(**long).loss / 2).backward()  # a new shape: selected again inside this forward
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = {names[id(p)]: p for p in candidate_parameters(tuner) if not p.requires_grad and id(p) in selected}
    with_gradient = sorted(n for n, p in frozen.items() if p.grad is not None)
    before = {n: p.detach().clone() for n, p in frozen.items()}
    optimizer.step()
    moved = sorted(n for n, p in frozen.items() if not torch.equal(before[n], p))
    reasons = [r.reason for r in tuner.greentrainer_state.history]
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = {"reasons": reasons, "frozen": sorted(frozen), "with_gradient": with_gradient, "moved": moved}
    torch.save({**result, "state": state}, os.path.join(cli.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()  # Gloo's worker threads outliving the interpreter abort the process at exit
    end_rank_process()  # before main's locals (DDP, its process group) are freed: see train.py


if __name__ == "__main__":
    main()  # which ends the process itself
