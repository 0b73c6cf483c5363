"""Per-step cost of DDP's ``find_unused_parameters=True``, which GreenTrainer needs (units are frozen between
selections), on CPU with gloo. Not a test; run:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tests/distributed_scripts/bench_find_unused.py

Four DDP wrappers of identical copies of a small LLaMA, stepped in turn (rotating order, same batches, one run,
so machine noise hits all alike): every tensor trainable with find_unused_parameters False / True (the flag's own
overhead: one traversal of the autograd graph per step plus an all-reduce of the used-parameter bitmap), and
GreenTrainer (rho=0.5) with the flag True, all-reducing only the trained gradients (its default) or every bucket
whole (frozen units' zeros included, DDP's own reduction). Prints the median step time of each over the timed steps,
the ratios, and the share of the buckets' gradient elements GreenTrainer's hook sent.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import transformers
from peft import get_peft_model

from peft_greentrainer import GreenTrainerConfig
from peft_greentrainer.distributed import trained_gradients_state, wrap_ddp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = transformers.LlamaConfig(
        hidden_size=cli.hidden,
        intermediate_size=2 * cli.hidden,
        num_hidden_layers=cli.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=cli.seq_len,
    )

    def model():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config)

    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 1024, (cli.batch_size, cli.seq_len), generator=generator) for _ in range(4)]

    full_false = torch.nn.parallel.DistributedDataParallel(model(), find_unused_parameters=False)
    full_true = torch.nn.parallel.DistributedDataParallel(model(), find_unused_parameters=True)
    green = get_peft_model(model(), GreenTrainerConfig(rho=0.5))
    green_whole = get_peft_model(model(), GreenTrainerConfig(rho=0.5))
    green_ddp = wrap_ddp(green)
    runs = {
        "full, find_unused=False": full_false,
        "full, find_unused=True": full_true,
        "greentrainer": green_ddp,
        "greentrainer, whole buckets": wrap_ddp(green_whole, trained_gradients_only=False),
    }
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]) for name, m in runs.items()}
    selection = green.base_model.select_units(
        [{"input_ids": b, "labels": b} for b in batches], optimizers["greentrainer"]
    )
    green_whole.base_model.restore_selection(green.base_model.greentrainer_state.selected)

    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(cli.warmup + cli.steps):
        ids = batches[step % len(batches)]
        names = list(runs)
        for name in names[step % len(names) :] + names[: step % len(names)]:  # rotate: no run always goes first
            ddp = runs[name]
            dist.barrier()
            start = time.perf_counter()
            ddp(input_ids=ids, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            elapsed = time.perf_counter() - start
            if step >= cli.warmup:
                times[name].append(elapsed)

    median = {name: statistics.median(values) for name, values in times.items()}
    # the slower rank sets the pace
    table = torch.tensor(list(median.values()), dtype=torch.float64)
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    if rank == 0:
        params = sum(p.numel() for p in full_false.parameters()) / 1e6
        print(
            f"LLaMA {params:.1f}M params, batch {cli.batch_size}x{cli.seq_len} per rank, 2 ranks, gloo, "
            f"median of {cli.steps} steps"
        )
        base = table[0].item()
        for (name, _), value in zip(median.items(), table.tolist(), strict=True):
            print(f"  {name:26s} {1000 * value:8.1f} ms/step  {value / base:.3f} x full/find_unused=False")
        print(f"  greentrainer predicted FLOPs ratio: {selection.ratio:.3f}")
        comm = trained_gradients_state(green_ddp)
        print(f"  greentrainer gradient elements sent: {comm.elements_sent / comm.elements_in_buckets:.3f} of DDP's")
    dist.barrier()
    dist.destroy_process_group()  # Gloo's worker threads outliving the interpreter abort the process at exit


if __name__ == "__main__":
    main()
