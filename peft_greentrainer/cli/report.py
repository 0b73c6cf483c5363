"""The run report: ``metrics.json``, the PNG plots and ``report.md`` embedding them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pyplot_headless():
    """matplotlib's pyplot, imported only when a plot is made (a command that draws nothing does not pay for it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_selections(units: Sequence[str], selections: Sequence[Sequence[str]], path: Path) -> None:
    """Heatmap: units in backward order (rows) x selection index (columns), dark = trained."""
    plt = pyplot_headless()
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
    plt = pyplot_headless()
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
    plt = pyplot_headless()
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


def plot_energy(energy: Mapping[str, Any], path: Path) -> None:
    """Bars in Wh: this run (training + selections, stacked) against the full fine-tuning estimates."""
    plt = pyplot_headless()
    selection = energy.get("selection_kwh") or 0.0
    labels, training, selections = ["this run"], [energy["energy_kwh"] - selection], [selection]
    if energy.get("full_finetuning_kwh") is not None:
        labels.append("full FT, same LM head\n(estimate)")
        training.append(energy["full_finetuning_kwh"])
        selections.append(0.0)
    if energy.get("full_finetuning_dense_head_kwh") is not None:
        labels.append("full FT, dense LM head\n(estimate)")
        training.append(energy["full_finetuning_dense_head_kwh"])
        selections.append(0.0)
    wh = np.array(training) * 1000, np.array(selections) * 1000
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.barh(labels, wh[0], color="tab:green", label="training steps")
    ax.barh(labels, wh[1], left=wh[0], color="tab:orange", label="selections (importance + DP)")
    ax.invert_yaxis()
    ax.set_xlabel(f"Wh ({energy['mode']} by CodeCarbon)")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def energy_section(energy: Mapping[str, Any] | None) -> list[str]:
    """The report's energy receipt: what was measured, how, and the full fine-tuning estimates, labelled."""
    if energy is None:
        return ["## Energy", "Not measured (`--no-energy`).", ""]
    if not energy["measured"]:
        return ["## Energy", f"Not measured: {energy['error']}. Training was not affected.", ""]
    intensity = energy["carbon_intensity_g_per_kwh"]
    text = [
        "## Energy",
        f"Measured with CodeCarbon, offline, mode **{energy['mode']}** "
        f"({'; '.join(f'{k}: {v}' for k, v in energy['components'].items())}). Carbon intensity {intensity:.0f} "
        f"gCO2-eq/kWh: {energy['carbon_intensity_source']}.",
        "",
        markdown_table(
            ["", "Wh", "g CO2-eq"],
            [
                [name, f"{1000 * kwh:.3g}", f"{kwh * intensity:.3g}"]
                for name, kwh in (
                    ("this run", energy["energy_kwh"]),
                    ("of which selections (by time share)", energy["selection_kwh"]),
                    (
                        f"full fine-tuning, same LM head ({energy['full_finetuning_basis']})",
                        energy["full_finetuning_kwh"],
                    ),
                    ("full fine-tuning, dense LM head (FLOPs ratio)", energy["full_finetuning_dense_head_kwh"]),
                )
                if kwh is not None
            ],
        ),
        "",
        "Full fine-tuning figures are estimates for the same steps, not measurements.",
        "",
        "![energy](energy.png)",
        "",
    ]
    return text


def flops_section(metrics: Mapping[str, Any]) -> list[str]:
    """This run's step FLOPs against dense full fine-tuning and against full fine-tuning with the same LM head."""
    audited = [s for s in metrics["step_measurements"] if s.get("flops_ratio") is not None]
    if audited:  # the counted steps, each on its own inputs (StepMeter.audit)
        dense, same = (float(np.mean([s[k] for s in audited])) for k in ("dense_full_flops", "full_flops"))
        step = float(np.mean([s["alone_flops"] for s in audited]))
    else:  # nothing counted: the first batch's references
        same, dense = metrics["full_finetuning_flops_per_step"], metrics["full_finetuning_dense_head_flops_per_step"]
        step = None
    rows = [
        ["full fine-tuning, dense LM head (what one would otherwise run)", f"{dense:.3e}", "1.000"],
        ["full fine-tuning, same LM head (rho's reference)", f"{same:.3e}", f"{same / dense:.3f}"],
    ]
    if step is not None:
        rows.append(["this run, measured mean", f"{step:.3e}", f"{step / dense:.3f} ({step / same:.3f} of same head)"])
    kept = metrics.get("lm_head_kept_share")
    return [
        f"LM head: {metrics['lm_head']}" + (f", run on {100 * kept:.0f}% of positions." if kept is not None else "."),
        "",
        markdown_table(["per step", "FLOPs", "vs dense full FT"], rows),
        "",
    ]


def describe_cuts(truncation: Mapping[str, Mapping[str, int]], max_source_tokens: int, max_target_tokens: int) -> str:
    """One sentence: how many sources and targets --max-source-tokens / --max-target-tokens cut, by how much at most."""
    limits = f"--max-source-tokens {max_source_tokens} / --max-target-tokens {max_target_tokens}"
    parts = []
    for split, name, targets in (
        ("train", "training", "targets"),
        ("eval", "evaluation", f"references longer than the {max_target_tokens} tokens generated"),
    ):
        cuts = truncation.get(split)
        if not cuts or not (cuts["sources_cut"] or cuts["targets_cut"]):
            continue
        counts = [
            f"{cuts[count]} of {cuts['examples']} {label} (by up to {cuts[most]} tokens)"
            for count, most, label in (
                ("sources_cut", "source_tokens_cut_max", "sources"),
                ("targets_cut", "target_tokens_cut_max", targets),
            )
            if cuts[count]
        ]
        parts.append(f"{name}: {', '.join(counts)}")
    if not parts:
        return f"Nothing was cut to fit {limits}."
    return f"Cut to fit {limits}: {'; '.join(parts)}."


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
    """Write metrics.json, selections.png, flops.png, loss.png, energy.png (if measured) and report.md."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    plot_selections(units, selections, directory / "selections.png")
    plot_flops(steps, predicted, float(metrics["rho"]), directory / "flops.png")
    plot_loss(log_history, directory / "loss.png")
    energy = metrics.get("energy")
    if energy is not None and energy["measured"]:
        plot_energy(energy, directory / "energy.png")
    text = [
        "# GreenTrainer run report",
        "",
        f"Model `{metrics['model']}`, data `{metrics['dataset']}`, units `{metrics['units']}`, rho {metrics['rho']}.",
        "",
        describe_cuts(metrics["truncation"], metrics["max_source_tokens"], metrics["max_target_tokens"]),
        "",
        markdown_table(["", "value"], summary_rows),
        "",
        "## FLOPs per step",
        "Predicted from the cost profile; measured by FlopCounterMode on sampled steps; both as a fraction of full "
        "fine-tuning FLOPs of the same step with the same LM head (the reference of rho).",
        "",
        *flops_section(metrics),
        "![FLOPs per step](flops.png)",
        "",
        "## Units selected",
        "![selections](selections.png)",
        "",
        "## Training loss",
        "![loss](loss.png)",
        "",
        *energy_section(energy),
    ]
    (directory / "report.md").write_text("\n".join(text))


def summary_rows(metrics: dict) -> list[list[str]]:
    """The run's short result table (report.md and the console), from ``metrics``."""
    before, after = metrics["before"], metrics["after"]
    measured = metrics["measured_flops_ratio"]
    vs_dense = metrics["measured_flops_ratio_vs_dense_full"]
    kept = metrics["lm_head_kept_share"]
    rows = [[f"{name} before / after", f"{before[name]:.2f} / {after[name]:.2f}"] for name in after]
    rows += [
        ["LM head", metrics["lm_head"] + (f", on {100 * kept:.0f}% of positions" if kept is not None else "")],
        ["FLOPs ratio predicted", f"{metrics['predicted_flops_ratio']:.3f}"],
        ["FLOPs ratio measured", _mean_and_max(measured, metrics["measured_flops_ratio_max"])],
        ["FLOPs vs dense full fine-tuning", f"{vs_dense:.3f}" if vs_dense is not None else "not counted"],
        ["training wall time", f"{metrics['train_seconds']:.0f} s ({metrics['steps']} steps)"],
        ["batches padded", "to the longest row" if metrics.get("padding") == "longest" else "to the token limits"],
        ["selection overhead", f"{100 * metrics['selection_overhead']:.1f}% of training time"],
        ["units selected (last)", f"{metrics['units_selected_last']} of {metrics['units_total']}"],
    ]
    return rows + _energy_rows(metrics["energy"])


def _mean_and_max(mean: float | None, largest: float | None) -> str:
    """The counted steps' FLOPs ratio: its mean, and its largest, which is what rho bounds."""
    return f"{mean:.3f} (largest {largest:.3f})" if mean is not None else "not counted"


def _energy_rows(energy: dict | None) -> list[list[str]]:
    if energy is None:
        return [["energy", "not measured (--no-energy)"]]
    if not energy["measured"]:
        return [["energy", f"not measured: {energy['error']}"]]
    rows = [
        [
            "energy (CodeCarbon)",
            f"{1000 * energy['energy_kwh']:.3g} Wh, {1000 * energy['emissions_kg']:.3g} g CO2-eq ({energy['mode']})",
        ]
    ]
    if energy["selection_kwh"] is not None:
        rows.append(["energy of selections", f"{1000 * energy['selection_kwh']:.3g} Wh (by time share)"])
    if energy["full_finetuning_kwh"] is not None:
        rows.append(
            [
                "full fine-tuning, estimated",
                f"{1000 * energy['full_finetuning_kwh']:.3g} Wh ({energy['full_finetuning_basis']}, same LM head)",
            ]
        )
    if energy["full_finetuning_dense_head_kwh"] is not None:
        rows.append(
            [
                "full fine-tuning, dense LM head, estimated",
                f"{1000 * energy['full_finetuning_dense_head_kwh']:.3g} Wh (FLOPs ratio)",
            ]
        )
    return rows
