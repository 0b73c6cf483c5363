"""The one reporter: tables and plots of measured rows (``runner.train`` output), for every benchmark driver."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_greentrainer.cli.report import markdown_table


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def add_ratios(rows: list[dict], reference_flops: float, reference: dict | None = None) -> None:
    """FLOPs and wall-clock ratios to full fine-tuning: ``reference`` (its measured row) when it ran, else predicted."""
    full = reference or next((r for r in rows if r["key"] == "full"), None)
    flops_ref = full["measured_flops_per_step"] if full and full["measured_flops_per_step"] else reference_flops
    time_ref = full["median_step_seconds"] if full else None
    for row in rows:
        measured = row["measured_flops_per_step"]
        row["flops_ratio"] = measured / flops_ref if measured is not None else None
        row["predicted_flops_ratio"] = row["predicted_flops_per_step"] / reference_flops
        seconds = row["median_step_seconds"]
        row["wall_ratio"] = seconds / time_ref if seconds is not None and time_ref else None


# ------------------------------------------------------------------------------------------------- compare.py
def compare_table(rows: list[dict]) -> str:
    header = [
        "method",
        "lr",
        "measured FLOPs/step",
        "FLOPs ratio",
        "analytical total FLOPs",
        "wall ratio",
        "median step s",
        "peak RSS MiB",
        "ROUGE-1",
        "ROUGE-2",
        "ROUGE-L",
        "loss first→last",
        "selection overhead",
        "trained",
    ]
    body = [
        [
            r["method"],
            fmt(r["lr"], "g"),
            fmt(r["measured_flops_per_step"], ".3e"),
            fmt(r["flops_ratio"], ".3f"),
            fmt(r["predicted_total_flops"], ".3e"),
            fmt(r["wall_ratio"], ".2f"),
            fmt(r["median_step_seconds"], ".3f"),
            fmt(r["peak_rss_mib"], ".0f"),
            fmt(r["rouge"]["rouge1"], ".2f"),
            fmt(r["rouge"]["rouge2"], ".2f"),
            fmt(r["rouge"]["rougeL"], ".2f"),
            f"{fmt(r['train_loss_first'], '.3f')} → {fmt(r['train_loss_last'], '.3f')}",
            f"{fmt(100 * r['selection_overhead'], '.1f')}%" if r["selection_seconds"] else "-",
            r["trained"],
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def plot_rouge_vs_flops(rows: list[dict], base_rouge_l: float, path: Path) -> None:
    """ROUGE-L against the measured FLOPs ratio: one numbered point per method, the names in the legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    points = [
        (row["flops_ratio"] if row["flops_ratio"] is not None else row["predicted_flops_ratio"], row["rouge"]["rougeL"])
        for row in rows
    ]
    y_span = max(1.0, max(y for _, y in points) - min(y for _, y in points), abs(base_rouge_l))
    for number, (row, (x, y)) in enumerate(zip(rows, points, strict=True), 1):
        star = row["key"].startswith("gt_")
        label = f"{number}. {row['method']}"
        ax.scatter([x], [y], s=90 if star else 45, marker="*" if star else "o", zorder=3, label=label)
        # the numbers of (nearly) coinciding points are stacked instead of drawn over each other
        near = sum(abs(x - px) < 0.04 and abs(y - py) < 0.05 * y_span for px, py in points[: number - 1])
        ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 4 + 9 * near), fontsize=8)
    ax.axhline(base_rouge_l, color="grey", linestyle="--", linewidth=1, label="base model, no fine-tuning")
    ax.set_xlabel("training FLOPs per step / full fine-tuning (measured)")
    ax.set_ylabel("ROUGE-L (held-out)")
    ax.set_xlim(0, 1.1)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.set_title("Quality against training FLOPs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_compare(result: dict, output_dir: Path) -> str:
    """compare.md, compare.json and compare.png from one side-by-side run."""
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_text = result["setup"]
    base = result["base_rouge"]
    lines = [
        "# GreenTrainer side-by-side benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"torch {result['versions']['torch']} with {result['torch_threads']} threads, transformers "
        f"{result['versions']['transformers']}, peft {result['versions']['peft']}, {result['cpu']}; total "
        f"{result['total_seconds'] / 60:.1f} min.",
        "",
        setup_text,
        "",
        f"Base model before fine-tuning: ROUGE-1/2/L {base['rouge1']:.2f} / {base['rouge2']:.2f} / "
        f"{base['rougeL']:.2f}. Same batches in the same order for every method: "
        f"{'yes' if result['same_batch_order'] else 'NO'}.",
        "",
        compare_table(result["rows"]),
        "",
        "FLOPs ratio: mean FLOPs of the counted steps (FlopCounterMode, one step in "
        f"{result['config']['measure_every']}) over those of full fine-tuning. Analytical total: per-step FLOPs "
        "predicted by the cost profile, summed over the run. Wall ratio: median time of the uncounted steps over full "
        "fine-tuning's (same process). Peak RSS: sampled while that method trained. Selection overhead: importance + "
        "DP time as a share of that method's training time.",
        "",
        "![ROUGE-L against FLOPs ratio](compare.png)",
        "",
    ]
    text = "\n".join(lines)
    (output_dir / "compare.md").write_text(text)
    (output_dir / "compare.json").write_text(json.dumps(result, indent=2, default=float))
    plot_rouge_vs_flops(result["rows"], base["rougeL"], output_dir / "compare.png")
    return text


# ------------------------------------------------------------------------------------------------- protocol.py
MAX_GRID_EXTENSIONS = 2


def chosen_lr(runs: list[dict], key: str, grid: Sequence[float], extensions: int = MAX_GRID_EXTENSIONS) -> float | None:
    """The learning rate with the lowest validation loss at seed 0 over the searched grid (:func:`searched_grid`),
    once every value of it has run."""
    return _best(_grid_losses(runs, key), searched_grid(runs, key, grid, extensions))


def searched_grid(
    runs: list[dict], key: str, grid: Sequence[float], extensions: int = MAX_GRID_EXTENSIONS
) -> list[float]:
    """``grid``, extended by one half-decade step past an edge while the best value sits on that edge (at most
    ``extensions`` steps): a best value on the edge says the best learning rate may lie beyond it. One rule
    for every method; values not run yet end the search (the grid is then incomplete)."""
    losses, searched = _grid_losses(runs, key), sorted(grid)
    for _ in range(extensions):
        best = _best(losses, searched)
        if best == searched[-1]:
            searched.append(half_decade_step(searched[-1], up=True))
        elif best == searched[0]:
            searched.insert(0, half_decade_step(searched[0], up=False))
        else:  # inside the grid, or the grid is incomplete
            break
    return searched


def half_decade_step(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` in the series 1, 3, 10, 30, ... x 10^k that the grids are drawn from."""
    exponent = math.floor(math.log10(lr))
    series = sorted(float(f"{m}e{e}") for e in range(exponent - 2, exponent + 3) for m in (1, 3))
    return min(v for v in series if v > lr * 1.5) if up else max(v for v in series if v < lr / 1.5)


def _best(losses: dict[float, float], grid: Sequence[float]) -> float | None:
    if not all(lr in losses for lr in grid):
        return None
    return min(grid, key=lambda lr: losses[lr] if math.isfinite(losses[lr]) else math.inf)  # a diverged run loses


def _grid_losses(runs: list[dict], key: str) -> dict[float, float]:
    return {r["row"]["lr"]: r["row"]["heldout_loss"]["val"] for r in runs if r["key"] == key and r["seed"] == 0}


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _pm(values: Sequence[float], spec: str, scale: float = 1.0) -> str:
    if not values:
        return "-"
    mean, std = _mean_std([v * scale for v in values])
    return format(mean, spec) + (f" ± {format(std, spec)}" if std is not None else "")


def verdict(candidate: Sequence[float], reference: Sequence[float]) -> str:
    """Whether ``candidate``'s mean is lower or higher than ``reference``'s; within the larger seed spread (sample
    std) it is a tie. Which direction is better is the metric's: lower for a loss, higher for ROUGE."""
    if len(candidate) < 2 or len(reference) < 2:
        return "n/a (1 seed)"
    (mean_c, std_c), (mean_r, std_r) = _mean_std(candidate), _mean_std(reference)
    if abs(mean_c - mean_r) <= max(std_c or 0.0, std_r or 0.0):
        return "tie"
    return "lower" if mean_c < mean_r else "higher"


@dataclass
class MethodResult:
    """One method's runs at its chosen learning rate (or the best so far while its grid is incomplete)."""

    key: str
    name: str
    lr: float
    grid_complete: bool
    runs: list[dict]

    def values(self, pick) -> list[float]:
        return [pick(r["row"]) for r in self.runs]


def method_results(
    runs: list[dict], grids: dict[str, list[float]], extensions: int = MAX_GRID_EXTENSIONS
) -> list[MethodResult]:
    from .methods import REGISTRY

    results = []
    for key, spec in REGISTRY.items():
        losses = _grid_losses(runs, key)
        if not losses:
            continue
        if spec.ablation_of:  # runs only at its parent's chosen learning rate
            lr = chosen_lr(runs, spec.ablation_of, grids[REGISTRY[spec.ablation_of].kind], extensions)
            if lr not in losses:
                continue
            complete = True
        else:
            lr = chosen_lr(runs, key, grids[spec.kind], extensions)
            complete = lr is not None
            lr = lr if complete else min(losses, key=losses.get)
        finals = sorted((r for r in runs if r["key"] == key and r["row"]["lr"] == lr), key=lambda r: r["seed"])
        results.append(MethodResult(key, finals[0]["row"]["method"], lr, complete, finals))
    return results


def _grid_table(runs: list[dict], results: list[MethodResult], grids: dict[str, list[float]], extensions: int) -> str:
    from .methods import REGISTRY

    searched = {
        r.key: searched_grid(runs, r.key, grids[REGISTRY[r.key].kind], extensions)
        for r in results
        if not REGISTRY[r.key].ablation_of  # no grid: its parent's learning rate
    }
    header = ["method", *[f"grid {i + 1}" for i in range(max(map(len, searched.values()), default=0))], "chosen"]
    body = []
    for result in results:
        if result.key not in searched:
            continue
        grid = searched[result.key]
        losses = _grid_losses(runs, result.key)
        cells = [
            ("**" if lr == result.lr and result.grid_complete else "")
            + f"{lr:g}: {fmt(losses.get(lr), '.4f')}"
            + ("**" if lr == result.lr and result.grid_complete else "")
            for lr in grid
        ]
        edge = result.grid_complete and result.lr in (grid[0], grid[-1])
        chosen = f"{result.lr:g}" + (" (grid edge)" if edge else "") if result.grid_complete else "grid incomplete"
        body.append([result.name, *cells, *[""] * (len(header) - 2 - len(cells)), chosen])
    return markdown_table(header, body)


def _total_flops(row: dict) -> float:
    """The whole run's training FLOPs: every step's plus selection's (importance probes)."""
    return row["predicted_total_flops"] + row["selection_flops"]


def _results_table(results: list[MethodResult], base: dict | None) -> str:
    by_key = {r.key: r for r in results}
    full, reference = by_key.get("full"), by_key.get("gt_tensors_0.5")
    full_flops = statistics.fmean(full.values(lambda r: r["measured_flops_per_step"])) if full else None
    full_step = statistics.fmean(full.values(lambda r: r["median_step_seconds"])) if full else None
    full_total = statistics.fmean(full.values(_total_flops)) if full else None
    base_loss = base["row"]["heldout_loss"]["test"] if base else None
    full_loss = statistics.fmean(full.values(lambda r: r["heldout_loss"]["test"])) if full else None
    header = [
        "method",
        "lr",
        "seeds",
        "test loss",
        "of full FT's gain",
        "ROUGE-1",
        "ROUGE-2",
        "ROUGE-L",
        "FLOPs ratio",
        "total FLOPs ratio",
        "wall ratio",
        "peak RSS MiB",
        "selection overhead",
        "test loss vs GT rho 0.5",
        "ROUGE-L vs GT rho 0.5",
    ]

    def against_reference(result: MethodResult, metric: Callable[[dict], float]) -> str:
        if reference is None:
            return "-"
        return "(reference)" if result is reference else verdict(result.values(metric), reference.values(metric))

    body = []
    for result in results:
        losses = result.values(lambda r: r["heldout_loss"]["test"])
        gain = (
            _pm([(base_loss - loss) / (base_loss - full_loss) for loss in losses], ".0f", 100) + "%"
            if base_loss is not None and full_loss is not None and base_loss != full_loss
            else "-"
        )
        body.append(
            [
                result.name,
                f"{result.lr:g}" + ("" if result.grid_complete else "*"),
                len(result.runs),
                _pm(losses, ".4f"),
                gain,
                *[_pm(result.values(lambda r, k=k: r["rouge"][k]), ".2f") for k in ("rouge1", "rouge2", "rougeL")],
                _pm([f / full_flops for f in result.values(lambda r: r["measured_flops_per_step"])], ".3f")
                if full_flops
                else "-",
                _pm([f / full_total for f in result.values(_total_flops)], ".3f") if full_total else "-",
                _pm([s / full_step for s in result.values(lambda r: r["median_step_seconds"])], ".2f")
                if full_step
                else "-",
                _pm(result.values(lambda r: r["peak_rss_mib"]), ".0f"),
                _pm(result.values(lambda r: r["selection_overhead"]), ".1f", 100) + "%",
                against_reference(result, lambda r: r["heldout_loss"]["test"]),
                against_reference(result, lambda r: r["rouge"]["rougeL"]),
            ]
        )
    if base:
        scores = base["row"]["rouge"]
        body.append(
            [
                "base model (no training)",
                "-",
                "-",
                f"{base_loss:.4f}",
                "0%",
                *[f"{scores[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL")],
                *["-"] * 7,
            ]
        )
    return markdown_table(header, body)


def loss_at_compute(curve: Sequence[dict], flops: float) -> tuple[float, bool]:
    """The traced held-out loss once ``flops`` training FLOPs are spent (linear between curve points), and whether
    the run got that far; a run that ended earlier reports its final loss: that is all this protocol gave it."""
    spent = [point["flops"] for point in curve]
    losses = [point["loss"] for point in curve]
    if flops >= spent[-1]:
        return losses[-1], flops == spent[-1]
    after = next(i for i, f in enumerate(spent) if f >= flops)
    if after == 0:
        return losses[0], True
    share = (flops - spent[after - 1]) / (spent[after] - spent[after - 1])
    return losses[after - 1] + share * (losses[after] - losses[after - 1]), True


def equal_compute_table(results: list[MethodResult], fractions: Sequence[float] = (0.25, 0.5, 1.0)) -> str:
    """The plot's question in numbers: with a fraction of full FT's whole-run FLOPs, what held-out loss does each
    method reach? Mean ± std over seeds of the traced validation loss; "(ended)" where the run stopped earlier."""
    full = next((r for r in results if r.key == "full"), None)
    if full is None:
        return "(full fine-tuning has not run)"
    budget = statistics.fmean(full.values(lambda r: r["curve"][-1]["flops"]))
    header = ["method", "seeds", *[f"at {f:g}x full FT's FLOPs" for f in fractions], "run's own total"]
    body = []
    for result in results:
        curves = [c for c in result.values(lambda r: r["curve"]) if c]
        if not curves:
            continue
        cells = []
        for fraction in fractions:
            reached = [loss_at_compute(curve, fraction * budget) for curve in curves]
            ended = " (ended)" if not all(got_there for _, got_there in reached) else ""
            cells.append(_pm([loss for loss, _ in reached], ".4f") + ended)
        total = _pm([curve[-1]["flops"] / budget for curve in curves], ".2f")
        body.append([result.name, len(curves), *cells, total])
    return markdown_table(header, body)


def plot_curves(results: list[MethodResult], path: Path) -> None:
    """Held-out loss against cumulative training FLOPs (as full FT's whole-run total) and against wall time."""
    plt = pyplot()
    full = next((r for r in results if r.key == "full"), None)
    fig, (by_flops, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    reference = full.runs[0]["row"]["predicted_total_flops"] if full else None
    for result in results:
        row = result.runs[0]["row"]
        if not row["curve"]:
            continue
        style = {"marker": "*" if result.key.startswith("gt_") else "o", "markersize": 5, "label": result.name}
        losses = [p["loss"] for p in row["curve"]]
        flops = [p["flops"] / reference if reference else p["flops"] for p in row["curve"]]
        by_flops.plot(flops, losses, **style)
        by_time.plot([p["seconds"] / 60 for p in row["curve"]], losses, **style)
    by_flops.set_xlabel("cumulative training FLOPs / full fine-tuning's whole run" if reference else "training FLOPs")
    by_time.set_xlabel("training wall time (min; selection included, evaluation excluded)")
    by_flops.set_ylabel("validation loss (teacher-forced, traced subset)")
    for ax in (by_flops, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.suptitle("Equal compute: held-out loss against training FLOPs and wall time (seed 0, chosen lr)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_protocol(
    output: Path,
    runs: list[dict],
    grids: dict[str, list[float]],
    left: Sequence[str] = (),
    extensions: int = MAX_GRID_EXTENSIONS,
) -> str:
    """protocol.md and protocol.png, rebuilt from every result file found."""
    output.mkdir(parents=True, exist_ok=True)
    base = next((r for r in runs if r["key"] == "base"), None)
    trained = [r for r in runs if r["key"] != "base"]
    results = method_results(trained, grids, extensions)
    cpu_hours = sum(r["row"].get("cpu_seconds", 0.0) for r in runs) / 3600
    first = trained[0] if trained else None
    lines = [
        "# Quality protocol (issue 13)",
        "",
        f"{len(trained)} training runs{' + the base model' if base else ''}; total CPU time {cpu_hours:.2f} h"
        + (
            f" (torch {first['versions']['torch']}, {first['torch_threads']} thread(s) per run, {first['cpu']})"
            if first
            else ""
        )
        + ". Rebuilt from `runs/*/*.json` by `python benchmarks/protocol.py --stage report`.",
        "",
        "## Learning-rate grid (validation loss, seed 0; bold: chosen)",
        "",
        _grid_table(trained, results, grids, extensions) if results else "(no runs yet)",
        "",
        "## Equal steps (test split; mean ± sample std over seeds)",
        "",
        _results_table(results, base) if results else "(no runs yet)",
        "",
        "lr marked * : its grid is incomplete, the best so far is shown. Test loss: teacher-forced cross-entropy per "
        "target token on all test pairs. Of full FT's gain: (base - method) / (base - full FT) test loss. FLOPs ratio: "
        "mean FlopCounterMode FLOPs of the counted steps over full FT's. Total FLOPs ratio: the whole run's, "
        "selection's importance probes included. Wall ratio: median uncounted step time over full FT's (different "
        "processes; the machine is shared, so this is indicative). Selection overhead: selection "
        "time (importance + DP, or layer/block draws) as a share of training time. Last two columns: the method's mean "
        "against GreenTrainer rho 0.5's, a difference within the larger seed spread is a tie (lower test loss is "
        "better, higher ROUGE-L is better).",
        "",
        "## Equal compute",
        "",
        "![held-out loss against training FLOPs and wall time](protocol.png)",
        "",
        equal_compute_table(results) if results else "(no runs yet)",
        "",
        "Curves: seed 0 at the chosen learning rate; loss on the first validation pairs (the traced subset), at step 0 "
        "and evenly during training. FLOPs: per-step FLOPs predicted from each step's trainable set (exact on every "
        "counted step, see max error in the run files) plus the FLOPs counted during selection (importance probes). "
        "Wall time: step times (counted steps replaced by the median uncounted one) plus selection time. "
        "The table reads the curves (every seed, linear between points) at a share of full fine-tuning's whole-run "
        "FLOPs; a run that ended before spending it shows its final loss, marked (ended). Every run follows its own "
        "linear decay to 0 over 2 epochs, so a point mid-run is not what that method would reach with a schedule "
        "fitted to that budget.",
        "",
        "## What is left",
        "",
        *[f"- {line}" for line in left],
        "",
    ]
    if results:
        plot_curves(results, output / "protocol.png")
    text = "\n".join(lines)
    (output / "protocol.md").write_text(text)
    return text
