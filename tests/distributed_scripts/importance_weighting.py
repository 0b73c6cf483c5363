"""Importance of one global batch whose rows hold different numbers of labelled tokens, split across the ranks.

Used by ``tests/test_distributed.py``: run once under torchrun (2 processes, 2 rows each) and once as a plain process
(all 4 rows); rank 0 writes the importances, with and without the loss weighted by each rank's share of the targets,
to ``rank0.pt`` in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import end_rank_process, tiny_model
from peft import get_peft_model

from peft_greentrainer import GreenTrainerConfig
from peft_greentrainer.distributed import candidate_parameters
from peft_greentrainer.engine.profile import default_loss
from peft_greentrainer.ranks import gradients_averaged_across_ranks, rank_and_world_size, weighted_by_target_share


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", default="llama")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world_size = rank_and_world_size()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (4, 14), generator=generator)
    labels = ids.clone() if cli.arch != "t5" else torch.randint(3, 100, (4, 7), generator=generator)
    labels[:2, : labels.shape[1] - 2] = -100  # the first two rows (rank 0's under DDP) have few targets
    rows = slice(2 * rank, 2 * rank + 2) if world_size > 1 else slice(None)
    batch = {"input_ids": ids[rows], "labels": labels[rows]}
    no_dropout = {"dropout_rate": 0.0} if cli.arch == "t5" else {}  # ranks draw other dropout masks than one process
    results = {}
    for name, loss_fn in (("weighted", weighted_by_target_share(default_loss)), ("unweighted", default_loss)):
        # a dense head: the units that fit then do not depend on how the labelled rows are spread over the ranks
        model = get_peft_model(tiny_model(cli.arch, **no_dropout), GreenTrainerConfig(rho=0.6, sparse_lm_head=False))
        tuner = model.base_model
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        with gradients_averaged_across_ranks(candidate_parameters(tuner)):
            tuner.select_units([batch], optimizer, loss_fn=loss_fn)
        results[name] = dict(tuner.greentrainer_state.importance)
    if rank == 0:
        torch.save(results, os.path.join(cli.out, "rank0.pt"))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()  # Gloo's worker threads outliving the interpreter abort the process at exit
    end_rank_process()  # before main's locals (DDP, its process group) are freed: see train.py


if __name__ == "__main__":
    main()  # which ends the process itself
