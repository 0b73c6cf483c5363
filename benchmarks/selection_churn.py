"""How much of each selection the next one keeps, per protocol method, from the stored result files.

A re-selection that swaps most units stops training what it trained so far and starts others from scratch. This reads
the selections every protocol run records (no training) and prints, per method and seed: the number of selections,
the mean Jaccard similarity of consecutive selections, how many distinct units were ever trained, and the test loss.
Usage::

    python benchmarks/selection_churn.py                       # every method with more than one selection
    python benchmarks/selection_churn.py --methods gt_tensors_0.5_shipped_head random_tensors_shipped_head
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

DEFAULT_RUNS = Path(__file__).resolve().parent / "results" / "protocol" / "smollm2-aclsum-e2" / "runs"


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    """|a & b| / |a | b|: 1 when two selections train the same units, 0 when they share none."""
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 1.0


def churn(selections: Sequence[Sequence[str]]) -> dict:
    """Consecutive-selection similarity and coverage of one run's selections."""
    kept = [jaccard(a, b) for a, b in itertools.pairwise(selections)]
    return {
        "selections": len(selections),
        "mean_jaccard": statistics.mean(kept) if kept else None,
        "distinct_units": len(set().union(*map(set, selections))) if selections else 0,
    }


def rows(runs_dir: Path, methods: Sequence[str] | None = None) -> list[dict]:
    """One row per stored run with at least two selections (of ``methods`` if given), in path order."""
    out = []
    for path in sorted(runs_dir.glob("*/*.json")):
        data = json.loads(path.read_text())
        row = data["row"]
        if (methods and data["key"] not in methods) or len(row.get("selections") or []) < 2:
            continue
        out.append({"key": data["key"], "lr": row["lr"], "seed": data["seed"], **churn(row["selections"])})
        out[-1]["test_loss"] = row["heldout_loss"]["test"]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="a protocol's runs/ directory")
    parser.add_argument("--methods", nargs="+", default=None)
    args = parser.parse_args(argv)
    print("| method | lr | seed | selections | mean Jaccard of consecutive selections | distinct units | test loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows(args.runs, args.methods):
        print(
            f"| {r['key']} | {r['lr']:g} | {r['seed']} | {r['selections']} | {r['mean_jaccard']:.2f} | "
            f"{r['distinct_units']} | {r['test_loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
