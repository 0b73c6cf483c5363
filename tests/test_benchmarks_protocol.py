"""benchmarks/protocol.py and the harness pieces it adds: LISA, BAdam's period, learning-rate choice, ties, resuming."""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import SPARSE_HEAD_UNAVAILABLE, needs_sparse_head

from benchmarks import protocol, selection_churn
from benchmarks.harness import methods, report, runner, workload
from peft_greentrainer import enable_sparse_lm_head
from peft_greentrainer.engine.profile import default_loss, profile_model


def _tiny_work() -> workload.Workload:
    sizes = workload.DataSizes(train=8, generate=2, max_source_tokens=8, max_target_tokens=2)
    return workload.quick_workload(sizes, batch_size=4, seed=0)


def _trainable_blocks(model) -> set[int]:
    return {methods.block_index(n) for n, p in model.named_parameters() if p.requires_grad} - {None}


def test_lisa_trains_gamma_blocks_and_everything_outside_blocks():
    method = methods.build("lisa", _tiny_work(), methods.MethodOptions(seed=3, total_steps=40, lisa_layers=2))
    lisa, interval = method.selector, methods.lisa_interval(40)
    assert interval == 4
    draws = []
    for step in range(3 * interval):
        before = _trainable_blocks(method.model)
        lisa.on_step_begin(None, SimpleNamespace(global_step=step), None)
        blocks = _trainable_blocks(method.model)
        assert len(blocks) == 2
        if step % interval:
            assert blocks == before  # re-drawn only every K steps
        else:
            draws.append(blocks)
        outside = [p for n, p in method.model.named_parameters() if methods.block_index(n) is None]
        assert outside and all(p.requires_grad for p in outside)  # embeddings, final norm, LM head
    assert len(lisa.records) == 3 and [set(r) for r in lisa.records] == draws


def test_lisa_refuses_more_layers_than_the_model_has():
    with pytest.raises(SystemExit, match="cannot sample 4 of 3 blocks"):
        methods.build("lisa", _tiny_work(), methods.MethodOptions(total_steps=10, lisa_layers=4))


def test_badam_period_follows_its_readme_rule():
    # K = n / (B D): SmolLM2 on ACLSum (300 pairs, batch 4, 30 layers) and the quick model (32, 4, 3)
    assert methods.badam_switch_every(300, 4, 30) == 3
    assert methods.badam_switch_every(32, 4, 3) == 3
    assert methods.badam_switch_every(4, 4, 30) == 1


def test_verdict_calls_differences_within_the_seed_spread_a_tie():
    assert report.verdict([2.0, 2.2], [2.1, 2.15]) == "tie"
    assert report.verdict([2.0, 2.01], [2.5, 2.51]) == "lower"
    assert report.verdict([2.5, 2.51], [2.0, 2.01]) == "higher"
    assert report.verdict([2.0], [2.5, 2.51]) == "n/a (1 seed)"


def _run(key: str, lr: float, seed: int, val: float) -> dict:
    return {"key": key, "seed": seed, "row": {"lr": lr, "method": key, "heldout_loss": {"val": val}}}


def test_learning_rate_is_chosen_by_validation_loss_once_the_grid_is_complete():
    runs = [_run("full", 1e-4, 0, 2.0), _run("full", 3e-5, 0, 2.5), _run("full", 3e-4, 1, 1.0)]
    assert report.chosen_lr(runs, "full", [3e-5, 1e-4, 3e-4]) is None  # 3e-4 has no seed-0 run yet
    runs.append(_run("full", 3e-4, 0, 2.2))
    assert report.chosen_lr(runs, "full", [3e-5, 1e-4, 3e-4]) == 1e-4
    runs[1] = _run("full", 3e-5, 0, math.nan)  # diverged: never chosen, wherever it stands in the grid
    assert report.chosen_lr(runs, "full", [3e-5, 1e-4, 3e-4]) == 1e-4


def test_a_best_value_on_the_grid_edge_extends_the_grid_by_half_decades():
    grid = [3e-5, 1e-4, 3e-4]
    runs = [_run("gt", 3e-5, 0, 3.10), _run("gt", 1e-4, 0, 2.96), _run("gt", 3e-4, 0, 2.91)]
    assert report.searched_grid(runs, "gt", grid) == [3e-5, 1e-4, 3e-4, 1e-3]
    assert report.chosen_lr(runs, "gt", grid) is None  # 1e-3 must run before anything is chosen
    runs.append(_run("gt", 1e-3, 0, 2.95))
    assert report.chosen_lr(runs, "gt", grid) == 3e-4
    # downwards too, and at most two steps: a best value still on the edge then is accepted
    falling = [(3e-6, 0.8), (1e-5, 0.9), (3e-5, 1.0), (1e-4, 2.0), (3e-4, 3.0)]
    runs = [_run("x", lr, 0, loss) for lr, loss in falling]
    assert report.searched_grid(runs, "x", grid) == [3e-6, 1e-5, 3e-5, 1e-4, 3e-4]
    assert report.chosen_lr(runs, "x", grid) == 3e-6
    assert report.chosen_lr(runs, "x", grid, extensions=0) == 3e-5
    assert [report.half_decade_step(v, up=True) for v in (1e-4, 3e-4)] == [3e-4, 1e-3]


def test_equal_compute_reads_each_curve_at_a_share_of_full_finetunings_flops():
    curve = [{"flops": 0.0, "loss": 3.0}, {"flops": 4.0, "loss": 2.0}, {"flops": 8.0, "loss": 1.0}]
    assert report.loss_at_compute(curve, 2.0) == (2.5, True)  # linear between points
    assert report.loss_at_compute(curve, 8.0) == (1.0, True)
    assert report.loss_at_compute(curve, 9.0) == (1.0, False)  # ended earlier: its final loss, flagged

    def result(key: str, curves: list[list[dict]]) -> report.MethodResult:
        return report.MethodResult(key, key, 1e-4, True, [{"row": {"curve": c}} for c in curves])

    full = result("full", [[{"flops": 0.0, "loss": 3.0}, {"flops": 10.0, "loss": 1.0}]])
    half = result("half", [curve, [{"flops": 0.0, "loss": 3.0}, {"flops": 8.0, "loss": 2.0}]])
    table = report.equal_compute_table([full, half], fractions=(0.5, 1.0))
    full_row, half_row = table.splitlines()[2:]
    assert full_row.split(" | ")[2:] == ["2.0000", "1.0000", "1.00 |"]
    # 5 FLOPs: 1.75 and 2.375 (mean 2.0625); 10 FLOPs: both runs ended (1.0 and 2.0)
    assert half_row.split(" | ")[2:] == ["2.0625 ± 0.4419", "1.5000 ± 0.7071 (ended)", "0.80 ± 0.00 |"]
    assert report.equal_compute_table([half]) == "(full fine-tuning has not run)"


@pytest.mark.slow
def test_grid_stage_runs_the_extension_past_an_edge(tmp_path, monkeypatch):
    extended = protocol.Protocol.quick_protocol()
    extended.grid_extensions = 1  # two values: the best is always on an edge, so one more value runs
    monkeypatch.setattr(protocol.Protocol, "quick_protocol", classmethod(lambda cls: extended))
    protocol.main(["--quick", "--threads", "1", "--output-dir", str(tmp_path), "--methods", "full"])
    runs = protocol.load_runs(tmp_path, extended)
    searched = report.searched_grid(runs, "full", extended.grids["tensors"], 1)
    assert len(searched) == 3 and sorted(r["row"]["lr"] for r in runs) == searched
    chosen = report.chosen_lr(runs, "full", extended.grids["tensors"], 1)
    assert chosen in searched and f"**{chosen:g}: " in (tmp_path / "protocol.md").read_text()


def _written(output: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in sorted((output / "runs").glob("*/*.json"))}


@pytest.mark.slow
def test_quick_protocol_writes_one_file_per_run_resumes_and_reports(tmp_path):
    keys = ["full", "gt_tensors_0.5", "lisa", "badam", "gt_lora_0.5", "gt_lora_at_lora", "gt_mixed_0.5", "lora"]
    common = ["--quick", "--threads", "1", "--output-dir", str(tmp_path)]
    protocol.main([*common, "--stage", "ablations"])  # before their parent's grid: nothing to run at yet
    assert not (tmp_path / "runs").exists()
    protocol.main([*common, "--methods", *keys])
    quick = protocol.Protocol.quick_protocol()

    runs = protocol.load_runs(tmp_path, quick)
    assert sorted((r["key"], r["row"]["lr"]) for r in runs) == sorted(
        (k, lr) for k in keys for lr in protocol.grid_of(quick, k)
    )
    for run in runs:
        row = run["row"]
        assert row["measured_vs_predicted_max_rel_error"] < 1e-6, run["key"]  # every method's FLOPs accounted
        assert set(row["heldout_loss"]) == {"val", "test"} and all(map(math.isfinite, row["heldout_loss"].values()))
        curve = row["curve"]
        assert curve[0]["step"] == 0 and curve[-1]["step"] == row["steps"]
        assert all(a["flops"] <= b["flops"] and a["seconds"] <= b["seconds"] for a, b in itertools.pairwise(curve))
        assert curve[-1]["flops"] == pytest.approx(row["predicted_total_flops"] + row["selection_flops"])
    by_key = {r["key"]: r["row"] for r in runs}
    full = by_key["full"]["measured_flops_per_step"]
    assert by_key["gt_tensors_0.5"]["measured_flops_per_step"] <= 0.5 * full * (1 + 1e-6)
    assert by_key["gt_tensors_0.5"]["selection_flops"] > 0  # the importance probe is charged, not hidden
    assert by_key["lisa"]["selections"] and by_key["badam"]["measured_flops_per_step"] < full
    mixed = by_key["gt_mixed_0.5"]  # base tensors and LoRA adapters under one budget
    assert mixed["measured_flops_per_step"] <= 0.5 * full * (1 + 1e-6) and mixed["selection_flops"] > 0
    assert all(len(chosen) for chosen in mixed["selections"])

    markdown = (tmp_path / "protocol.md").read_text()
    assert (tmp_path / "protocol.png").stat().st_size > 0
    for run in runs:
        assert f"| {run['row']['method']} |" in markdown
    chosen = report.chosen_lr(runs, "full", protocol.grid_of(quick, "full"), quick.grid_extensions)
    assert f"**{chosen:g}: " in markdown

    # resuming does not redo finished runs; the seeds stage adds seeds 1 and 2 at the chosen lr only
    finished = _written(tmp_path)
    protocol.main([*common, "--methods", *keys])
    assert _written(tmp_path) == finished
    protocol.main([*common, "--stage", "seeds", "--methods", "full", "--seeds", "2"])  # one seed, as a side chain runs
    assert sorted(r["seed"] for r in protocol.load_runs(tmp_path, quick) if r["key"] == "full") == [0, 0, 2]
    protocol.main([*common, "--stage", "seeds", "--methods", "full", "gt_tensors_0.5"])
    protocol.main([*common, "--stage", "base"])
    runs = protocol.load_runs(tmp_path, quick)
    seeds = sorted(r["seed"] for r in runs if r["key"] == "full" and r["row"]["lr"] == chosen)
    assert seeds == [0, 1, 2]
    markdown = (tmp_path / "protocol.md").read_text()
    equal_steps = markdown.split("## Equal steps", 1)[1]
    full_row = next(line for line in equal_steps.splitlines() if line.startswith("| full fine-tuning |"))
    assert " | 3 | " in full_row and " ± " in full_row and "100" in full_row
    assert all(cell in {"tie", "lower", "higher"} for cell in full_row.rstrip(" |").split(" | ")[-2:])
    assert "| base model (no training) |" in markdown

    # ablations: at their parent's chosen lr, reported against it, absent from the grid table; seed 0 of each, and
    # seeds 1-2 of one (each ablation's seeds run as one's do: 15 ablations x 3 seeds were 2/3 of this test's time)
    protocol.main([*common, "--stage", "ablations", "--seeds", "0"])
    three_seeds = "gt_tensors_0.5_probe1"
    protocol.main([*common, "--stage", "ablations", "--methods", three_seeds, "--seeds", "1", "2"])
    runs = protocol.load_runs(tmp_path, quick)

    def seed0_at_chosen_lr(key: str) -> dict:
        parent = protocol.parent_of(key) or key
        lr = report.chosen_lr(runs, parent, protocol.grid_of(quick, parent), 0)
        return next(r["row"] for r in runs if r["key"] == key and r["seed"] == 0 and r["row"]["lr"] == lr)

    for key in protocol.ABLATIONS:  # the seeds asked for, at their parent's chosen lr, nothing else
        lr = seed0_at_chosen_lr(key)["lr"]
        seeds = (0, 1, 2) if key == three_seeds else (0,)
        assert sorted((r["row"]["lr"], r["seed"]) for r in runs if r["key"] == key) == [(lr, s) for s in seeds]
    gt_keys = ["gt_tensors_0.5", "gt_tensors_0.5_probe1", "gt_tensors_0.5_resel8", "gt_tensors_0.5_shipped_head"]
    default, probe1, resel8, shipped, lora_shipped = map(seed0_at_chosen_lr, [*gt_keys, "gt_lora_0.5_shipped_head"])
    assert len(probe1["selections"]) == len(default["selections"])  # once per epoch, a smaller probe
    assert probe1["selection_flops"] < default["selection_flops"]
    assert len(resel8["selections"]) == 8 and resel8["measured_flops_per_step"] <= 0.5 * full * (1 + 1e-6)
    random_rows = list(map(seed0_at_chosen_lr, ["random_tensors_shipped_head", "random_lora_shipped_head"]))
    top_k_rows = list(map(seed0_at_chosen_lr, ["top_k_tensors_shipped_head", "top_k_lora_shipped_head"]))
    fresh = seed0_at_chosen_lr("gt_tensors_0.5_shipped_head_fresh")
    assert fresh["lr"] == shipped["lr"] and "fresh optimizer state" in fresh["method"]
    # the sparse head's FLOPs vary with each batch's labels: no step above half of dense full FT's
    for row in (shipped, lora_shipped, fresh, *random_rows, *top_k_rows):
        counted = [s["flops"] for s in row["step_measurements"] if s["flops"] is not None]
        assert counted and max(counted) <= 0.5 * full * (1 + 1e-6), row["method"]
    # chance importances through GreenTrainer's selection, at the shipped rows' learning rates: no backprop to pay
    for row, gt_row in zip(random_rows, (shipped, lora_shipped), strict=True):
        assert row["selections"] and all(row["selections"]), row["method"]
        assert row["lr"] == gt_row["lr"] and row["selection_flops"] < gt_row["selection_flops"]
    # a baseline with the sparse head trains the same course (the head is exact) for fewer FLOPs
    for parent in ("full", "lora", "lisa", "badam"):
        dense, sparse = seed0_at_chosen_lr(parent), seed0_at_chosen_lr(f"{parent}_sparse_head")
        if SPARSE_HEAD_UNAVAILABLE is None:  # (an older transformers keeps the head dense: the same FLOPs)
            assert sparse["measured_flops_per_step"] < dense["measured_flops_per_step"], parent
        assert sparse["measured_vs_predicted_max_rel_error"] < 0.02, parent
        assert sparse["heldout_loss"]["test"] == pytest.approx(dense["heldout_loss"]["test"], rel=1e-3), parent
    markdown = (tmp_path / "protocol.md").read_text()
    grid_part, equal_steps = markdown.split("## Equal steps", 1)
    assert resel8["method"] in equal_steps and resel8["method"] not in grid_part
    left = re.search(r"--stage ablations --methods ([^`]*)`", markdown.split("## What is left", 1)[1]).group(1)
    assert sorted(left.split()) == sorted(k for k in protocol.ABLATIONS if k != three_seeds)  # their seeds 1-2


def test_results_of_another_protocol_are_not_mixed_in(tmp_path):
    quick = protocol.Protocol.quick_protocol()
    path = protocol.run_path(tmp_path, "full", 1e-3, 0)
    protocol.write_json(path, {"key": "full", "seed": 0, "protocol": {**json.loads(json.dumps(vars(quick)))}})
    assert len(protocol.load_runs(tmp_path, quick)) == 1
    other = protocol.Protocol.quick_protocol()
    other.epochs = 5
    assert protocol.load_runs(tmp_path, other) == []


def test_ablations_run_only_in_their_stage(tmp_path, capsys):
    with pytest.raises(SystemExit):
        protocol.main(["--quick", "--methods", protocol.ABLATIONS[0], "--output-dir", str(tmp_path)])
    assert "run with --stage ablations" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_grid_values_outside_the_grid_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        protocol.main(["--quick", "--methods", "full", "--lrs", "0.5", "--output-dir", str(tmp_path)])
    assert "--lrs [0.5] are not in full's grid" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "key",
    [
        "random",
        "gt_tensors_0.5",
        "gt_lora_0.5",
        "gt_tensors_0.5_shipped_head",
        "random_lora_shipped_head",
        "top_k_lora_shipped_head",
    ],
)
def test_every_counted_step_costs_what_is_predicted_when_rows_have_different_label_counts(key):
    # real prompts mask different numbers of labels per row; a method whose profile did not price the steps pays a
    # second profile inside step 0, counted in that step's FLOPs (the random baseline did, before the tuner's fix)
    work = _tiny_work()
    work.train_columns["labels"][::2, -1] = -100
    settings = runner.TrainSettings(
        epochs=1, batch_size=4, seed=0, measure_every=1, max_new_tokens=2, max_source_tokens=8, max_steps=2
    )
    method = methods.build(key, work, methods.MethodOptions(seed=0, total_steps=2))
    row = runner.train(method, work, settings, 1e-3)
    assert [s["step"] for s in row["step_measurements"] if s["flops"] is not None] == [0, 1]
    assert row["measured_vs_predicted_max_rel_error"] < (0.02 if key.endswith("shipped_head") else 1e-6)


@needs_sparse_head
def test_shipped_head_budget_is_at_most_rho_of_dense_full_finetuning_on_every_batch():
    work = _tiny_work()
    built = work.new_model
    work.new_model = lambda: built().eval()  # as from_pretrained returns it
    ratio = methods.dense_over_sparse_full_flops(work)
    assert ratio > 1  # the sparse head projects only the labelled positions
    model = work.new_model().train()
    dense = profile_model(model, work.example).full_flops
    enable_sparse_lm_head(model)
    for start in range(0, work.train_size, work.batch_size):
        batch = {k: v[start : start + work.batch_size] for k, v in work.train_columns.items()}
        assert profile_model(model, batch).full_flops * ratio <= dense * (1 + 1e-9)


def test_selection_churn_reads_the_selections_runs_store(tmp_path, capsys):
    for key, seed, selections in [
        ("kept", 0, [["a", "b"], ["a", "b"]]),
        ("swapped", 0, [["a", "b"], ["c", "d"], ["c", "e"]]),
        ("once", 0, [["a"]]),  # one selection: nothing to compare
    ]:
        row = {"lr": 1e-3, "selections": selections, "heldout_loss": {"test": 2.5}}
        protocol.write_json(tmp_path / key / "lr0.001-seed0.json", {"key": key, "seed": seed, "row": row})
    rows = {r["key"]: r for r in selection_churn.rows(tmp_path)}
    assert set(rows) == {"kept", "swapped"}
    assert rows["kept"]["mean_jaccard"] == 1.0 and rows["kept"]["distinct_units"] == 2
    assert rows["swapped"]["mean_jaccard"] == pytest.approx((0 + 1 / 3) / 2) and rows["swapped"]["distinct_units"] == 5
    selection_churn.main(["--runs", str(tmp_path), "--methods", "swapped"])
    assert "| swapped | 0.001 | 0 | 3 | 0.17 | 5 | 2.5000 |" in capsys.readouterr().out


def test_the_fresh_state_ablation_scores_units_as_an_optimizer_without_moments_would():
    work = _tiny_work()
    method = methods.build("gt_tensors_0.5_shipped_head_fresh", work, methods.MethodOptions(seed=0, total_steps=2))
    tuner = method.model.base_model
    model = tuner.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    batch = {k: v[: work.batch_size] for k, v in work.train_columns.items()}
    for _ in range(3):  # moments that differ from a first step's
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {id(p): s["exp_avg"].clone() for p, s in optimizer.state.items()}
    units = tuner.candidate_units()
    feasible = np.ones(len(units), dtype=bool)
    kwargs = {"loss_fn": default_loss, "max_grad_norm": None}
    fresh = tuner._importance([batch], units, feasible, optimizer, None, **kwargs)  # the ablation's
    unstated = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    expected = type(tuner)._importance(tuner, [batch], units, feasible, unstated, None, **kwargs)
    current = type(tuner)._importance(tuner, [batch], units, feasible, optimizer, None, **kwargs)
    np.testing.assert_allclose(fresh, expected, rtol=1e-6)
    assert not np.allclose(fresh, current, rtol=1e-2)
    assert all(torch.equal(s["exp_avg"], state[id(p)]) for p, s in optimizer.state.items())  # read, not stepped


def test_the_gradient_step_ablation_scores_units_by_their_squared_gradient_norm_times_the_base_lr():
    work = _tiny_work()
    method = methods.build("gt_tensors_0.5_shipped_head_sgd", work, methods.MethodOptions(seed=0, total_steps=2))
    assert "plain gradient step" in method.name
    tuner = method.model.base_model
    model = tuner.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)  # warmup: the current lr is 0, the base 1e-3
    batch = {k: v[: work.batch_size] for k, v in work.train_columns.items()}
    units = tuner.candidate_units()
    feasible = np.ones(len(units), dtype=bool)
    scored = tuner._importance([batch], units, feasible, optimizer, None, loss_fn=default_loss, max_grad_norm=None)
    grads = torch.autograd.grad(model(**batch).loss, params)
    squared = {id(p): float((g.double() ** 2).sum()) for p, g in zip(params, grads, strict=True)}
    expected = [1e-3 * sum(squared[id(p)] for p in dict.fromkeys(u.parameters(model))) for u in units]
    np.testing.assert_allclose(scored, expected, rtol=1e-4)
    assert not optimizer.state  # read, not stepped
