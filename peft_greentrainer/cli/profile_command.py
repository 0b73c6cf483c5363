"""``greentrainer profile``: what GreenTrainer will cost and save on a model, from its ``config.json`` alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..engine.selector import rounded_up_rho
from .errors import CliError
from .planning import plan, plot_plan
from .report import markdown_table


def run_profile(args: argparse.Namespace) -> dict:
    if args.plot and not Path(args.plot).absolute().parent.is_dir():
        raise CliError(f"--plot {args.plot}: its directory does not exist")
    try:
        result = plan(
            args.model,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            target_len=args.target_len,
            units=args.units,
            target_modules=args.target_modules,
            r=args.r,
            rhos=args.rho,
            sparse_lm_head=not args.dense_lm_head,
            label_tokens=args.label_tokens,
        )
    except (OSError, ValueError, KeyError) as error:
        raise CliError(f"cannot build {args.model} from its config: {str(error).splitlines()[0]}") from error
    except AttributeError as error:  # a config without a setting its model reads (T5Config() has no decoder start)
        if "Config' object has no attribute" not in str(error):
            raise
        raise CliError(
            f"cannot run {args.model} from its config: {error}; add that setting to its config.json"
        ) from error
    if args.plot:
        plot_plan(result, args.plot)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
    else:
        print(format_plan(result))
    return result


def format_plan(result: dict) -> str:
    """The plan as a header and a markdown table, one row per rho."""
    lines = [
        f"{result['model']} ({result['architecture']}, {result['parameters'] / 1e9:.2f} B parameters), batch "
        f"{result['batch_size']} x {result['seq_len']}, units={result['units']} ({result['num_units']} units)",
        f"LM head: {result['lm_head']}, {result['label_tokens']} supervised tokens per sequence",
        f"forward {result['forward_flops']:.3e} FLOPs/step; full fine-tuning {result['full_flops']:.3e} FLOPs/step "
        f"(dense LM head), {result['full_flops_same_head']:.3e} with the same LM head (rho's reference)",
        f"smallest feasible rho: {rounded_up_rho(result['min_rho']):.4f}",
        "",
        markdown_table(
            [
                "rho",
                "deepest reachable unit",
                "units reachable",
                "predicted FLOPs/step",
                "saving vs dense full FT",
                "vs full FT, same head",
            ],
            [
                [
                    r["rho"],
                    r["deepest_reachable"] or "-",
                    f"{100 * r['reachable_share']:.0f}%",
                    f"{r['predicted_flops']:.3e}" if r["predicted_flops"] else "infeasible",
                    f"{100 * r['saving']:.0f}%" if r["saving"] is not None else "-",
                    f"{100 * r['saving_vs_same_head']:.0f}%" if r["saving"] is not None else "-",
                ]
                for r in result["rhos"]
            ],
        ),
    ]
    return "\n".join(lines)
