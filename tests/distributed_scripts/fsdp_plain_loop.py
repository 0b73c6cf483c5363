"""FSDP2 in a plain loop (no Trainer), on CPU with gloo (``tests/test_fsdp.py``) or on GPUs with NCCL (the GPU check).

torchrun --nproc_per_node=2 tests/distributed_scripts/fsdp_plain_loop.py                          # CPU, gloo
torchrun --nproc_per_node=$(nvidia-smi -L | wc -l) tests/distributed_scripts/fsdp_plain_loop.py   # GPUs; 1 is enough

A tiny LLaMA is sharded with ``fully_shard`` (each decoder layer and the root) and compared, on every rank, with an
unsharded replica on the same device that sees the whole global batch:

1. the cost profile of the fake-tensor twin equals the profile of the real, unsharded model on this device (on CUDA
   the twin must pick CUDA's fused attention kernels, as the real model does);
2. the importances from local shards plus one all-reduce equal the replica's, and so does the selection;
3. ``FlopCounterMode`` counts, in one training step on each rank, what the selection predicted.

Prints ``FSDP2 CHECK PASSED`` on rank 0, or fails with an assertion.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import end_rank_process, row_scaling_rel, tiny_model
from peft import get_peft_model

from peft_greentrainer import GreenTrainerConfig, fsdp
from peft_greentrainer.engine.profile import default_loss


def build(device: torch.device):
    config = GreenTrainerConfig(rho=0.5, importance_batches=1, sparse_lm_head=False)  # FSDP2 keeps the head dense
    model = get_peft_model(tiny_model("llama"), config).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2 * world, 32), generator=torch.Generator().manual_seed(1)).to(device)
    batch = {"input_ids": ids, "labels": ids}
    local = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}

    replica, replica_optimizer = build(device)
    sharded, optimizer = build(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for layer in sharded.base_model.model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(sharded, mp_policy=policy)
    optimizer = torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad], lr=1e-3)
    tuner = sharded.base_model
    fsdp.attach(tuner, sharded)

    # 1. the twin's profile is the real model's on this device
    real = replica.base_model._measure(local, default_loss)
    twin = tuner._measure(local, default_loss)
    real_costs = real[0].unit_costs(replica.base_model.candidate_units(), full_flops=real[1])
    twin_costs = twin[0].unit_costs(tuner.candidate_units(), full_flops=twin[1])
    assert [u.name for u in real_costs.units] == [u.name for u in twin_costs.units]
    for field in ("t_dw", "t_dy"):
        np.testing.assert_allclose(getattr(twin_costs, field), getattr(real_costs, field), rtol=1e-12, err_msg=field)
    assert twin[1] == real[1] and twin_costs.forward_flops == real_costs.forward_flops, (twin[1], real[1])

    # 2. importance from shards: the replica's on the global batch (each rank holds the same replica)
    selection = tuner.select_units([local], optimizer)
    expected = replica.base_model.select_units([batch], replica_optimizer)
    got, want = tuner.greentrainer_state.importance, replica.base_model.greentrainer_state.importance
    assert got.keys() == want.keys()
    for name in want:
        assert abs(got[name] - want[name]) <= 1e-4 * abs(want[name]) + 1e-9, (name, got[name], want[name])
    assert np.array_equal(selection.mask, expected.mask)

    # 3. one training step costs what the selection predicted
    with FlopCounterMode(display=False) as counter:
        sharded(**local).loss.backward()
    optimizer.step()
    ratio = tuner.step_flops_ratios()[0]
    predicted = ratio * tuner.cost_profile(local)[1]
    measured = float(counter.get_total_flops())
    assert measured <= predicted and predicted - measured <= row_scaling_rel(0.0) * predicted, (measured, predicted)
    dist.barrier()
    if rank == 0:
        print(f"FSDP2 CHECK PASSED on {world} x {device.type}: selection {selection.mask.sum()} units, {ratio:.3f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_rank_process()
