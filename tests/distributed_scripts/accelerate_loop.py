"""accelerate's own training loop under torchrun, as users write it: ``Accelerator()`` with its defaults (DDP without
``find_unused_parameters``), ``accelerator.prepare``, gradient accumulation, ``select_units`` each epoch.

``--order after``: prepare, then select (``select_units`` makes the wrapper follow the selections); ``--order
before``: the first selection before ``prepare``, which registers only the units trained then: the first step must
say so; ``--order before-init``: the same, made before the process group exists. Used by
``tests/test_distributed.py``; each rank writes ``rank{r}.pt`` (parameters, history) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import end_rank_process, tiny_batch, tiny_model
from peft import get_peft_model

from peft_greentrainer import GreenTrainerConfig
from peft_greentrainer.distributed import trained_gradients_state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--order", choices=["after", "before", "before-init"], required=True)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.5))
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = [tiny_batch(model, batch_size=2, seq_len=16 + 4 * (i % 2), seed=10 * rank + i) for i in range(4)]
    if cli.order == "before-init":  # before the process group exists, too
        tuner.select_units(batches[:1], optimizer)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    if cli.order == "before":
        tuner.select_units(batches[:1], optimizer)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    error = None
    try:
        for _epoch in range(2):
            if cli.order == "after":
                tuner.select_units(batches[:1], optimizer)
            for batch in batches:
                with accelerator.accumulate(wrapped):
                    accelerator.backward(wrapped(**batch).loss)
                    optimizer.step()
                    optimizer.zero_grad()
    except RuntimeError as raised:
        error = str(raised)
    result = {
        "error": error,
        "history": [r.selected for r in tuner.greentrainer_state.history],
        "state": {name: p.detach().clone() for name, p in model.named_parameters()},
        "trained_only": trained_gradients_state(wrapped) is not None,
    }
    torch.save(result, os.path.join(cli.out, f"rank{rank}.pt"))
    end_rank_process()


if __name__ == "__main__":
    main()
