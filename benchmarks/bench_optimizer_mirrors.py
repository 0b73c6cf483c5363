"""Whether mirroring an optimizer's update ranks units better than the ``-lr * grad`` fallback does.

Importance is ``-sum(g * delta_w)``, ``delta_w`` the optimizer's next update. For an optimizer whose rule is not
mirrored, ``delta_w`` falls back to ``-lr * g``: importance ``lr * |g|^2``. This measures, for optimizers that
``TrainingArguments(optim=...)`` builds and the importance now mirrors, how well each estimate ranks the units by the
loss their step really buys. On the embedded SmolLM2-135M and ACLSum (tensor units): ``--warm-steps`` training steps
with the optimizer, then, on one batch the warm-up did not see:

* the actual gain of each unit: the loss drop on that batch when only that unit takes the optimizer's real next step
  (``optimizer.step()`` on that batch's gradient, applied to that unit alone);
* the mirrored importance (what GreenTrainer computes) and the fallback's (``compute_importance(..., lr=...)``);
* Spearman's rank correlation of each with the actual gains, and the actual gain of the units the exact DP chooses
  from each at ``--rho``, as a share of the gain of the DP's choice from the actual gains themselves.

Each optimizer writes its own result file under ``--output-dir`` (about 10 CPU-minutes each); optimizers whose file
exists are not run again, and the table is rebuilt from the files there. Usage::

    python benchmarks/bench_optimizer_mirrors.py [--optimizers lion_8bit rmsprop adagrad ademamix_8bit] \
        [--warm-steps 5] [--rho 0.5] [--threads 2] [--output-dir benchmarks/results/optimizer_mirrors]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import workload  # noqa: E402
from peft_greentrainer.engine.costs import UnitCosts  # noqa: E402
from peft_greentrainer.engine.importance import compute_importance  # noqa: E402
from peft_greentrainer.engine.profile import profile_model  # noqa: E402
from peft_greentrainer.engine.units import Unit, tensor_units  # noqa: E402


def _bnb():
    import bitsandbytes

    return bitsandbytes


# What TrainingArguments(optim=name, learning_rate=lr) builds (transformers' trainer_optimizer.py), weight decay 0.
OPTIMIZERS: dict[str, tuple[float, Callable[[list, float], torch.optim.Optimizer]]] = {
    "lion_8bit": (1e-5, lambda params, lr: _bnb().optim.Lion(params, lr=lr, optim_bits=8)),
    "ademamix_8bit": (1e-4, lambda params, lr: _bnb().optim.AdEMAMix(params, lr=lr, optim_bits=8)),
    "rmsprop": (1e-4, lambda params, lr: torch.optim.RMSprop(params, lr=lr)),
    "adagrad": (1e-3, lambda params, lr: torch.optim.Adagrad(params, lr=lr)),
}


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (ties broken by position: the units' values here are continuous)."""
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def loss(model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def actual_gains(
    model: torch.nn.Module, units: list[Unit], optimizer: torch.optim.Optimizer, batch: dict
) -> np.ndarray:
    """Loss drop on ``batch`` when each unit alone takes the optimizer's real next step (weights restored after)."""
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()  # the real step, once; its state is not used afterwards
    step = {name: params[name].detach() - before[name] for name in params}
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(before[name])
    base = loss(model, batch)
    gains = np.zeros(len(units))
    for u, unit in enumerate(units):
        with torch.no_grad():
            for name in unit.param_names:
                params[name].add_(step[name])
        gains[u] = base - loss(model, batch)
        if u % 50 == 49:
            print(f"  actual gains: {u + 1}/{len(units)} units", file=sys.stderr)
        with torch.no_grad():
            for name in unit.param_names:
                params[name].copy_(before[name])
    return gains


def captured(costs: UnitCosts, names: list[str], estimate: np.ndarray, gains: np.ndarray, rho: float) -> float:
    """Actual gain of the DP's choice from ``estimate``, over that of its choice from the actual gains (both given
    in the order of ``names``; the costs list units in backward order)."""
    order = [names.index(unit.name) for unit in costs.units]
    estimate, gains = estimate[order], gains[order]
    chosen = costs.select(estimate, rho).mask
    best = costs.select(gains, rho).mask
    return float(gains[chosen].sum() / gains[best].sum())


def measure(name: str, work: workload.Workload, args: argparse.Namespace) -> dict:
    lr, build = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = work.new_model().train()
    model.config.use_cache = False
    units = tensor_units(model)
    optimizer = build([p for p in model.parameters() if p.requires_grad], lr)
    rows = np.random.default_rng(0).permutation(len(work.train_columns["input_ids"]))
    batches = [
        {k: v[rows[i * work.batch_size : (i + 1) * work.batch_size]] for k, v in work.train_columns.items()}
        for i in range(args.warm_steps + 1)
    ]
    for batch in batches[:-1]:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    probe = batches[-1]
    mirrored = compute_importance(model, units, [probe], optimizer)
    fallback = compute_importance(model, units, [probe], lr=lr)
    gains = actual_gains(model, units, optimizer, probe)
    costs = profile_model(model, probe).unit_costs(units)
    names = [unit.name for unit in units]
    result = {
        "optimizer": name,
        "lr": lr,
        "warm_steps": args.warm_steps,
        "units": len(units),
        "rho": args.rho,
        "spearman_mirrored": rank_correlation(mirrored, gains),
        "spearman_fallback": rank_correlation(fallback, gains),
        "captured_mirrored": captured(costs, names, mirrored, gains, args.rho),
        "captured_fallback": captured(costs, names, fallback, gains, args.rho),
    }
    print(json.dumps(result), file=sys.stderr)
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| optimizer | lr | Spearman, mirrored | Spearman, -lr*grad | DP gain, mirrored | DP gain, -lr*grad |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {r['spearman_mirrored']:.3f} | {r['spearman_fallback']:.3f} | "
            f"{r['captured_mirrored']:.3f} | {r['captured_fallback']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--warm-steps", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=None, help="default: benchmarks/results/optimizer_mirrors")
    parser.add_argument("--quick", action="store_true", help="a tiny random-init model on synthetic data (tests)")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = (
            ROOT / "benchmarks" / "results" / ("quick/optimizer_mirrors" if args.quick else "optimizer_mirrors")
        )
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    missing = [name for name in args.optimizers if not (args.output_dir / f"{name}.json").exists()]
    if missing:
        if args.quick:
            work = workload.quick_workload(workload.DataSizes(train=16, generate=0), args.batch_size, seed=0)
        else:
            work = workload.real_workload(workload.DataSizes(train=None, generate=0), args.batch_size, seed=0)
        for name in missing:
            result = measure(name, work, args)
            (args.output_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    results = [json.loads(path.read_text()) for path in sorted(args.output_dir.glob("*.json"))]
    print(table(results))


if __name__ == "__main__":
    main()
