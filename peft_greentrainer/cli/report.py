"""The run report: ``metrics.json``, three PNG plots and ``report.md`` embedding them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_selections(units: Sequence[str], selections: Sequence[Sequence[str]], path: Path) -> None:
    """Heatmap: units in backward order (rows) x selection index (columns), dark = trained."""
    plt = _pyplot()
    grid = np.array([[name in set(chosen) for chosen in selections] for name in units], dtype=float)
    height = min(12.0, 2.0 + 0.05 * len(units))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.6 * len(selections)), height))
    ax.imshow(grid, aspect="auto", cmap="Greens", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel("selection")
    ax.set_ylabel(f"unit (backward order: loss at top, {len(units)} units)")
    ax.set_xticks(range(len(selections)))
    if len(units) <= 40:
        ax.set_yticks(range(len(units)), labels=units, fontsize=6)
    ax.set_title("Units selected for training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_flops(steps: Sequence[Mapping[str, Any]], predicted: Sequence[float], budget: float, path: Path) -> None:
    """Predicted and measured FLOPs per step, as a fraction of full fine-tuning, against the budget line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(predicted)), predicted, label="predicted", color="tab:blue")
    counted = [(s["step"], s["flops_ratio"]) for s in steps if s.get("flops_ratio") is not None]
    if counted:
        ax.scatter(*zip(*counted, strict=True), label="measured (FlopCounterMode)", color="tab:orange", zorder=3)
    ax.axhline(budget, color="tab:red", linestyle="--", label=f"budget rho={budget:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("FLOPs / full fine-tuning")
    ax.set_ylim(0, max(1.05, budget * 1.1))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("FLOPs per training step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss(log_history: Sequence[Mapping[str, Any]], path: Path) -> None:
    plt = _pyplot()
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        ax.plot(*zip(*points, strict=True), marker=".", color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    directory: Path,
    metrics: Mapping[str, Any],
    summary_rows: Sequence[Sequence[Any]],
    units: Sequence[str],
    selections: Sequence[Sequence[str]],
    steps: Sequence[Mapping[str, Any]],
    predicted: Sequence[float],
    log_history: Sequence[Mapping[str, Any]],
) -> None:
    """Write metrics.json, selections.png, flops.png, loss.png and report.md into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    plot_selections(units, selections, directory / "selections.png")
    plot_flops(steps, predicted, float(metrics["rho"]), directory / "flops.png")
    plot_loss(log_history, directory / "loss.png")
    text = [
        "# GreenTrainer run report",
        "",
        f"Model `{metrics['model']}`, data `{metrics['dataset']}`, units `{metrics['units']}`, rho {metrics['rho']}.",
        "",
        markdown_table(["", "value"], summary_rows),
        "",
        "## FLOPs per step",
        "Predicted from the cost profile; measured by FlopCounterMode on sampled steps; both as a fraction of full "
        "fine-tuning FLOPs of the same step.",
        "",
        "![FLOPs per step](flops.png)",
        "",
        "## Units selected",
        "![selections](selections.png)",
        "",
        "## Training loss",
        "![loss](loss.png)",
        "",
    ]
    (directory / "report.md").write_text("\n".join(text))
