"""Planning before training: what each ``rho`` reaches and saves on a model, from its config alone.

The model is built on the ``meta`` device (no weights, no memory), wrapped with ``get_peft_model`` exactly as in
training, and profiled with the same code, so the plan's FLOPs are the ones training will budget with. Without
gradients there is no importance yet; the "predicted FLOPs" of a rho use importance proportional to each unit's
parameter count, a neutral prior, and the budget itself is the upper bound any selection respects.

With the sparse LM head (the default for causal LMs) the head runs only on the last ``label_tokens`` positions of
each sequence (the supervised target; the prompt is labelled -100). The labels stay on the CPU, as meta tensors have
no values to mask with. Savings are given against dense full fine-tuning (what one would otherwise run) and against
full fine-tuning with the same head (the reference of ``rho``), never mixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.costs import cost_envelope, select_at_every_shape
from ..engine.profile import dummy_batch, profile_model
from ..twin import runnable_on_meta


def build_on_meta(model_path: str | Path):
    """A transformers model of the config at ``model_path`` (a directory or a config.json), on ``meta``."""
    import transformers

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"{model_path} does not exist")
    config = transformers.AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
    cls = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    if not config.is_encoder_decoder:
        # a decoder with a pad token checks the unmasked profiling batch for padding, which meta tensors cannot show
        # (GPT-2 family); no FLOP depends on it (encoder-decoders need it to build their decoder inputs)
        config.pad_token_id = None
    with torch.device("meta"):
        model = runnable_on_meta(cls.from_config(config))
    model.train()
    return model


def plan(
    model_path: str | Path,
    *,
    batch_size: int = 4,
    seq_len: int = 512,
    target_len: int = 128,
    units: str = "tensors",
    target_modules: str | Sequence[str] | None = None,
    r: int = 8,
    rhos: Sequence[float] = (0.3, 0.5, 0.7),
    sparse_lm_head: bool = True,
    label_tokens: int | None = None,
) -> dict[str, Any]:
    from peft import get_peft_model

    from ..config import GreenTrainerConfig
    from ..sparse_head import attached_sparse_lm_head, unsupported_reason

    model = build_on_meta(model_path)
    parameters = sum(p.numel() for p in model.parameters())
    batch = dummy_batch(model.config, batch_size, seq_len, target_len=target_len)
    if not model.config.is_encoder_decoder:
        batch["labels"] = supervised_tail_labels(batch_size, seq_len, label_tokens)
    dense_full = profile_model(model, batch).full_flops  # the bare model: dense head, every tensor trainable
    targets = target_modules if isinstance(target_modules, str) or not target_modules else list(target_modules)
    lora = {"r": r, "target_modules": targets or None} if units == "lora" else {}
    peft_model = get_peft_model(model, GreenTrainerConfig(units=units, sparse_lm_head=sparse_lm_head, **lora))
    tuner = peft_model.base_model
    costs = tuner.unit_costs(batch)  # this batch's own costs: what its steps cost
    # what training prices them at (a label bucket's ends): a unit is reachable, and selected, as training decides
    prices = tuner.step_prices(batch)
    envelope = cost_envelope(prices)
    if [u.name for u in envelope.units] != [u.name for u in costs.units]:
        raise RuntimeError("the priced rows list the units in another order than the batch; cannot plan")
    sparse = attached_sparse_lm_head(tuner.model) is not None
    alone = costs.alone_costs()
    floor = envelope.min_feasible_rho()
    prior = np.array([float(u.numel(tuner.model)) for u in costs.units])
    rows = []
    for rho in rhos:
        reachable = envelope.fits_alone(rho)
        row: dict[str, Any] = {
            "rho": rho,
            "reachable_share": float(reachable.mean()),
            "deepest_reachable": None,
            "predicted_flops": None,
            "saving": None,
        }
        if reachable.any():
            row["deepest_reachable"] = costs.units[int(np.flatnonzero(reachable).max())].name
            mask = select_at_every_shape(prices, prior, rho)
            flops = costs.predicted_flops(mask)
            row["predicted_flops"] = flops
            row["saving"] = 1.0 - flops / dense_full
            row["saving_vs_same_head"] = 1.0 - flops / costs.full_flops
            row["units_selected"] = int(mask.sum())
        rows.append(row)
    return {
        "model": str(model_path),
        "architecture": type(model).__name__,
        "parameters": parameters,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "units": units,
        "num_units": len(costs.units),
        "forward_flops": costs.forward_flops,
        "full_flops": dense_full,
        "lm_head": "sparse" if sparse else f"dense ({unsupported_reason(model) or 'sparse_lm_head=False'})",
        "label_tokens": label_tokens or seq_len,
        "full_flops_same_head": costs.full_flops,
        "min_rho": floor,
        "rhos": rows,
        "curve": (alone / costs.full_flops).tolist(),
    }


def supervised_tail_labels(batch_size: int, seq_len: int, label_tokens: int | None) -> torch.Tensor:
    """CPU labels with the last ``label_tokens`` positions supervised (all when ``None``) and the prompt at -100."""
    labels = torch.zeros(batch_size, seq_len, dtype=torch.long)
    labels[:, : seq_len - min(label_tokens or seq_len, seq_len)] = -100
    return labels


def plot_plan(result: dict[str, Any], path: str | Path) -> None:
    """Cost of training down to each depth (cheapest selection whose deepest unit is there) with budget lines."""
    from .report import pyplot_headless

    plt = pyplot_headless()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    curve = result["curve"]
    ax.plot(range(len(curve)), curve, color="tab:blue", label="forward + backward down to this unit")
    for row, color in zip(
        result["rhos"], ("tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown"), strict=False
    ):
        ax.axhline(row["rho"], linestyle="--", color=color, label=f"rho = {row['rho']}")
    ax.axhline(1.0, color="black", linewidth=0.8, label="full fine-tuning")
    ax.set_xlabel("unit depth (backward order: 0 = next to the loss)")
    ax.set_ylabel("FLOPs / full fine-tuning (same LM head)")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"{Path(result['model']).name}: cost of reaching each depth")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
