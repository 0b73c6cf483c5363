"""DDP's trained-gradients hook where its record of what trained could miss or differ: used by
``tests/test_distributed.py``. Each rank writes ``rank{r}.pt`` (parameters, units dropped) to ``--out``.

* ``--case module``: a gradient-accumulation window whose first micro-batches run through ``ddp.module`` (no
  synchronisation) and whose second brings a longer shape that re-selects inside the window, dropping units that hold
  the window's gradients; the last micro-batch runs through the wrapper. Those units' gradients must be averaged.
* ``--case eval``: rank 0 alone runs a forward through the wrapper under ``torch.no_grad()`` (a validation loss on the
  main process) between steps, then a new selection follows: the ranks must still send the same slices.
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


def module_micro_batches(rank: int) -> tuple[torch.nn.Module, set[str]]:
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.6))
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    short, long = (tiny_batch(model, batch_size=2, seq_len=n, seed=rank + n) for n in (8, 128))
    with gradients_averaged_across_ranks(candidate_parameters(tuner)):
        tuner.select_units([short], optimizer)
    ddp = wrap_ddp(model)
    before = set(tuner.greentrainer_state.selected)
    (ddp.module(**short).loss / 3).backward()  # local accumulation
    (ddp.module(**long).loss / 3).backward()  # a new shape: re-selected inside the window
    (ddp(**long).loss / 3).backward()  # synchronised
    optimizer.step()
    return model, before - set(tuner.greentrainer_state.selected)


def evaluation_on_one_rank(rank: int) -> tuple[torch.nn.Module, set[str]]:
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.5, importance_update="gradient"))
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = [tiny_batch(model, batch_size=2, seq_len=16, seed=10 * rank + i) for i in range(4)]
    ddp = wrap_ddp(model, broadcast_buffers=False)  # rank 0's forward alone would otherwise wait for rank 1's buffers
    for epoch in range(3):
        with gradients_averaged_across_ranks(candidate_parameters(tuner)):
            tuner.select_units([batches[epoch]], optimizer, step=epoch)
        ddp(**batches[(epoch + 1) % 4]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            ddp.eval()
            with torch.no_grad():
                ddp(**batches[3])
            ddp.train()
    return model, set()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--case", choices=["module", "eval"], required=True)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, dropped = {"module": module_micro_batches, "eval": evaluation_on_one_rank}[cli.case](rank)
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save({"state": state, "dropped": sorted(dropped)}, os.path.join(cli.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    end_rank_process()


if __name__ == "__main__":
    main()
