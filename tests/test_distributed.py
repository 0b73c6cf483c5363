"""Multi-process training: DDP through torchrun (CPU, gloo, 2 processes) with transformers.Trainer.

Each run is ``tests/distributed_scripts/train.py`` in subprocesses; every rank saves its final parameters and the
selection history, and the tests compare the ranks with each other and with a single process trained on the same
global batches (per-device batch 2 x 2 ranks vs batch 4, sequential sampler, drop_last).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, rank_reports, tiny_batch, tiny_model
from peft import get_peft_model
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader

from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig
from peft_greentrainer.distributed import (
    candidate_parameters,
    check_backend,
    gradients_averaged_across_ranks,
    importance_shard,
    prepare_ddp,
    rank_and_world_size,
    trained_gradients_state,
    wrap_ddp,
)
from peft_greentrainer.sampling import importance_batches

SCRIPT = Path(__file__).parent / "distributed_scripts" / "train.py"
PLAIN_LOOP = Path(__file__).parent / "distributed_scripts" / "plain_loop.py"
ACCUMULATION = Path(__file__).parent / "distributed_scripts" / "accumulation_reselect.py"
WEIGHTING = Path(__file__).parent / "distributed_scripts" / "importance_weighting.py"
WINDOW = Path(__file__).parent / "distributed_scripts" / "accumulation_window.py"
COMM_HOOK = Path(__file__).parent / "distributed_scripts" / "comm_hook_windows.py"
PER_DEVICE, WORLD = 2, 2


# ---------------------------------------------------------------------------------------------------------- helpers
def _launch(
    out: Path, *args: str, nproc: int = WORLD, check: bool = True, script: Path = SCRIPT
) -> subprocess.CompletedProcess:
    """``script`` under torchrun with ``nproc`` processes, or as a plain process when ``nproc`` is 1."""
    out.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [*launcher, str(script), "--out", str(out), *args], env=env, capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def _ranks(out: Path, world: int = WORLD) -> list[dict]:
    runs = [torch.load(out / f"rank{rank}.pt") for rank in range(world)]
    assert all(run.get("world_size", world) == world for run in runs)
    return runs


def _differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


def _candidates(units: str) -> set[str]:
    """Parameter names of every candidate unit, as the script names them."""
    extra = {"target_modules": ["q_proj", "v_proj", "up_proj"], "r": 4} if units == "lora" else {}
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(units=units, **extra))
    names = {id(p): n for n, p in model.named_parameters()}
    tuner = model.base_model
    return {names[id(p)] for unit in tuner.candidate_units() for p in unit.parameters(tuner.model)}


def _became_trainable(info: dict) -> set[str]:
    """Tensors that were frozen by one selection (or at the start) and trainable after a later one."""
    sets = [set(trainable) for _, trainable in info["trainable_after_selection"]]
    return {name for before, after in itertools.pairwise(sets) for name in after - before}


# --------------------------------------------------------------------------- 1. DDP equals one process, bitwise ranks
@pytest.mark.slow
@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_ddp_matches_a_single_process_on_the_same_global_batches(units, tmp_path):
    _launch(tmp_path / "ddp", "--units", units, "--batch-size", str(PER_DEVICE))
    _launch(tmp_path / "single", "--units", units, "--batch-size", str(PER_DEVICE * WORLD), nproc=1)
    rank0, rank1 = _ranks(tmp_path / "ddp")
    (single,) = _ranks(tmp_path / "single", world=1)

    # the same selections (units, step, FLOPs ratio) on every rank, and the ones a single process makes
    assert len(rank0["history"]) == 2  # one per epoch
    assert rank0["history"] == rank1["history"]
    assert [(s, u) for s, u, _ in rank0["history"]] == [(s, u) for s, u, _ in single["history"]]
    for (_, _, ratio), (_, _, expected) in zip(rank0["history"], single["history"], strict=True):
        assert ratio == pytest.approx(expected, rel=1e-12)

    # DDP was set up to follow the selections: every candidate registered, frozen units tolerated
    info = rank0["info"]
    assert info["ddp_found"] and info["find_unused_parameters"] and not info["static_graph"]
    assert _candidates(units) <= set(info["registered"])

    # bitwise identical on both ranks, and the single-process result up to float reassociation
    assert not _differing(rank0["state"], rank1["state"])
    for name, value in single["state"].items():
        torch.testing.assert_close(rank0["state"][name], value, atol=1e-5, rtol=0, msg=name)
    assert rank0["losses"] == pytest.approx(single["losses"], abs=1e-5)
    if units == "tensors":  # the second selection trains tensors the first one froze: they are reduced too
        assert _became_trainable(info)

    # each step all-reduced the gradients it trained, no more: not the frozen units' zeros in DDP's buckets
    numel = {name: p.numel() for name, p in single["state"].items()}
    selections = info["trainable_after_selection"]
    steps = len(rank0["losses"])
    trained_per_step = [
        sum(numel[name] for name in next(names for start, names in reversed(selections) if start <= step))
        for step in range(steps)
    ]
    assert info["elements_sent"] == sum(trained_per_step)
    assert info["elements_in_buckets"] == steps * sum(numel[name] for name in info["registered"])
    assert info["elements_sent"] < 0.8 * info["elements_in_buckets"]


@pytest.mark.slow
@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_ddp_with_dynamic_padding_and_an_uneven_last_batch(units, tmp_path):
    """Pad-to-longest batches give each rank its own shapes at each step (and warmup makes lr 0 at step 0): the ranks
    agree on the shapes the costs are computed at, select the same units, stay bitwise identical, and every step of
    every rank costs at most rho x full fine-tuning at its own shape, measured by FlopCounterMode."""
    rho = 0.6
    options = ["--units", units, "--dynamic-padding", "--samples", "13", "--batch-size", "2", "--epochs", "3"]
    _launch(tmp_path / "ddp", *options, "--rho", str(rho), "--lr", {"tensors": "1e-2", "lora": "5e-2"}[units])
    rank0, rank1 = _ranks(tmp_path / "ddp")
    assert rank0["history"] == rank1["history"] and rank0["reasons"] == rank1["reasons"]
    assert not _differing(rank0["state"], rank1["state"])
    # 13 samples: 4 steps of 2 per rank and epoch (accelerate completes the uneven last global batch with repeated
    # samples, so each rank pads its own rows to their own longest)
    assert len(rank0["shapes"]) == len(rank1["shapes"]) == 12
    assert any(a != b for a, b in zip(rank0["shapes"], rank1["shapes"], strict=True))  # ranks' shapes differ
    losses = rank0["losses"]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    for run in (rank0, rank1):
        assert len({shape for shape, _ in run["audit"]}) >= 4
        assert max(ratio for _, ratio in run["audit"]) <= rho * (1 + 1e-9), run["audit"]


# ----------------------------------------------------------------- 2. a unit frozen when DDP wrapped the model, later
@pytest.mark.slow
def test_unit_frozen_when_ddp_wrapped_the_model_is_reduced_once_selected(tmp_path):
    """Only one unit is trainable when the Trainer wraps the model, and the user asked for find_unused_parameters
    False and a static graph: the callback rebuilds DDP's reducer, so the units selected later stay in sync."""
    units = "tensors"
    _launch(
        tmp_path / "run",
        "--freeze-before-train",
        "--find-unused",
        "false",
        "--static-graph",
        "--interval-steps",
        "3",
    )
    rank0, rank1 = _ranks(tmp_path / "run")
    info = rank0["info"]
    assert len(rank0["history"]) == 3 and rank0["history"] == rank1["history"]
    assert info["find_unused_parameters"] and not info["static_graph"]
    assert _candidates(units) <= set(info["registered"])

    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(units=units))
    initial = {name: p.detach() for name, p in model.named_parameters()}
    at_wrap = {f"base_model.model.{name}" for name in model.base_model.candidate_units()[0].param_names}
    selected_later = {name for _, trainable in info["trainable_after_selection"] for name in trainable} - at_wrap
    assert selected_later  # units frozen when DDP wrapped the model were selected later ...
    assert selected_later <= set(_differing(initial, rank0["state"]))  # ... and trained ...
    assert not _differing(rank0["state"], rank1["state"])  # ... with all-reduced gradients


@pytest.mark.slow
def test_without_the_reducer_rebuild_the_ranks_drift_apart(tmp_path):
    """Negative control for the test above: DDP never reduces a unit that was frozen when it wrapped the model."""
    _launch(tmp_path / "run", "--freeze-before-train", "--skip-prepare-ddp")
    rank0, rank1 = _ranks(tmp_path / "run")
    assert rank0["history"] == rank1["history"]  # the selections still agree (importance is averaged) ...
    assert len(rank0["info"]["registered"]) < len(_candidates("tensors"))
    assert _differing(rank0["state"], rank1["state"])  # ... but the unreduced units' weights differ


@pytest.mark.slow
def test_plain_loop_with_wrap_ddp(tmp_path):
    """Without the Trainer: select, wrap_ddp with units frozen, train, select again; the ranks stay identical."""
    _launch(tmp_path / "run", script=PLAIN_LOOP)
    rank0, rank1 = _ranks(tmp_path / "run")
    assert [step for step, _ in rank0["history"]] == [0, 3] and rank0["history"] == rank1["history"]
    assert not _differing(rank0["state"], rank1["state"])
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(units="tensors"))
    initial = {name: p.detach() for name, p in model.named_parameters()}
    trained = set(_differing(initial, rank0["state"]))
    at_wrap = {f"base_model.model.{name}" for name in model.base_model.candidate_units()[0].param_names}
    assert trained - at_wrap  # units frozen when DDP wrapped the model were trained, identically on both ranks


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_a_new_shape_within_an_accumulation_window_reselects_under_ddp(tmp_path, units):
    """A selection made again inside the window's last micro-batch: the units it freezes keep the gradients the
    window already computed (before: DDP raised "gradient which is undefined, but still allreduced"); the step
    applies them, identically on both ranks."""
    _launch(tmp_path / "run", "--units", units, script=ACCUMULATION)
    rank0, rank1 = _ranks(tmp_path / "run")
    assert rank0["reasons"] == ["importance", "batch shape"] == rank1["reasons"]
    assert rank0["frozen"] and rank0["with_gradient"] == rank0["frozen"] == rank0["moved"]
    assert not _differing(rank0["state"], rank1["state"])


@pytest.mark.parametrize(
    ("wrap", "units", "window", "zero_in_place"),
    [
        ("ddp", "tensors", "inside", False),
        ("ddp", "tensors", "start", True),
        ("fsdp2", "lora", "inside", False),
        ("fsdp2", "tensors", "start", False),
    ],
)
def test_a_new_shape_inside_a_window_keeps_to_the_units_selected_so_far_under_ddp_and_fsdp2(
    tmp_path, wrap, units, window, zero_in_place
):
    """Inside a window a unit added would train on its later micro-batches only; at a window's start any unit may
    be chosen, gradients zeroed in place or not. FSDP2 accumulates in unsharded copies, so ``.grad`` cannot tell."""
    flags = ["--wrap", wrap, "--units", units, "--window", window, *(["--zero-in-place"] * zero_in_place)]
    _launch(tmp_path, *flags, script=WINDOW)
    rank0, rank1 = _ranks(tmp_path)
    assert rank0["reasons"][-1] == "batch shape" and rank0["after"] == rank1["after"]
    before, after = set(rank0["before"]), set(rank0["after"])
    assert after and (after <= before) == (window == "inside")


@pytest.mark.parametrize("case", ["module", "eval"])
def test_the_trained_gradients_hook_keeps_the_ranks_together_whatever_runs_the_forwards(tmp_path, case):
    """The hook sends what trained since the last reduction, read from the forwards it records: micro-batches through
    ``ddp.module`` must be recorded (a unit they trained, dropped inside the window, made the ranks differ), and a
    forward without gradients on one rank must not be (the ranks sent slices of different sizes: gloo aborted)."""
    _launch(tmp_path, "--case", case, script=COMM_HOOK)
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD))
    assert not _differing(rank0["state"], rank1["state"])
    if case == "module":
        assert rank0["dropped"]  # a unit holding the window's gradients was dropped inside it


@pytest.mark.parametrize("arch", ["llama", "t5"])  # next-token targets; every label (an encoder-decoder)
def test_importance_is_that_of_the_global_batch_when_ranks_hold_different_token_counts(tmp_path, arch):
    """The Trainer trains the global batch's mean over its targets (average_tokens_across_devices); averaging the
    ranks' own means would weight rank 0's few targets as much as rank 1's many."""
    _launch(tmp_path / "ddp", "--arch", arch, script=WEIGHTING)
    _launch(tmp_path / "single", "--arch", arch, script=WEIGHTING, nproc=1)
    ddp, single = (torch.load(tmp_path / run / "rank0.pt") for run in ("ddp", "single"))
    assert ddp["weighted"] == pytest.approx(single["weighted"], rel=1e-4, abs=1e-9)
    assert single["unweighted"] == pytest.approx(single["weighted"], rel=1e-6, abs=1e-12)  # the identity in one process
    assert ddp["unweighted"] != pytest.approx(single["weighted"], rel=1e-2)


@pytest.mark.slow
def test_distributed_example_runs_under_torchrun(tmp_path):
    """The README command, on CPU: ``torchrun --nproc_per_node=2 examples/distributed.py``."""
    example = Path(__file__).resolve().parents[1] / "examples" / "distributed.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    result = subprocess.run(
        [*command, str(example), "--max-steps", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    selections = rank_reports(result.stdout)
    assert sorted(selections) == ["0", "1"], result.stdout[-4000:]
    assert selections["0"] == selections["1"]  # the same selection on both ranks
    assert (tmp_path / "greentrainer-example" / "adapter-distributed" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------- 3. FSDP and DeepSpeed are refused
@pytest.mark.slow
def test_fsdp1_is_refused_when_the_trainer_is_created(tmp_path):
    """FSDP1 (FSDP2 is supported: tests/test_fsdp.py)."""
    result = _launch(tmp_path / "run", "--fsdp", "full_shard", "--fsdp-version", "1", check=False)
    assert result.returncode != 0
    assert "GreenTrainer does not support FSDP" in result.stderr
    assert "DistributedDataParallel" in result.stderr and "remove `fsdp=...`" in result.stderr
    assert "on_init_end" in result.stderr  # at Trainer(...), before any data or training
    assert "FSDP2" in result.stderr  # names what works


@pytest.mark.parametrize(
    "args, env",
    [
        (SimpleNamespace(deepspeed="ds_config.json", fsdp=""), {}),
        (SimpleNamespace(deepspeed=None, fsdp=""), {"ACCELERATE_USE_DEEPSPEED": "true"}),
        (SimpleNamespace(deepspeed=None, fsdp=["full_shard"], fsdp_config={"version": 1}), {}),
        (SimpleNamespace(deepspeed=None, fsdp=""), {"ACCELERATE_USE_FSDP": "1"}),
    ],
)
def test_deepspeed_and_fsdp_configurations_are_refused(args, env, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    backend = "DeepSpeed" if args.deepspeed or "DEEPSPEED" in "".join(env) else "FSDP"
    with pytest.raises(NotImplementedError, match=rf"does not support {backend}.*DistributedDataParallel"):
        check_backend(args)
    with pytest.raises(NotImplementedError, match=backend):
        GreenTrainerCallback().on_init_end(args, None, None)
    with pytest.raises(NotImplementedError, match="FSDP2"):  # the error names the sharded setup that works
        check_backend(args)


def test_plain_configuration_is_accepted():
    check_backend(SimpleNamespace(deepspeed=None, fsdp=""))


# ------------------------------------------------------------------------- 4. importance batches, shared out by rank
def test_ranks_share_out_the_importance_batches_of_a_single_process():
    data = [{"x": torch.tensor([i])} for i in range(20)]

    def collate(rows):
        return {"x": torch.cat([r["x"] for r in rows])}

    def drawn(loader, rank=0, world_size=1):
        return [b["x"].tolist() for b in importance_batches(loader, count=3, seed=7, rank=rank, world_size=world_size)]

    single = drawn(DataLoader(data, batch_size=4, collate_fn=collate))
    sharded = DataLoader(data, batch_size=2, collate_fn=collate)
    sharded.total_batch_size = 4  # what accelerate's data-parallel loader reports on 2 ranks
    parts = [drawn(sharded, rank, 2) for rank in range(2)]
    assert len(single) == 3 and all(len(b) == 4 for b in single)
    assert [a + b for a, b in zip(*parts, strict=True)] == single

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    stream = DataLoader(Stream(), batch_size=2, collate_fn=collate)
    stream.total_batch_size = 4
    parts = [drawn(stream, rank, 2)[:3] for rank in range(2)]
    assert [a + b for a, b in zip(*parts, strict=True)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert importance_shard(8, 1, 2) == slice(4, 8)
    assert [len(range(10)[importance_shard(10, r, 3)]) for r in range(3)] == [3, 3, 4]
    with pytest.raises(ValueError, match="cannot be shared out to 2 processes"):
        list(importance_batches(DataLoader(data[:1], batch_size=1, collate_fn=collate), 3, 0, rank=0, world_size=2))


def test_gradient_averaging_is_a_no_op_in_one_process():
    assert rank_and_world_size() == (0, 1)
    param = torch.nn.Parameter(torch.ones(3))
    with gradients_averaged_across_ranks([param]):
        (grad,) = torch.autograd.grad((2 * param).sum(), [param])
    assert torch.equal(grad, torch.full((3,), 2.0))


# ------------------------------------------------------------------ 5. the communication hook, in one process
@pytest.fixture
def one_process_group():
    """A gloo process group of one rank in this process, destroyed afterwards (other tests run undistributed)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_sends_the_trained_gradients_only_and_keeps_a_hook_of_the_users(one_process_group):
    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.5))
    tuner = model.base_model
    batch = tiny_batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tuner.select_units([batch], optimizer)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    expected = torch.autograd.grad(model(**batch).loss, list(trained.values()))

    ddp = wrap_ddp(model)
    ddp(**batch).loss.backward()
    state = trained_gradients_state(ddp)
    everything = sum(p.numel() for p in candidate_parameters(tuner))
    assert state.elements_sent == sum(p.numel() for p in trained.values()) < 0.8 * everything
    assert state.elements_in_buckets == everything
    for (name, param), grad in zip(trained.items(), expected, strict=True):
        torch.testing.assert_close(param.grad, grad, msg=name)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    # a hook of the user's (accelerate registers one from DistributedDataParallelKwargs(comm_hook=...)) is kept
    users = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.5))
    ddp = torch.nn.parallel.DistributedDataParallel(users, find_unused_parameters=True)
    ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    prepare_ddp(ddp, candidate_parameters(users.base_model))
    assert trained_gradients_state(ddp) is None
    assert [hook for hook, _ in ddp._comm_hooks] == [default_hooks.allreduce_hook]
    ddp = wrap_ddp(get_peft_model(tiny_model("llama"), GreenTrainerConfig()), trained_gradients_only=False)
    assert trained_gradients_state(ddp) is None and not ddp._comm_hooks


@pytest.mark.parametrize(
    ("backend", "device"), [("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("nccl", "cuda"), ("cuda:nccl", "cuda")]
)
def test_collectives_take_their_tensors_where_the_backend_can_send_them(monkeypatch, backend, device):
    """NCCL sends GPU tensors only, whether it is named "nccl" or "cuda:nccl"; a group with gloo sends CPU ones."""
    from peft_greentrainer.ranks import collective_device

    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collective_device().type == device


ACCELERATE_LOOP = Path(__file__).parent / "distributed_scripts" / "accelerate_loop.py"


@pytest.mark.slow
def test_an_accelerate_loop_with_its_defaults_keeps_the_ranks_identical(tmp_path):
    """``Accelerator()`` builds DDP without ``find_unused_parameters``, with the units trainable at ``prepare``:
    ``select_units`` makes the wrapper follow the selections (before, the third micro-step failed "Expected to have
    finished reduction in the prior iteration")."""
    _launch(tmp_path / "run", "--order", "after", script=ACCELERATE_LOOP)
    rank0, rank1 = _ranks(tmp_path / "run")
    assert rank0["error"] is None and rank1["error"] is None
    assert len(rank0["history"]) >= 2 and rank0["history"] == rank1["history"]
    assert rank0["trained_only"]  # the hook that all-reduces only the trained gradients
    assert not _differing(rank0["state"], rank1["state"])


@pytest.mark.slow
@pytest.mark.parametrize("order", ["before", "before-init"])
def test_selecting_before_accelerate_wraps_the_model_is_refused_at_the_first_step(tmp_path, order):
    """A unit frozen when DDP is built is never registered with it: selected later, its gradient would not be reduced
    and the ranks' weights drift apart (0.11 after 3 epochs in a reviewer's run). The first step says what to do,
    also after a selection made before the process group existed."""
    _launch(tmp_path / "run", "--order", order, script=ACCELERATE_LOOP)
    for rank in _ranks(tmp_path / "run"):
        assert rank["error"] is not None and "after accelerator.prepare" in rank["error"]
