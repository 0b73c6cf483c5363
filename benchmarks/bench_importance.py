"""How many importance batches a selection needs: the importance fewer batches lose, and the overhead they save.

Every selection backpropagates ``importance_batches`` training batches to the deepest unit that fits (the paper
uses one iteration, as our default now does; it was 4). This measures, on the embedded SmolLM2-135M and ACLSum at
batch 4, for each batch count n:

* quality of the choice: the units chosen from n random batches, scored by a reference importance averaged over
  ``--reference`` other batches, as a share of the best the DP can reach under that reference (1.0 = the reference's
  own choice), and the Jaccard overlap with the reference's units; over ``--draws`` draws of the n batches;
* overhead: the selection's FlopCounterMode FLOPs and wall time in step-equivalents (a training step with the chosen
  units, measured side by side in this process).

Two choices that use no data frame the figures: random importances, and importances proportional to each unit's
size (with a fresh AdamW the predicted update is about ``-lr * sign(g)``, so importance is about ``lr * |g|_1``, which
grows with size). Measured at step 0 with a fresh AdamW, as at a run's first selection, and again after
``--warm-steps`` training steps on rows that neither the reference nor the draws use. Usage::

    python benchmarks/bench_importance.py [--batches 1 2 4] [--draws 3] [--reference 16] [--rho 0.5] \
        [--units tensors] [--threads 1] [--output benchmarks/results/importance_batches.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from peft import get_peft_model  # noqa: E402

from benchmarks.harness import methods, runner, workload  # noqa: E402
from peft_greentrainer import GreenTrainerConfig  # noqa: E402
from peft_greentrainer.engine.flops import register_flop_formulas  # noqa: E402


def batches_of(columns: dict[str, torch.Tensor], rows: np.ndarray, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v[rows[i : i + batch_size]] for k, v in columns.items()} for i in range(0, len(rows), batch_size)]


def captured(importance: dict[str, float], chosen: list[str], best: list[str]) -> float:
    """Reference importance of ``chosen`` over that of the reference's own (DP-optimal) choice ``best``."""
    return sum(importance[n] for n in chosen) / sum(importance[n] for n in best)


def jaccard(a: list[str], b: list[str]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, repeats: int) -> float:
    """Median wall time of a training step with the current trainable set; weights are put back afterwards."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {k: {s: v.clone() if torch.is_tensor(v) else v for s, v in st.items()} for k, st in optimizer.state.items()}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in saved:
                param.copy_(saved[name])
    optimizer.state.clear()
    optimizer.state.update(state)
    return statistics.median(times)


def measure(tuner, optimizer, work, args, reference_rows: np.ndarray, pool: np.ndarray, at_step: int) -> list[dict]:
    """At the current weights and optimizer state: the reference choice, then each batch count's draws scored by it,
    and random importances through the same DP (what a choice that ignores the data captures)."""
    batch_size = work.batch_size
    print(f"step {at_step}: reference importance over {args.reference} batches", file=sys.stderr)
    tuner.select_units(batches_of(work.train_columns, reference_rows, batch_size), optimizer, lr=args.lr)
    reference = dict(tuner.greentrainer_state.importance)
    best = list(tuner.greentrainer_state.selected)
    rows = []
    for count in args.batches:
        for draw in range(args.draws):
            drawn = np.random.default_rng(1000 * count + draw + at_step).choice(pool, count * batch_size, replace=False)
            with FlopCounterMode(display=False) as counter:
                start = time.perf_counter()
                tuner.select_units(batches_of(work.train_columns, drawn, batch_size), optimizer, lr=args.lr)
                seconds = time.perf_counter() - start
            chosen = list(tuner.greentrainer_state.selected)
            rows.append(
                {
                    "step": at_step,
                    "batches": count,
                    "draw": draw,
                    "captured": captured(reference, chosen, best),
                    "jaccard": jaccard(chosen, best),
                    "selected": len(chosen),
                    "flops": float(counter.get_total_flops()),
                    "seconds": seconds,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    costs = tuner.unit_costs(work.example)
    for draw in range(args.draws):
        chosen = methods.random_choice(costs, args.rho, np.random.default_rng(draw))
        rows.append(
            {
                "step": at_step,
                "batches": 0,
                "draw": draw,
                "captured": captured(reference, chosen, best),
                "jaccard": jaccard(chosen, best),
                "selected": len(chosen),
                "flops": 0.0,
                "seconds": 0.0,
            }
        )
    prior = np.array([float(u.numel(tuner.model)) for u in costs.units])
    chosen = [u.name for u, keep in zip(costs.units, costs.select(prior, args.rho).mask, strict=True) if keep]
    rows.append(
        {
            "step": at_step,
            "batches": -1,
            "draw": 0,
            "captured": captured(reference, chosen, best),
            "jaccard": jaccard(chosen, best),
            "selected": len(chosen),
            "flops": 0.0,
            "seconds": 0.0,
        }
    )
    tuner.restore_selection(best)  # train on (and measure the step of) the reference's choice
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--reference", type=int, default=16)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--units", choices=("tensors", "lora"), default="tensors")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--warm-steps", type=int, default=10, help="then measure again after this many steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    runner.prepare_process(args.threads)
    register_flop_formulas()

    batch_size = 4
    work = workload.real_workload(workload.DataSizes(train=None, generate=0), batch_size, seed=0)
    lora = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"} if args.units == "lora" else {}
    config = GreenTrainerConfig(
        units=args.units,
        rho=args.rho,
        importance_batches=max([args.reference, *args.batches]),
        sparse_lm_head=False,
        task_type="CAUSAL_LM",
        **lora,
    )
    model = get_peft_model(work.new_model(), config)
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    order = np.random.default_rng(0).permutation(work.train_size)
    reference_rows = order[: args.reference * batch_size]
    warm_rows = order[len(reference_rows) : len(reference_rows) + args.warm_steps * batch_size]
    pool = order[len(reference_rows) + len(warm_rows) :]  # the draws, the reference and the warm-up share no row
    tuner.min_feasible_rho(work.example)  # profiles the one batch shape now, outside every measurement

    rows = measure(tuner, optimizer, work, args, reference_rows, pool, at_step=0)
    step = step_seconds(model, optimizer, work.example, args.step_repeats)  # a step at rho, weights put back
    if args.warm_steps:  # mid-training: AdamW has moments for the units trained so far, the weights have moved
        for index in range(args.warm_steps):
            rows_of_batch = warm_rows[index * batch_size : (index + 1) * batch_size]
            model(**{k: v[rows_of_batch] for k, v in work.train_columns.items()}).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        rows += measure(tuner, optimizer, work, args, reference_rows, pool, at_step=args.warm_steps)
    with FlopCounterMode(display=False) as counter:
        model(**work.example).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    step_flops = float(counter.get_total_flops())
    for row in rows:
        row["flops_steps"] = row.pop("flops") / step_flops
        row["wall_steps"] = row.pop("seconds") / step

    lines = [
        f"Importance batches at rho {args.rho}, units={args.units}, {work.label}, batch {batch_size}, AdamW lr "
        f"{args.lr:g}; reference: {args.reference} other batches; {args.draws} draws each; mean (min-max). Random: "
        "random importances through the same DP; size: importances proportional to unit size (no data). Steps: "
        "selection cost over one training step at rho.",
        "",
        "| at step | batches | importance captured | Jaccard vs reference | selection FLOPs (steps) | "
        "selection wall (steps) |",
        "|---|---|---|---|---|---|",
    ]
    labels = {0: "random", -1: "size"}
    for at_step, count in sorted(
        {(r["step"], r["batches"]) for r in rows}, key=lambda k: (k[0], k[1] if k[1] > 0 else 100 - k[1])
    ):
        mine = [r for r in rows if r["batches"] == count and r["step"] == at_step]

        def spread(key: str, mine: list[dict] = mine) -> str:
            values = [r[key] for r in mine]
            return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

        lines.append(
            f"| {at_step} | {labels.get(count, count)} | {spread('captured')} | {spread('jaccard')} | "
            f"{spread('flops_steps')} | {spread('wall_steps')} |"
        )
    print("\n".join(lines))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": lines}
        args.output.write_text(json.dumps({**record, **runner.environment()}, indent=1))


if __name__ == "__main__":
    main()
