"""The quality protocol (issue 13): every method at its own best learning rate, several seeds, two views.

Stages (each run skips what already exists, so the protocol resumes across sessions and machines):

* ``--stage grid``: seed 0 of every learning rate of each method's grid (about 3 values across a decade); while the
  best one is on an edge of the grid, the next half-decade value past that edge too (at most 2 more).
* ``--stage seeds``: seeds 1 and 2 at the learning rate chosen by validation loss (the grid must be complete).
* ``--stage ablations``: seeds 0-2 of each ablation (a method with one setting changed) at its parent's chosen
  learning rate (the parent's grid must be complete).
* ``--stage base``: the base model's held-out loss and ROUGE (no training), the reference for "improvement".
* ``--stage report``: only rebuild ``protocol.md`` / ``protocol.png`` from the result files.

Each (method, learning rate, seed) run writes ``runs/<method>/lr<lr>-seed<seed>.json``; the report is rebuilt after
every run from whatever files exist. Usage::

    python benchmarks/protocol.py --stage grid --methods full gt_tensors_0.5 lora --threads 1
    python benchmarks/protocol.py --stage seeds
    python benchmarks/protocol.py --stage seeds --methods random --seeds 2   # one seed (two runs side by side)
    python benchmarks/protocol.py --quick --output-dir /tmp/protocol   # tiny model, seconds (CI)

Setup: the embedded SmolLM2-135M-Instruct on ACLSum, all 300 training pairs, batch 4, AdamW with linear decay to 0
and no warmup (one schedule for every method), learning rate chosen on the validation split (150 pairs), reported on
the test split: teacher-forced target loss on all 300 pairs and ROUGE-1/2/L of greedy summaries of 100.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: the harness and this checkout's package
    sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402

from benchmarks.harness import methods, report, runner, workload  # noqa: E402

METHODS = (
    "full",
    "lora",
    "top_k",
    "random",
    "gt_tensors_0.4",
    "gt_tensors_0.5",
    "gt_tensors_0.7",
    "gt_lora_0.5",
    "gt_lora_at_lora",
    "gt_mixed_0.5",
    "lisa",
    "badam",
)
# one setting of a method changed, run at that method's chosen learning rate (3 seeds, no grid): GreenTrainer's
# importance probe, selection interval, and the sparse LM head it ships with (at the same dense-FT budget; with
# tensor and with LoRA units); the shipped head on the strongest baselines (the same training, fewer FLOPs); and the
# shipped-head rows with random importances (the same DP, budget and head) and with FT-top-k's rule instead
ABLATIONS = (
    "gt_tensors_0.5_probe1",
    "gt_tensors_0.5_resel8",
    "gt_tensors_0.5_shipped_head",
    "gt_lora_0.5_shipped_head",
    "full_sparse_head",
    "lora_sparse_head",
    "lisa_sparse_head",
    "badam_sparse_head",
    "random_tensors_shipped_head",
    "random_lora_shipped_head",
    "top_k_tensors_shipped_head",
    "top_k_lora_shipped_head",
    "gt_tensors_0.5_shipped_head_fresh",
    "gt_tensors_0.5_shipped_head_sgd",
    "gt_lora_0.5_shipped_head_sgd",
)
SEEDS = (0, 1, 2)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "protocol"


@dataclass
class Protocol:
    """Everything that makes two runs comparable; stored in every result file and checked when reading it."""

    epochs: int = 2
    batch_size: int = 4
    train: int | None = None  # all 300 pairs
    val: int | None = None  # all 150 pairs: learning-rate choice
    test: int | None = None  # all 300 pairs: teacher-forced loss
    generate: int = 100  # test pairs scored by ROUGE
    curve_rows: int = 32  # validation pairs traced during training
    curve_points: int = 4
    max_source_tokens: int = 160
    max_target_tokens: int = 48
    max_new_tokens: int = 48
    measure_every: int = 10
    lr_scheduler: str = "linear"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: str = "all-linear"
    importance_batches: int = 4
    baseline_rho: float = 0.5
    sparse_lm_head: bool = False  # every method pays the same dense LM head (methods.MethodOptions)
    grid_extensions: int = 2  # half-decade values added past a grid edge that holds the best (report.searched_grid)
    grids: dict[str, list[float]] = field(
        default_factory=lambda: {"tensors": [3e-5, 1e-4, 3e-4], "lora": [1e-4, 3e-4, 1e-3]}
    )
    quick: bool = False

    @classmethod
    def quick_protocol(cls) -> Protocol:
        return cls(
            epochs=1,
            train=32,
            val=16,
            test=16,
            generate=8,
            curve_rows=8,
            max_source_tokens=16,
            max_target_tokens=4,
            max_new_tokens=6,
            measure_every=3,
            lora_r=8,
            lora_alpha=16,
            grids={"tensors": [1e-3, 3e-3], "lora": [3e-3, 1e-2]},
            grid_extensions=0,
            quick=True,
        )


def load_workload(protocol: Protocol) -> workload.Workload:
    sizes = workload.DataSizes(
        train=protocol.train,
        generate=protocol.generate,
        heldout={"val": protocol.val, "test": protocol.test},
        max_source_tokens=protocol.max_source_tokens,
        max_target_tokens=protocol.max_target_tokens,
    )
    load = workload.quick_workload if protocol.quick else workload.real_workload
    return load(sizes, protocol.batch_size, seed=0)  # the data never depends on the run's seed


def settings(protocol: Protocol, seed: int) -> runner.TrainSettings:
    return runner.TrainSettings(
        epochs=protocol.epochs,
        batch_size=protocol.batch_size,
        seed=seed,
        measure_every=protocol.measure_every,
        max_new_tokens=protocol.max_new_tokens,
        max_source_tokens=protocol.max_source_tokens,
        lr_scheduler=protocol.lr_scheduler,
        curve_split="val",
        curve_rows=protocol.curve_rows,
        curve_points=protocol.curve_points,
        progress_every=1 if protocol.quick else 10,
    )


def options(protocol: Protocol, seed: int, total_steps: int) -> methods.MethodOptions:
    return methods.MethodOptions(
        seed=seed,
        importance_batches=protocol.importance_batches,
        baseline_rho=protocol.baseline_rho,
        lora_r=protocol.lora_r,
        lora_alpha=protocol.lora_alpha,
        lora_targets=protocol.lora_targets,
        total_steps=total_steps,
        sparse_lm_head=protocol.sparse_lm_head,
        lora_lr_factor=protocol.grids["lora"][0] / protocol.grids["tensors"][0],
    )


# ------------------------------------------------------------------------------------------------- result files
def run_path(output: Path, key: str, lr: float | None, seed: int) -> Path:
    name = f"seed{seed}.json" if lr is None else f"lr{lr:g}-seed{seed}.json"
    return output / "runs" / key / name


def write_json(path: Path, data: dict) -> None:
    """Atomically: a run killed mid-write leaves no half file that would count as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1, default=float))
    os.replace(partial, path)


def load_runs(output: Path, protocol: Protocol) -> list[dict]:
    """Every result file made under this protocol; files of another protocol are named and skipped."""
    defaults, wanted = asdict(Protocol()), asdict(protocol)
    runs = []
    for path in sorted((output / "runs").glob("*/*.json")):
        data = json.loads(path.read_text())
        stored = data.get("protocol", {})
        # a field added later counts as its default in older files, so adding a field keeps them valid
        if any(stored.get(name, defaults[name]) != value for name, value in wanted.items()):
            print(f"skipping {path}: made under another protocol", file=sys.stderr)
            continue
        runs.append(data)
    return runs


# ------------------------------------------------------------------------------------------------- running
@dataclass
class Session:
    protocol: Protocol
    output: Path
    work: workload.Workload

    def run(self, key: str, lr: float, seed: int) -> None:
        path = run_path(self.output, key, lr, seed)
        if path.exists():
            return
        train_settings = settings(self.protocol, seed)
        steps = train_settings.steps(self.work)
        runner.release_memory()
        transformers.set_seed(seed)
        print(f"{time.strftime('%H:%M:%S')} {key} lr {lr:g} seed {seed}: {steps} steps", file=sys.stderr)
        method = methods.build(key, self.work, options(self.protocol, seed, steps))
        row = runner.train(method, self.work, train_settings, lr)
        row.pop("batch_orders")
        write_json(
            path,
            {"key": key, "seed": seed, "protocol": asdict(self.protocol), "row": row, **runner.environment()},
        )
        val = row["heldout_loss"]["val"]
        print(f"{time.strftime('%H:%M:%S')} {key} lr {lr:g} seed {seed}: val loss {val:.4f}", file=sys.stderr)

    def run_base(self) -> None:
        """The base model's held-out losses and ROUGE: what "improvement" is measured from."""
        path = run_path(self.output, "base", None, 0)
        if path.exists():
            return
        cpu = time.process_time()
        model = self.work.new_model()
        train_settings = settings(self.protocol, 0)
        heldout = {split: runner.heldout_loss(model, cols) for split, cols in self.work.heldout.items()}
        scores = runner.evaluate_rouge(model, self.work, train_settings)
        full_flops = self.work.base_costs(model).full_flops
        row = {"heldout_loss": heldout, "rouge": scores, "full_flops_per_step": full_flops}
        row["cpu_seconds"] = time.process_time() - cpu
        write_json(path, {"key": "base", "seed": 0, "protocol": asdict(self.protocol), "row": row})


def grid_of(protocol: Protocol, key: str) -> list[float]:
    """The method's learning-rate grid; an ablation's is its parent's (it runs at the parent's choice)."""
    spec = methods.REGISTRY[key]
    return protocol.grids[methods.REGISTRY[spec.ablation_of or key].kind]


def parent_of(key: str) -> str:
    return methods.REGISTRY[key].ablation_of


def remaining(runs: list[dict], protocol: Protocol, command: str) -> list[str]:
    """What is left of the protocol, as the commands that continue it (each skips what exists)."""
    done = {(r["key"], r["row"].get("lr"), r["seed"]) for r in runs}
    grid = [
        k
        for k in METHODS
        if any(
            (k, lr, 0) not in done
            for lr in report.searched_grid(runs, k, grid_of(protocol, k), protocol.grid_extensions)
        )
    ]
    seeds = [
        k
        for k in METHODS
        if k not in grid
        and any(
            (k, report.chosen_lr(runs, k, grid_of(protocol, k), protocol.grid_extensions), s) not in done for s in SEEDS
        )
    ]
    lines = []
    if not any(r["key"] == "base" for r in runs):
        lines.append(f"`{command} --stage base`")
    if grid:
        lines.append(f"`{command} --stage grid --methods {' '.join(grid)}` ({len(grid)} methods' grids incomplete)")
    if seeds:
        lines.append(f"`{command} --stage seeds --methods {' '.join(seeds)}`")
    ablations = [
        k
        for k in ABLATIONS
        if any(
            (k, report.chosen_lr(runs, parent_of(k), grid_of(protocol, k), protocol.grid_extensions), s) not in done
            for s in SEEDS
        )
    ]
    if ablations:
        lines.append(
            f"`{command} --stage ablations --methods {' '.join(ablations)}` (each once its parent's grid is complete)"
        )
    return lines or ["nothing: every method has its grid and 3 seeds"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="protocol.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("grid", "seeds", "ablations", "base", "report"), default="grid")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS + ABLATIONS, default=None, help="default: every method (ablations: all)"
    )
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="grid stage: only these grid values")
    parser.add_argument(
        "--seeds", nargs="+", type=int, choices=SEEDS, default=None, help="seeds/ablations stages: only these seeds"
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, synthetic data, seconds (CI, smoke runs)")
    parser.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (a new protocol)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 leaves a core to others)")
    parser.add_argument("--output-dir", type=Path, default=None, help=f"default {DEFAULT_OUTPUT}/<protocol>")
    args = parser.parse_args(argv)
    wanted = ABLATIONS if args.stage == "ablations" else METHODS
    args.methods = args.methods or list(wanted)
    misplaced = [k for k in args.methods if k not in wanted]
    if misplaced and args.stage in ("grid", "seeds", "ablations"):
        other = "--stage ablations" if args.stage != "ablations" else "--stage grid/seeds"
        parser.error(f"{misplaced} run with {other}")

    protocol = Protocol.quick_protocol() if args.quick else Protocol()
    if args.epochs:
        protocol.epochs = args.epochs
    output = args.output_dir or DEFAULT_OUTPUT / f"{'quick' if args.quick else 'smollm2-aclsum'}-e{protocol.epochs}"
    runner.prepare_process(args.threads)
    command = "python benchmarks/protocol.py" + (" --quick" if args.quick else "")
    command += f" --epochs {protocol.epochs}" if args.epochs else ""
    command += f" --output-dir {args.output_dir}" if args.output_dir else ""

    def rebuild() -> str:
        runs = load_runs(output, protocol)
        return report.write_protocol(
            output, runs, protocol.grids, remaining(runs, protocol, command), protocol.grid_extensions
        )

    for key in args.methods if args.lrs else ():
        unknown = [lr for lr in args.lrs if lr not in grid_of(protocol, key)]
        if unknown:
            parser.error(f"--lrs {unknown} are not in {key}'s grid {grid_of(protocol, key)}")
    if args.stage != "report":
        session = Session(protocol, output, load_workload(protocol))
        if args.stage == "base":
            session.run_base()
        for key in args.methods if args.stage != "base" else ():
            grid = grid_of(protocol, key)
            if args.stage == "ablations":
                lr = report.chosen_lr(load_runs(output, protocol), parent_of(key), grid, protocol.grid_extensions)
                if lr is None:
                    print(f"{key}: {parent_of(key)}'s grid is incomplete; run it first", file=sys.stderr)
                    continue
                for seed in args.seeds or SEEDS:
                    session.run(key, lr, seed)
                    rebuild()
            elif args.stage == "grid":
                for lr in args.lrs or grid:
                    session.run(key, lr, 0)
                    rebuild()
                # a best value on the grid's edge extends the grid past it (report.searched_grid)
                while not args.lrs:
                    searched = report.searched_grid(load_runs(output, protocol), key, grid, protocol.grid_extensions)
                    missing = [lr for lr in searched if not run_path(output, key, lr, 0).exists()]
                    if not missing:
                        break
                    session.run(key, missing[0], 0)
                    rebuild()
            else:
                lr = report.chosen_lr(load_runs(output, protocol), key, grid, protocol.grid_extensions)
                if lr is None:
                    print(f"{key}: its learning-rate grid is incomplete; run --stage grid first", file=sys.stderr)
                    continue
                for seed in args.seeds or SEEDS[1:]:
                    session.run(key, lr, seed)
                    rebuild()
    print(rebuild())


if __name__ == "__main__":
    main()
