"""A plain PyTorch loop under torchrun: select, ``wrap_ddp`` (units frozen at that point), train, select again.

Used by ``tests/test_distributed.py``; each rank writes ``rank{r}.pt`` (parameters, selections) to ``--out``.
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
    cli = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.5))
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = [tiny_batch(model, batch_size=2, seq_len=16, seed=10 * rank + i) for i in range(4)]  # this rank's data

    def select(step: int) -> None:
        with gradients_averaged_across_ranks(candidate_parameters(tuner)):
            tuner.select_units(batches[:2], optimizer, step=step)

    tuner.restore_selection([tuner.candidate_units()[0].name])  # only one unit trainable when DDP wraps the model
    ddp = wrap_ddp(model)
    for step in range(6):
        if step in (0, 3):
            select(step)
        ddp(**batches[step % 4]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    history = [(r.step, r.selected) for r in tuner.greentrainer_state.history]
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save({"state": state, "history": history}, os.path.join(cli.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()  # Gloo's worker threads outliving the interpreter abort the process at exit
    end_rank_process()  # before main's locals (DDP, its process group) are freed: see train.py


if __name__ == "__main__":
    main()  # which ends the process itself
