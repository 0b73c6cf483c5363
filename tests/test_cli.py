"""`greentrainer train` and `greentrainer profile` end to end on tiny local checkpoints and config files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import (
    SPARSE_HEAD_UNAVAILABLE,
    VOCAB,
    needs_opt_on_meta,
    needs_sparse_head,
    tiny_config,
    tiny_model,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel

import peft_greentrainer  # noqa: F401  (registers the method for PeftModel.from_pretrained)
from benchmarks.families import full_fine_tuning_flops
from peft_greentrainer.cli.data import Example
from peft_greentrainer.cli.evaluation import generate, rouge
from peft_greentrainer.cli.main import build_parser, main
from peft_greentrainer.cli.planning import build_on_meta
from peft_greentrainer.cli.train import _apply_defaults
from peft_greentrainer.engine.profile import dummy_batch, profile_model

TRAIN_ARGS = [
    "--input-field",
    "document",
    "--target-field",
    "summary",
    "--epochs",
    "2",
    "--max-source-tokens",
    "24",
    "--max-target-tokens",
    "6",
    "--eval-examples",
    "4",
    "--lr",
    "1e-2",
    "--measure-every",
    "2",
    "--quiet",
]


@pytest.mark.slow
@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_train_writes_a_loadable_adapter_and_report(tiny_checkpoint, tmp_path, units):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(tiny_checkpoint),
            "--dataset",
            str(tiny_checkpoint / "data.jsonl"),
            "--units",
            units,
            "--rho",
            "0.5" if units == "tensors" else "0.7",  # LoRA's extra forward raises this tiny model's floor
            "--output-dir",
            str(out),
            *TRAIN_ARGS,
            *(["--importance-update", "gradient"] if units == "tensors" else ["--dense-lm-head", "--no-energy"]),
        ]
    )
    assert code == 0
    saved = "adapter_config.json" if units == "tensors" else "greentrainer_config.json"
    expected_update = "gradient" if units == "tensors" else "optimizer"
    assert json.loads((out / saved).read_text())["importance_update"] == expected_update
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "report.md",
        "metrics.json",
        "selections.png",
        "flops.png",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["units"] == units and metrics["steps"] == 16
    assert metrics["measured_flops_ratio"] <= metrics["rho"] + 1e-9  # the budget held on real, counted steps
    assert metrics["predicted_flops_ratio"] == pytest.approx(metrics["measured_flops_ratio"], rel=0.1)
    assert "![FLOPs per step](flops.png)" in (out / "report.md").read_text()
    assert not list(tmp_path.glob(".tmp-*"))
    _assert_head_and_energy(metrics, (out / "report.md").read_text(), out, sparse_and_energy=units == "tensors")

    # the saved adapter reproduces the trained model: same greedy outputs on the held-out examples
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    model = PeftModel.from_pretrained(base, out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    examples = [Example(e["source"], e["reference"]) for e in metrics["examples_after"]]
    predictions = generate(
        model,
        tokenizer,
        examples,
        metrics["template"],
        max_source_tokens=metrics["max_source_tokens"],
        max_new_tokens=metrics["max_target_tokens"],
        progress=False,
    )
    assert predictions == [e["prediction"] for e in metrics["examples_after"]]


@pytest.mark.parametrize("units", ["tensors", "lora"])
def test_the_meter_measures_each_counted_step_alone_against_full_fine_tuning_on_its_own_inputs(units, tmp_path):
    """A step at a new batch shape runs that shape's one-row profile inside it: counted whole (``flops``), but its
    ratio is the step alone over full fine-tuning on its own inputs, the figure rho bounds (the report once divided
    every counted step, profile included, by full fine-tuning of the first batch: 1.04 "measured" at rho 0.5)."""
    from peft import get_peft_model

    from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig
    from peft_greentrainer.cli.meter import StepMeter
    from peft_greentrainer.cli.train import training_arguments

    base = tiny_model("llama")
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"]} if units == "lora" else {}
    model = get_peft_model(base, GreenTrainerConfig(rho=0.7, units=units, **lora))
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (length,), generator=generator) for length in (8, 8, 16, 16, 12, 12, 16, 16)]

    def pad(ids: list[torch.Tensor]) -> dict:  # each batch to its own longest row: new shapes after the first selection
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
        return {"input_ids": input_ids, "labels": input_ids.masked_fill(input_ids == 0, -100)}

    recorded: list[dict] = []

    class Recorded(transformers.Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            recorded.append({k: v.clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    meter = StepMeter(every=1, audit_steps=True)
    trainer = Recorded(
        model=model,
        args=training_arguments(str(tmp_path), epochs=1, batch_size=2, lr=1e-3, seed=0, quiet=True, device="cpu"),
        train_dataset=rows,
        data_collator=pad,
        callbacks=[GreenTrainerCallback(), meter],
    )
    trainer.train()
    meter.audit()
    steps = meter.to_list()
    assert len(steps) == len(recorded) == 4 and all(s["flops_ratio"] is not None for s in steps)
    assert any(s["flops"] > s["alone_flops"] * 1.01 for s in steps)  # a profile ran inside a counted step
    for step, batch in zip(steps, recorded, strict=True):
        assert step["alone_flops"] <= step["flops"]
        assert step["flops_ratio"] <= 0.7 + 1e-9
        # full fine-tuning on the step's own inputs
        assert step["full_flops"] == pytest.approx(full_fine_tuning_flops(model, batch), rel=1e-9)


def _assert_head_and_energy(metrics: dict, report: str, out, sparse_and_energy: bool) -> None:
    """Step FLOPs against dense full FT and against full FT with the same head; the energy receipt or its absence."""
    same_head, dense = metrics["full_finetuning_flops_per_step"], metrics["full_finetuning_dense_head_flops_per_step"]
    audited = [s for s in metrics["step_measurements"] if s["flops_ratio"] is not None]
    alone, dense_full = (sum(s[k] for s in audited) for k in ("alone_flops", "dense_full_flops"))
    assert metrics["measured_flops_ratio_vs_dense_full"] == pytest.approx(alone / dense_full, rel=1e-9)
    assert all(s["dense_full_flops"] >= s["full_flops"] for s in audited)
    assert "full fine-tuning, dense LM head" in report and "same LM head (rho's reference)" in report
    energy = metrics["energy"]
    if not sparse_and_energy:
        assert same_head == dense and all(s["dense_full_flops"] == s["full_flops"] for s in audited)
        assert metrics["lm_head"] == f"dense ({SPARSE_HEAD_UNAVAILABLE or '--dense-lm-head'})"
        assert energy is None and "Not measured (`--no-energy`)" in report and not (out / "energy.png").exists()
        return
    if SPARSE_HEAD_UNAVAILABLE is not None:  # this transformers keeps the head dense, and the report says why
        assert metrics["lm_head"] == f"dense ({SPARSE_HEAD_UNAVAILABLE})" and same_head == dense
    else:
        assert metrics["lm_head"] == "sparse" and 0 < metrics["lm_head_kept_share"] < 1
        assert same_head < dense  # the prompt's head work is gone from full fine-tuning too
    assert energy["measured"] and energy["mode"] in ("estimated", "measured", "partly estimated")
    assert energy["energy_kwh"] > energy["selection_kwh"] > 0
    assert energy["full_finetuning_basis"] == "FLOPs ratio"
    dense_head_kwh = energy["full_finetuning_dense_head_kwh"]
    if SPARSE_HEAD_UNAVAILABLE is None:
        assert dense_head_kwh == pytest.approx(energy["full_finetuning_kwh"] * dense / same_head)
    else:  # the same head is the dense head: no second estimate
        assert dense_head_kwh is None
    assert (out / "energy.png").is_file() and "![energy](energy.png)" in report and "## Energy" in report


def _fails(args, capsys, expected: str, out) -> None:
    with pytest.raises(SystemExit) if args and args[0] == "--argparse" else _no_raise():
        code = main([a for a in args if a != "--argparse"])
        assert code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err
    assert not out.exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
def test_bad_input_is_one_clear_line_and_leaves_nothing(tiny_checkpoint, tmp_path, capsys):
    data = str(tiny_checkpoint / "data.jsonl")
    out = tmp_path / "run"
    base = ["train", "--output-dir", str(out), "--quiet"]
    _fails(
        [
            *base,
            "--model",
            str(tmp_path / "missing"),
            "--dataset",
            data,
            "--input-field",
            "document",
            "--target-field",
            "summary",
        ],
        capsys,
        "does not exist",
        out,
    )
    _fails([*base, "--model", str(tiny_checkpoint), "--dataset", data], capsys, "has no field 'input'", out)
    fields = ["--input-field", "document", "--target-field", "summary"]
    _fails(
        [*base, "--model", str(tiny_checkpoint), "--dataset", data, *fields, "--batch-size", "100000"],
        capsys,
        "fewer than one batch of 100000",
        out,
    )
    _fails(
        [*base, "--model", str(tiny_checkpoint), "--dataset", str(tmp_path / "nope.jsonl")],
        capsys,
        "does not exist",
        out,
    )
    _fails(
        [
            *base,
            "--model",
            str(tiny_checkpoint),
            "--dataset",
            data,
            "--input-field",
            "document",
            "--target-field",
            "summary",
            "--rho",
            "0.2",
            *TRAIN_ARGS[4:],
        ],
        capsys,
        "feasible floor",
        out,
    )
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--rho", "0"])
    assert exit_info.value.code == 2
    assert "rho must be in (0, 1]" in capsys.readouterr().err
    _fails([*base, "--model", str(tiny_checkpoint), "--country", "Atlantis"], capsys, "3-letter ISO", out)
    if not torch.cuda.is_available():
        _fails([*base, "--model", str(tiny_checkpoint), "--device", "cuda"], capsys, "no CUDA device is visible", out)
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--carbon-intensity", "-5"])
    assert exit_info.value.code == 2
    assert "expected a number >= 0" in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main([*base, "--model", str(tiny_checkpoint)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_overwrite_replaces_only_an_earlier_runs_output(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """--overwrite replaced whatever --output-dir named: the working directory, the model's, the data's."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_checkpoint, work / "model")  # a copy: the fixture is shared
    (work / "data").mkdir()
    (work / "data" / "train.jsonl").write_bytes((tiny_checkpoint / "data.jsonl").read_bytes())
    (work / "notes.txt").write_text("user data")
    monkeypatch.chdir(work)
    run = ["train", "--model", "model", "--dataset", "data/train.jsonl", *TRAIN_ARGS, "--epochs", "1", "--no-energy"]
    for output, expected in (
        (".", "is the current directory"),
        ("..", "holds the current directory"),
        ("model", "is the model model"),
        (str(tmp_path / "gone" / ".." / "work" / "model"), "is the model model"),  # "gone" is missing
        ("data", "holds the dataset data/train.jsonl"),
    ):
        assert main([*run, "--output-dir", output, "--overwrite"]) == 2
        assert f"{expected}, which the run would replace; choose a new or empty --output-dir" in capsys.readouterr().err
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("user data")
    assert main([*run, "--output-dir", str(user), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is not the output of an earlier greentrainer train run" in err and "pass --overwrite" not in err
    assert (user / "keep.txt").read_text() == (work / "notes.txt").read_text() == "user data"
    assert (work / "model" / "model.safetensors").is_file() and (work / "data" / "train.jsonl").is_file()

    out = tmp_path / "run"
    assert main([*run, "--output-dir", str(out)]) == 0
    assert main([*run, "--output-dir", str(out)]) == 2
    assert "holds an earlier greentrainer train run; pass --overwrite to replace it" in capsys.readouterr().err
    (out / "notes.txt").write_text("user data")  # added to an earlier output: replacing it would delete it
    assert main([*run, "--output-dir", str(out), "--overwrite"]) == 2
    assert "files that run did not write (notes.txt)" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    assert main([*run, "--output-dir", str(out), "--overwrite"]) == 0 and (out / "adapter_model.safetensors").is_file()
    # an output written before the marker existed: what such a run writes is replaced, nothing else
    (out / ".greentrainer-train.json").unlink()
    (out / "greentrainer_config.json").write_text("{}")  # what such a run wrote beside a LoRA adapter
    assert main([*run, "--output-dir", str(out)]) == 2
    assert "holds an earlier greentrainer train run; pass --overwrite" in capsys.readouterr().err
    user_files = ["NOTES.txt", "adapter_model_best.safetensors", "checkpoint-500", "tokenizer_backup.json"]
    for name in user_files:
        (out / name).mkdir() if name.startswith("checkpoint") else (out / name).write_text("user data")
    assert main([*run, "--output-dir", str(out), "--overwrite"]) == 2
    assert f"files that run did not write ({', '.join(sorted(user_files))})" in capsys.readouterr().err
    assert all((out / name).exists() for name in user_files)
    # a link to a directory: the output is written where it points, the link kept
    (tmp_path / "disk").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "disk")
    assert main([*run, "--output-dir", str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "disk" / "adapter_model.safetensors").is_file()


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "peft_greentrainer.cli", "profile", "-h"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "--rho" in result.stdout


CONFIGS = {
    "opt-2.7b": transformers.OPTConfig(
        hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, word_embed_proj_dim=2560
    ),
    "llama-7b": transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    ),
    # experts run as one grouped matmul (transformers 5's default), whose meta kernel takes bf16 only
    "qwen3-30b-a3b": transformers.Qwen3MoeConfig(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        vocab_size=151936,
    ),
    "flan-t5-large": transformers.T5Config(
        d_model=1024,
        d_ff=2816,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=16,
        d_kv=64,
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=needs_opt_on_meta) if n.startswith("opt") else n for n in sorted(CONFIGS)]
)
def test_profile_command_matches_the_training_profile(name, tmp_path, capsys):
    CONFIGS[name].save_pretrained(tmp_path / name)
    plot = tmp_path / "plan.png"
    assert main(["profile", "--model", str(tmp_path / name), "--json", "--plot", str(plot), "--seq-len", "256"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plot.is_file()
    model = build_on_meta(tmp_path / name)
    profile = profile_model(model, dummy_batch(model.config, 4, 256, target_len=128))
    assert plan["full_flops"] == pytest.approx(profile.full_flops, rel=1e-9)
    assert 1 / 3 < plan["min_rho"] < 0.7
    rows = {row["rho"]: row for row in plan["rhos"]}
    assert rows[0.3]["predicted_flops"] is None  # below the forward-pass floor
    assert rows[0.7]["predicted_flops"] <= 0.7 * plan["full_flops"]
    assert rows[0.5]["reachable_share"] < rows[0.7]["reachable_share"] <= 1


@pytest.mark.slow
@needs_sparse_head
def test_profile_command_sees_the_sparse_head(tmp_path, capsys):
    """Prompt tokens cost no LM-head work: the same-head reference and the floor drop; dense full FT stays put."""
    # llama-7b's widths and vocabulary at 4 of its 32 layers: the relations hold at any depth (three profiles of all
    # 32 took 100 s in CI)
    transformers.LlamaConfig(**{**CONFIGS["llama-7b"].to_dict(), "num_hidden_layers": 4}).save_pretrained(
        tmp_path / "llama"
    )
    plans = {}
    for name, flags in (("dense", ["--dense-lm-head"]), ("sparse", ["--label-tokens", "64"])):
        assert main(["profile", "--model", str(tmp_path / "llama"), "--json", "--seq-len", "256", *flags]) == 0
        plans[name] = json.loads(capsys.readouterr().out)
    dense, sparse = plans["dense"], plans["sparse"]
    assert dense["lm_head"].startswith("dense") and sparse["lm_head"] == "sparse" and sparse["label_tokens"] == 64
    assert sparse["full_flops"] == dense["full_flops"] == dense["full_flops_same_head"]
    assert sparse["full_flops_same_head"] < dense["full_flops"]
    assert sparse["forward_flops"] < dense["forward_flops"]
    assert sparse["min_rho"] < dense["min_rho"]
    for row in sparse["rhos"]:
        if row["predicted_flops"] is not None:
            assert row["saving"] > row["saving_vs_same_head"]  # the two savings are reported apart
    assert main(["profile", "--model", str(tmp_path / "llama"), "--seq-len", "256", "--label-tokens", "64"]) == 0
    assert "with the same LM head (rho's reference)" in capsys.readouterr().out


def test_unreadable_data_long_sequences_and_unusable_outputs_are_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--model", str(tiny_checkpoint), "--no-energy", *TRAIN_ARGS]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"document,summary\nthe caf\xe9 model,the model\n")
    header_only = tmp_path / "header.csv"
    header_only.write_text("document,summary\n")
    data = str(tiny_checkpoint / "data.jsonl")
    _fails([*base, "--output-dir", str(out), "--dataset", str(empty)], capsys, "is empty", out)
    _fails([*base, "--output-dir", str(out), "--dataset", str(latin1)], capsys, "must be UTF-8", out)
    _fails([*base, "--output-dir", str(out), "--dataset", str(header_only)], capsys, "cannot read", out)
    # learned positions fail beyond their number (GPT-2); rotary ones run longer (the tiny Llama has 256)
    gpt2 = tmp_path / "gpt2"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.save_pretrained(gpt2)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=24, vocab_size=len(tokenizer))
    transformers.GPT2LMHeadModel(config).save_pretrained(gpt2)
    learned = [*base[:1], "--model", str(gpt2), *base[3:], "--dataset", data, "--output-dir", str(out)]
    _fails(learned, capsys, "exceed the 24 positions this model has", out)
    rotary = [*base, "--dataset", data, "--max-source-tokens", "300", "--epochs", "1", "--output-dir", str(out)]
    assert main(rotary) == 0 and out.is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_text("user data")
    _fails([*base, "--dataset", data, "--output-dir", str(blocker / "run")], capsys, "is a file", blocker / "run")
    # --overwrite of a file: refused, the file kept
    assert main([*base, "--dataset", data, "--output-dir", str(blocker), "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err and blocker.read_text() == "user data"


@needs_sparse_head
@pytest.mark.parametrize("batch_size", [2, 3])
def test_the_bounding_batches_bound_the_floor_of_every_batch_the_data_can_make(batch_size):
    """A batch is priced by its mean label count's bucket, so the floors checked up front must cover every bucket a
    batch of the data can reach, means between two whole counts included (runs of sorted rows missed the batch of 10
    and 15 labels here: its floor 0.4177 was above every floor checked)."""
    import itertools

    from peft import get_peft_model

    from peft_greentrainer import GreenTrainerConfig
    from peft_greentrainer.cli.train import _bounding_batches

    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.5))
    counts, length = [2, 5, 10, 13, 13, 15], 16
    ids = torch.randint(3, VOCAB, (len(counts), length), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    for row, count in enumerate(counts):  # count next-token targets: the last positions, as prompt then target
        labels[row, length - count :] = ids[row, length - count :]
    columns = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    tuner = model.base_model
    checked = max(tuner.min_feasible_rho(batch) for batch in _bounding_batches(columns, batch_size))
    for rows in itertools.combinations(range(len(counts)), batch_size):
        assert tuner.min_feasible_rho({k: v[list(rows)] for k, v in columns.items()}) <= checked * (1 + 1e-12)


def _floor_of_every_batch(tuner, columns: dict, batch_size: int, trimmer) -> tuple[float, float]:
    """The floor of the envelope of every batch of ``batch_size`` rows the columns can make, each cut as the collator
    cuts it (what a run that meets them all must afford), and the largest floor of one of them."""
    import itertools

    from peft_greentrainer.engine.costs import cost_envelope

    rows = len(columns["input_ids"])
    batches = [
        trimmer([{k: v[row] for k, v in columns.items()} for row in chosen])
        for chosen in itertools.combinations(range(rows), batch_size)
    ]
    envelope = cost_envelope([price for batch in batches for price in tuner.step_prices(batch)])
    return envelope.min_feasible_rho(), max(tuner.min_feasible_rho(batch) for batch in batches)


@needs_sparse_head
@pytest.mark.parametrize("batch_size", [2, 3])
def test_batches_padded_to_their_longest_row_are_bounded_at_every_length_together(batch_size):
    """Padded per batch, a batch's price follows its length and labels together, and a selection must fit every
    shape trained on at once: the floor checked up front bounds that of every batch the data can make, together.
    Checked at the shortest and the longest length alone, the batch of 12 and 9 tokens, 10 and 5 labels, was missed
    (0.3482 above 0.3446); checked batch by batch, rho at the largest floor of one batch (0.3482) was accepted where
    the batches need 0.3494 together, and a run failed at a later epoch's selection."""
    from peft import get_peft_model

    from peft_greentrainer import GreenTrainerConfig
    from peft_greentrainer.cli.data import TrimToLongest
    from peft_greentrainer.cli.errors import CliError
    from peft_greentrainer.cli.train import _bounding_batches, _check_rho_floor, _floor
    from peft_greentrainer.engine.costs import cost_envelope

    model = get_peft_model(tiny_model("llama"), GreenTrainerConfig(rho=0.5))
    lengths, counts, width = [6, 9, 16, 24, 12, 30, 30], [2, 5, 3, 13, 10, 15, 4], 32
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(0))
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for row, (length, count) in enumerate(zip(lengths, counts, strict=True)):  # prompt, then count targets, then pad
        mask[row, :length] = 1
        labels[row, length - count : length] = ids[row, length - count : length]
    columns = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    trimmer = TrimToLongest(encoder_decoder=False)
    tuner = model.base_model
    bounds = _bounding_batches(columns, batch_size, trimmer)
    shortest = sorted(lengths)[batch_size - 1]  # the shortest a batch can be: its longest row's length
    assert {batch["input_ids"].shape[1] for batch in bounds} == {n for n in lengths if n >= shortest}
    checked = cost_envelope([price for batch in bounds for price in tuner.step_prices(batch)]).min_feasible_rho()
    together, largest_alone = _floor_of_every_batch(tuner, columns, batch_size, trimmer)
    assert together <= checked * (1 + 1e-12) and largest_alone <= together * (1 + 1e-12)
    if largest_alone < together * (1 - 1e-9):  # batch size 2 here: one batch's floor is not the run's
        with pytest.raises(CliError, match="below this model's feasible floor") as refused:
            _check_rho_floor(tuner, columns, batch_size, largest_alone, trimmer)
        # the worst batch a shuffle may never draw sets it: padding to the limits is named where its floor is lower
        fixed = _floor(tuner, _bounding_batches(columns, batch_size))
        assert ("--padding max-length: floor" in str(refused.value)) == (fixed < checked)
    _check_rho_floor(tuner, columns, batch_size, checked, trimmer)


def test_an_encoder_decoder_padded_per_batch_is_bounded_at_every_pair_of_lengths():
    """An encoder-decoder's batch has two lengths, its longest source and target, and its floor need not be monotone
    in the target's (a review's BART: 0.4467 at 1 target token, 0.4997 at 12, 0.4880 at 32; checked at the ends
    alone, a run at the printed floor stopped at its first selection): the floor checked up front bounds every batch
    of the data together, brute force."""
    from peft import get_peft_model

    from peft_greentrainer import GreenTrainerConfig
    from peft_greentrainer.cli.data import TrimToLongest
    from peft_greentrainer.cli.train import _bounding_batches
    from peft_greentrainer.engine.costs import cost_envelope

    lora = {"units": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    bart = transformers.BartForConditionalGeneration(tiny_config("bart"))
    model = get_peft_model(bart, GreenTrainerConfig(rho=0.5, task_type="SEQ_2_SEQ_LM", **lora))
    sources, targets = [3, 3, 3, 3, 3, 3], [1, 1, 11, 11, 31, 31]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (6, 12), generator=generator)
    labels = torch.randint(3, VOCAB, (6, 32), generator=generator)
    mask = torch.zeros_like(ids)
    for row, (source, target) in enumerate(zip(sources, targets, strict=True)):
        mask[row, :source] = 1
        ids[row, source:] = 0
        labels[row, target:] = -100
    columns = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    trimmer = TrimToLongest(encoder_decoder=True)
    tuner = model.base_model
    bounds = _bounding_batches(columns, 2, trimmer)
    checked = cost_envelope([price for batch in bounds for price in tuner.step_prices(batch)]).min_feasible_rho()
    together, _ = _floor_of_every_batch(tuner, columns, 2, trimmer)
    assert together <= checked * (1 + 1e-12)


def test_an_encoder_decoder_with_too_many_pairs_of_lengths_is_refused_before_any_profile():
    """Each pair of source and target lengths an encoder-decoder's batch can have costs a profile before training (no
    polynomial prices two lengths): a review's 2,000 rows made 5,378 pairs, over 27 minutes of checking."""
    from peft_greentrainer.cli.data import TrimToLongest
    from peft_greentrainer.cli.errors import CliError
    from peft_greentrainer.cli.train import MAX_LENGTH_PAIRS, _bounding_batches

    rows = 40  # sources of 1 to 40 tokens, targets of 40 to 1: every row is the longest of something
    mask = (torch.arange(40) < torch.arange(1, rows + 1)[:, None]).long()
    labels = torch.where(torch.arange(40) < torch.arange(rows, 0, -1)[:, None], 5, -100)
    columns = {"input_ids": mask * 5, "attention_mask": mask, "labels": labels}
    with pytest.raises(CliError, match=r"pairs of source and target lengths.*--padding max-length") as refused:
        _bounding_batches(columns, 2, TrimToLongest(encoder_decoder=True))
    assert int(str(refused.value).split("can have ")[1].split()[0]) > MAX_LENGTH_PAIRS
    assert len(_bounding_batches({k: v[:8] for k, v in columns.items()}, 2, TrimToLongest(True))) <= MAX_LENGTH_PAIRS


def test_seq2seq_rows_are_padded_on_the_right_whatever_side_the_tokenizer_pads(tiny_checkpoint):
    """Batches are cut from the right: a tokenizer saved to pad on the left (as some T5 copies are) had its sources
    cut from their end and batches of short sources left with nothing but padding, silently."""
    from peft_greentrainer.cli.data import TrimToLongest, tokenize_seq2seq

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint, padding_side="left")
    examples = [Example("a b c d e f", "x y"), Example("a b", "x")]
    columns = tokenize_seq2seq(tokenizer, examples, "{input}", 12, 6)
    assert columns["attention_mask"][:, 0].all() and not columns["attention_mask"][:, -1].any()
    batch = TrimToLongest(encoder_decoder=True)([{k: v[i] for k, v in columns.items()} for i in range(2)])
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == tokenizer.decode(
        tokenizer("a b c d e f")["input_ids"], skip_special_tokens=True
    )


def test_the_collator_cuts_a_batch_to_its_longest_row_as_padding_to_it_would(tiny_checkpoint):
    """Causal rows are cut together to the longest row; an encoder-decoder's source and target each to its longest.
    What is cut is padding alone."""
    from peft_greentrainer.cli.data import TrimToLongest, tokenize_causal

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    examples = [Example("a b c d e f g", "x y"), Example("a b", "x"), Example("a b c", "x y z w")]
    columns = tokenize_causal(tokenizer, examples, "{input} TL;DR:", 16, 6)
    rows = [{k: v[i] for k, v in columns.items()} for i in range(len(examples))]
    trimmer = TrimToLongest(encoder_decoder=False)
    for chosen in ([0, 1, 2], [1, 2], [1]):
        batch = trimmer([rows[i] for i in chosen])
        longest = max(int(rows[i]["attention_mask"].sum()) for i in chosen)
        assert all(batch[k].shape == (len(chosen), longest) for k in ("input_ids", "attention_mask", "labels"))
        assert all(v.is_contiguous() for v in batch.values())  # BART's encoder views its input_ids
        for position, i in enumerate(chosen):  # each row is its tokenized self, padded to the batch's longest
            assert all(torch.equal(batch[k][position], rows[i][k][:longest]) for k in batch)
            assert not rows[i]["attention_mask"][longest:].any() and (rows[i]["labels"][longest:] == -100).all()
    seq2seq = {
        "input_ids": torch.tensor([[5, 6, 7, 1, 0, 0], [5, 1, 0, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]),
        "labels": torch.tensor([[8, 1, -100, -100], [8, 9, 1, -100]]),
    }
    batch = TrimToLongest(encoder_decoder=True)([{k: v[i] for k, v in seq2seq.items()} for i in range(2)])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [5, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 1, -100], [8, 9, 1]]


@pytest.mark.slow
def test_training_pads_each_batch_to_its_longest_row_within_rho(tiny_checkpoint, tmp_path):
    """Texts of very different lengths: padded per batch (the default), steps run at several lengths, each within
    rho, and cost less than padded to the limits (``--padding max-length``: one length, every step)."""
    data = tmp_path / "mixed.jsonl"
    with open(data, "w") as handle:
        for i in range(20):
            source, target = " ".join(["w"] * (2 if i % 3 else 14)), " ".join(["s"] * (1 + i % 4))
            handle.write(json.dumps({"input": source, "target": target}) + "\n")
    run = ["train", "--model", str(tiny_checkpoint), "--dataset", str(data), "--rho", "0.6", "--quiet"]
    run += ["--max-source-tokens", "16", "--max-target-tokens", "6", "--eval-examples", "4", "--epochs", "2"]
    run += ["--batch-size", "2", "--measure-every", "1", "--no-energy", "--device", "cpu", "--lr", "1e-3"]
    full = {}
    for padding in ("longest", "max-length"):
        out = tmp_path / padding
        assert main([*run, "--padding", padding, "--output-dir", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        steps = metrics["step_measurements"]
        assert metrics["padding"] == padding and all(s["flops_ratio"] <= 0.6 + 1e-9 for s in steps)
        full[padding] = [s["dense_full_flops"] for s in steps]  # full fine-tuning with a dense head: the shape alone
    assert len(set(full["max-length"])) == 1 and len(set(full["longest"])) > 2
    assert max(full["longest"]) <= full["max-length"][0] and sum(full["longest"]) < 0.8 * sum(full["max-length"])


@pytest.mark.slow
def test_the_floor_a_refusal_names_trains_every_batch_of_the_data(tiny_checkpoint, tmp_path, capsys):
    """The floor is checked up front on the batches that bound every batch shuffling can make: with a head that
    projects only labelled positions it follows a batch's labels, and checked on the first batch alone a rho it
    accepted (and then the one its mid-run error named) failed in the middle of training."""
    import random
    import re

    rng = random.Random(0)
    data = tmp_path / "targets.jsonl"
    with open(data, "w") as handle:  # the first batch has long targets, the others short ones: a higher floor here
        for i in range(24):
            words = [f"w{rng.randrange(20)}" for _ in range(12)]
            handle.write(json.dumps({"input": " ".join(words), "target": " ".join(words[: 6 if i < 4 else 1])}) + "\n")
    run = [
        "train",
        "--model",
        str(tiny_checkpoint),
        "--dataset",
        str(data),
        *["--epochs", "2", "--max-source-tokens", "16", "--max-target-tokens", "6", "--eval-examples", "2"],
        *["--quiet", "--no-energy", "--device", "cpu", "--lr", "1e-3", "--batch-size", "4"],
    ]
    assert main([*run, "--rho", "0.05", "--output-dir", str(tmp_path / "low")]) == 2
    floor = re.search(r"feasible floor ([0-9.]+)", capsys.readouterr().err).group(1)
    assert main([*run, "--rho", floor, "--output-dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["measured_flops_ratio_max"] <= float(floor)


@needs_sparse_head
def test_the_floor_profile_prints_is_one_training_accepts(tmp_path, capsys):
    """``greentrainer profile`` prices its smallest feasible rho as training prices a step (an LM head that projects
    only labelled positions: at its label bucket's ends) and rounds it up: training at the printed rho selects (it
    printed the exact-count floor, rounded to nearest, which training refused)."""
    from peft import get_peft_model

    from peft_greentrainer import GreenTrainerConfig

    config = tiny_config("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=250)
    config.save_pretrained(tmp_path / "model")
    shape = ["--batch-size", "2", "--seq-len", "21", "--label-tokens", "4"]
    assert main(["profile", "--model", str(tmp_path / "model"), *shape, "--rho", "0.5"]) == 0
    floor = float(capsys.readouterr().out.split("smallest feasible rho: ")[1].split()[0])
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(config), GreenTrainerConfig(rho=floor))
    ids = torch.randint(3, 250, (2, 21), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    batch["labels"][:, :17] = -100  # the last 4 positions supervised, as the plan's labels
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    selection = model.base_model.select_units([batch], optimizer)
    assert selection.mask.any() and selection.flops <= floor * selection.full_flops


def test_a_one_row_data_file_is_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    one_row = tmp_path / "one.jsonl"
    one_row.write_text((tiny_checkpoint / "data.jsonl").read_text().splitlines()[0] + "\n")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_checkpoint), "--dataset", str(one_row), "--output-dir", str(out)]
    _fails([*args, *TRAIN_ARGS, "--no-energy"], capsys, "gave 1 training and 0 evaluation examples", out)


def test_a_model_directory_without_weights_is_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    config_only = tmp_path / "no-weights"  # what greentrainer profile takes
    config_only.mkdir()
    for file in tiny_checkpoint.glob("*.json"):  # config and tokenizer
        (config_only / file.name).write_bytes(file.read_bytes())
    out = tmp_path / "run"
    args = ["train", "--model", str(config_only), "--dataset", str(tiny_checkpoint / "data.jsonl"), *TRAIN_ARGS]
    expected = "training needs them (model.safetensors or pytorch_model.bin beside config.json)"
    _fails([*args, "--no-energy", "--output-dir", str(out)], capsys, expected, out)


def test_what_the_token_limits_cut_is_said_and_recorded(tiny_checkpoint, tmp_path, caplog):
    """Sources and targets longer than --max-source-tokens / --max-target-tokens were cut without a word."""
    data = tmp_path / "long.jsonl"
    with open(data, "w") as handle:  # the tiny tokenizer: a token a word; "TL;DR:" is one, so sources keep 15 tokens
        for i in range(20):
            source, target = " ".join(["w"] * (30 if i % 2 else 8)), " ".join(["s"] * (10 if i % 4 == 0 else 3))
            handle.write(json.dumps({"input": source, "target": target}) + "\n")
    out = tmp_path / "run"
    run = ["train", "--model", str(tiny_checkpoint), "--dataset", str(data), "--output-dir", str(out), "--quiet"]
    limits = ["--max-source-tokens", "16", "--max-target-tokens", "6", "--eval-examples", "4"]
    with caplog.at_level(logging.WARNING):
        assert main([*run, *limits, "--epochs", "1", "--no-energy", "--device", "cpu", "--rho", "0.7"]) == 0
    truncation = json.loads((out / "metrics.json").read_text())["truncation"]
    totals = {key: sum(split[key] for split in truncation.values()) for key in truncation["train"]}
    assert totals["examples"] == 20 and totals["sources_cut"] == 10 and totals["targets_cut"] == 5
    assert {split["source_tokens_cut_max"] for split in truncation.values()} <= {0, 15}
    assert {split["target_tokens_cut_max"] for split in truncation.values()} <= {0, 4}
    train = truncation["train"]
    said = f"{train['sources_cut']} of 16 sources (by up to 15 tokens)"
    assert f"Cut to fit --max-source-tokens 16 / --max-target-tokens 6: training: {said}" in caplog.text
    assert f"training: {said}" in (out / "report.md").read_text()


def test_a_model_folder_without_a_usable_tokenizer_is_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    """A folder of config and weights alone (a Trainer's checkpoint-N/) gave an empty tokenizer (GPT-2: one token,
    every text to nothing), and the run ended in an IndexError in generation; or no tokenizer (Llama), a ValueError
    whose first line named no folder."""
    gpt2 = tmp_path / "gpt2-checkpoint"
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64, vocab_size=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(gpt2)
    llama = tmp_path / "llama-checkpoint"
    llama.mkdir()
    for name in ("config.json", "model.safetensors"):
        (llama / name).write_bytes((tiny_checkpoint / name).read_bytes())
    out = tmp_path / "run"
    data = ["--dataset", str(tiny_checkpoint / "data.jsonl"), *TRAIN_ARGS, "--no-energy", "--output-dir", str(out)]
    for model in (gpt2, llama):
        _fails(["train", "--model", str(model), *data], capsys, f"model {model} has no usable tokenizer", out)


def test_a_tokenizer_beyond_the_models_vocabulary_pads_with_eos_or_is_refused_before_training(
    tiny_checkpoint, tmp_path, capsys, caplog
):
    """A pad token one id beyond the model's embeddings (as Qwen2's tokenizer class adds to a small model): training
    never padded, so every step ran, and the evaluation after it failed with an IndexError. Such a pad is replaced by
    eos; a token beyond them in the training texts is refused before training."""
    from peft_greentrainer.cli.errors import CliError
    from peft_greentrainer.cli.train import _check_token_ids, load_model

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).write_bytes((tiny_checkpoint / name).read_bytes())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    rows = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<extra-pad>"})
    tokenizer.save_pretrained(model)
    args = build_parser().parse_args(["train", "--device", "cpu"])
    with caplog.at_level(logging.WARNING):
        loaded = load_model(str(model), args)[1]
    assert loaded.pad_token == loaded.eos_token and f"'<extra-pad>' (id {rows}) is beyond" in caplog.text
    data = tmp_path / "data.jsonl"
    lines = (tiny_checkpoint / "data.jsonl").read_text().splitlines()
    data.write_text("\n".join([json.dumps({"document": "x <extra-pad> y", "summary": "z"}), *lines]) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--dataset", str(data), *TRAIN_ARGS, "--no-energy", "--output-dir"]
    _fails([*argv, str(out)], capsys, f"the training texts tokenize to id {rows}, beyond the {rows} rows", out)
    # the token in an evaluation text alone: refused before training too (it raised in the evaluation before it)
    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    columns = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    held_out = [Example("a", "b"), Example("x <extra-pad> y", "z")]
    with pytest.raises(CliError, match=f"the evaluation texts tokenize to id {rows}, beyond the {rows} rows"):
        _check_token_ids(base, loaded, columns, held_out, str(model))


def test_a_tokenizer_with_neither_pad_nor_eos_is_one_clear_line(tiny_checkpoint, tmp_path):
    """It failed in tokenization with a TypeError (padding with a token id of None)."""
    from peft_greentrainer.cli.errors import CliError
    from peft_greentrainer.cli.train import load_model

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).write_bytes((tiny_checkpoint / name).read_bytes())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.pad_token = tokenizer.eos_token = None
    tokenizer.save_pretrained(model)
    assert transformers.AutoTokenizer.from_pretrained(model).eos_token is None
    with pytest.raises(CliError, match="has neither a pad nor an end-of-text token; set its eos_token"):
        load_model(str(model), build_parser().parse_args(["train", "--device", "cpu"]))


@pytest.mark.parametrize("error", [IndexError("index out of range in self"), KeyboardInterrupt()])
def test_a_failed_evaluation_after_training_keeps_the_trained_adapter(
    error, tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    """An evaluation that failed after training discarded the trained adapter with the rest of the output; so did
    Ctrl-C during it (not an Exception)."""
    from peft_greentrainer.cli import train as train_module

    evaluate, calls = train_module.evaluate, []

    def failing_after_training(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", failing_after_training)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_checkpoint), "--dataset", str(tiny_checkpoint / "data.jsonl"), *TRAIN_ARGS]
    what = "failed" if isinstance(error, IndexError) else "was interrupted"
    expected = f"the evaluation or report after training {what} ({type(error).__name__}: {str(error) or '-'}); the"
    argv = [*args, "--epochs", "1", "--no-energy", "--output-dir", str(out)]
    if isinstance(error, KeyboardInterrupt):  # an interrupt still, to a shell loop running several trainings
        with pytest.raises(KeyboardInterrupt):
            main(argv)
        assert expected in capsys.readouterr().err and not out.exists()
    else:
        _fails(argv, capsys, expected, out)
    kept = tmp_path / "run-unevaluated"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in kept.iterdir()}
    assert not list(tmp_path.glob(".tmp-*")) and not (kept / "metrics.json").exists()
    PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint), kept)  # it loads


@pytest.mark.slow
def test_an_encoder_decoder_with_learned_positions_is_held_to_them(tiny_checkpoint, tmp_path, capsys):
    from tokenizers import processors

    bart = tmp_path / "bart"  # 16 learned positions in encoder and decoder; a tokenizer that adds specials, as BART's
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    eos = tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A <eos>", special_tokens=[("<eos>", eos)]
    )
    tokenizer.save_pretrained(bart)
    dims = {"encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
    config = transformers.BartConfig(
        d_model=16,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        vocab_size=len(tokenizer),
        max_position_embeddings=16,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        bos_token_id=eos,
        decoder_start_token_id=eos,
        forced_eos_token_id=None,
        **dims,
    )
    transformers.BartForConditionalGeneration(config).save_pretrained(bart)
    out = tmp_path / "run"
    data = ["--dataset", str(tiny_checkpoint / "data.jsonl"), "--no-energy", "--output-dir", str(out)]
    base = ["train", "--model", str(bart), *data, *TRAIN_ARGS, "--epochs", "1", "--eval-examples", "2"]
    _fails([*base, "--max-source-tokens", "24"], capsys, "--max-source-tokens 24: more than the 16 positions", out)
    _fails([*base, "--max-target-tokens", "17"], capsys, "--max-target-tokens 17: more than the 16 positions", out)
    # at the limit it trains, and evaluates on prompts of 20-word sources cut to fit with the special tokens
    assert main([*base, "--max-source-tokens", "16"]) == 0
    assert json.loads((out / "metrics.json").read_text())["padding"] == "max-length"  # auto, for an encoder-decoder
    # texts of several lengths padded per batch: each batch's source and target cut to their longest, within rho
    mixed = tmp_path / "mixed.jsonl"
    with open(mixed, "w") as handle:
        for i in range(24):
            words = [f"w{(i * 7 + j) % 20}" for j in range(3 + i % 10)]
            handle.write(json.dumps({"document": " ".join(words), "summary": " ".join(words[: 1 + i % 4])}) + "\n")
    varied = [*base[:4], str(mixed), *base[5:], "--max-source-tokens", "16", "--measure-every", "1"]
    assert main([*varied, "--batch-size", "2", "--padding", "longest", "--overwrite"]) == 0
    steps = json.loads((out / "metrics.json").read_text())["step_measurements"]
    assert len({s["dense_full_flops"] for s in steps}) > 2 and all(s["flops_ratio"] <= 0.5 + 1e-9 for s in steps)


def test_quantizing_without_bitsandbytes_is_one_clear_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    data = ["--dataset", str(tiny_checkpoint / "data.jsonl"), "--no-energy", "--output-dir", str(out)]
    args = ["train", "--model", str(tiny_checkpoint), *data, *TRAIN_ARGS, "--load-in-4bit"]
    quantizer = "transformers.quantizers.quantizer_bnb_4bit.is_bitsandbytes_available"
    monkeypatch.setattr(quantizer, lambda *args, **kwargs: False)  # what transformers sees without it
    monkeypatch.setattr("transformers.utils.is_bitsandbytes_available", lambda *args, **kwargs: False)
    _fails(args, capsys, "--load-in-4bit needs bitsandbytes: pip install -U bitsandbytes, or drop the flag", out)
    # installed, but transformers' quantizer still refuses (too old a version, no accelerate): its reason, one line
    monkeypatch.setattr("transformers.utils.is_bitsandbytes_available", lambda *args, **kwargs: True)
    _fails(args, capsys, "--load-in-4bit: Using `bitsandbytes`", out)


def test_csv_cells_are_read_as_the_text_they_hold(tmp_path):
    """The csv builder guessed column types: answers 42 became '42.0' (a blank cell elsewhere in the column), zip
    codes lost their leading zero, '3.10' became '3.1', and 'None' or 'N/A' (an unanswerable question) became null."""
    from peft_greentrainer.cli.data import load_examples

    answers = ["42", "02104", "3.10", "", "1e3", "None", "N/A", "nan"] + [str(i) for i in range(20)]
    file = tmp_path / "data.csv"
    file.write_text("question,answer\n" + "".join(f"q{i},{a}\n" for i, a in enumerate(answers)))
    fields = {"input_field": "question", "target_field": "answer"}
    examples = load_examples(str(file), "train", **fields) + load_examples(str(file), "eval", **fields)
    assert sorted(e.target for e in examples) == sorted(a for a in answers if a)


def test_profile_takes_target_modules_all_linear(tmp_path, capsys):
    tiny_config("llama").save_pretrained(tmp_path / "llama")
    argv = ["profile", "--model", str(tmp_path / "llama"), "--units", "lora", "--seq-len", "16", "--json"]
    assert main([*argv, "--target-modules", "all-linear"]) == 0
    assert json.loads(capsys.readouterr().out)["num_units"] == 7 * tiny_config("llama").num_hidden_layers


def test_target_modules_all_linear_is_passed_as_peft_takes_it(capsys):
    """--target-modules takes names (nargs="+"): all-linear reached PEFT as ["all-linear"], a module no model has."""
    from peft_greentrainer.cli.train import wrap

    with pytest.raises(SystemExit):  # beside names it would be one more name, matching none: q_proj alone trained
        build_parser().parse_args(["train", "--target-modules", "all-linear", "q_proj"])
    assert "pass it alone" in capsys.readouterr().err

    args = build_parser().parse_args(["train", "--units", "lora", "--target-modules", "all-linear", "--r", "2"])
    model = wrap(tiny_model("llama"), args)
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(model.peft_config["default"].target_modules) == projections  # every linear layer but the LM head


def test_rouge_scores_english_as_rouge_score_does_and_reads_every_script():
    from rouge_score import rouge_scorer

    default = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = [
        ("The cats were running quickly.", "A cat runs quickly!"),
        ("GreenTrainer saves 50% of FLOPs", "it saves half the flops, at rho=0.5"),
        ("state-of-the-art models (2023)", "models: the STATE of the art in 2023"),
        ("", "nothing predicted"),
    ]
    for prediction, reference in pairs:
        expected = {key: 100 * score.fmeasure for key, score in default.score(reference, prediction).items()}
        assert rouge([prediction], [reference]) == pytest.approx(expected)
    same = {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    for text in (
        "模型训练很快",
        "модель обучается быстро",
        "ภาษาไทยง่ายมาก",
        "こんにちは、世界",
        "Größenänderung über Straße",
    ):
        assert rouge([text], [text]) == same, text  # the default tokenizer keeps [a-z0-9]: 0, or German fragments
    for prediction, reference in (
        ("模型训练很慢", "模型训练很快"),
        ("модель обучается медленно", "модель обучается быстро"),
    ):
        assert 0 < rouge([prediction], [reference])["rouge1"] < 100


ENGLISH = (
    "Running runs ran, generalization's GENERALIZES; happily: studies-studying (relational) conditioned x86_64 2e-5"
)


@settings(max_examples=300, deadline=None)
@given(
    st.text(st.characters(max_codepoint=127)) | st.lists(st.sampled_from(ENGLISH.split())).map(" ".join), st.booleans()
)
def test_rouge_tokens_are_rouge_scores_on_ascii_and_words_or_letters_elsewhere(text, use_stemmer):
    from rouge_score import tokenizers

    from peft_greentrainer.cli.evaluation import AnyScriptTokenizer

    assert AnyScriptTokenizer(use_stemmer).tokenize(text) == tokenizers.DefaultTokenizer(use_stemmer).tokenize(text)
    words = AnyScriptTokenizer(use_stemmer).tokenize("Модели 2024年 обучаются, नमस्ते")
    assert words == ["модели", "2024", "年", "обучаются", "नमस्ते"]  # Devanagari's vowel signs are marks in a word


def test_profile_command_builds_a_decoder_with_a_pad_token_and_checks_the_plot_path(tmp_path, capsys):
    transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, pad_token_id=0).save_pretrained(
        tmp_path / "gpt2"
    )
    assert main(["profile", "--model", str(tmp_path / "gpt2"), "--seq-len", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["full_flops"] > 0
    assert main(["profile", "--model", str(tmp_path / "gpt2"), "--plot", str(tmp_path / "absent" / "p.png")]) == 2
    assert "its directory does not exist" in capsys.readouterr().err


def test_profile_command_rejects_what_it_cannot_build(tmp_path, capsys):
    assert main(["profile", "--model", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert main(["profile", "--model", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot build" in err


@pytest.mark.slow
def test_rows_without_a_field_are_skipped_not_trained_on_as_none(tmp_path, caplog):
    from peft_greentrainer.cli.data import DataError, load_examples

    rows = [{"document": f"text {i}", "summary": None if i % 3 == 0 else f"sum {i}"} for i in range(30)]
    rows[1].pop("summary")  # missing, not null: the json builder fills it with null
    file = tmp_path / "data.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows))
    fields = {"input_field": "document", "target_field": "summary"}
    with caplog.at_level(logging.WARNING):
        examples = load_examples(str(file), "train", **fields) + load_examples(str(file), "eval", **fields)
    assert len(examples) == 30 - 11 and all(e.target != "None" for e in examples)
    assert "without 'document' or 'summary'" in caplog.text
    file.write_text("\n".join(json.dumps({"document": "x", "summary": None}) for _ in range(5)))
    with pytest.raises(DataError, match="lacks 'document' or 'summary'"):
        load_examples(str(file), "train", **fields)


def test_empty_texts_are_skipped_as_nulls_are_and_lists_are_refused(tmp_path, caplog):
    """An empty or blank text was trained on (a null was skipped); a list (a chat 'messages' column) was trained on
    as its Python repr."""
    import re

    from peft_greentrainer.cli.data import DataError, load_examples

    rows = [{"document": f"text {i}", "summary": f"sum {i}"} for i in range(10)]
    rows[2]["summary"], rows[5]["document"], rows[7]["summary"] = "", "  \n", None
    file = tmp_path / "data.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows))
    fields = {"input_field": "document", "target_field": "summary"}
    with caplog.at_level(logging.WARNING):
        examples = load_examples(str(file), "train", **fields) + load_examples(str(file), "eval", **fields)
    assert len(examples) == 7 and all(e.source.strip() and e.target.strip() for e in examples)
    counts = re.findall(r"\((\d) null or missing, (\d) empty\)", caplog.text)  # a warning a split that lost rows
    assert [sum(int(c[i]) for c in counts) for i in (0, 1)] == [1, 2]
    chat = tmp_path / "chat.jsonl"
    message = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat.write_text("\n".join(json.dumps({"messages": message, "summary": "s"}) for _ in range(5)))
    with pytest.raises(DataError, match=r"field 'messages' of dataset .* holds lists, not text"):
        load_examples(str(chat), "train", input_field="messages", target_field="summary")


def test_data_files_are_named_when_not_utf8_a_directory_or_in_capitals(tmp_path):
    """A Latin-1 JSONL failed while its rows were read, with a bare codec message; a directory "did not exist"; a
    .JSONL file was refused as an unsupported type."""
    from peft_greentrainer.cli.data import DataError, load_examples

    rows = "\n".join(json.dumps({"input": f"text {i}", "target": f"sum {i}"}) for i in range(5))
    upper = tmp_path / "DATA.JSONL"
    upper.write_text(rows)
    assert len(load_examples(str(upper), "train")) == 4
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"input": "café", "target": "x"}\n'.encode("latin-1") * 3)
    with pytest.raises(DataError, match=r"cannot read .*latin1.jsonl as json .*byte 14 is not UTF-8.*must be UTF-8"):
        load_examples(str(latin1), "train")
    with pytest.raises(DataError, match="is a directory"):
        load_examples(str(tmp_path), "train")


def test_seq2seq_template_is_filled_as_the_causal_one_and_the_prompt_are(capsys):
    from peft_greentrainer.cli.data import Example, tokenize_seq2seq

    class Words:  # a whitespace tokenizer with the call signature the CLI uses
        pad_token_id = 0

        def __call__(self, texts, max_length, truncation, padding, padding_side, return_tensors):
            ids = [[len(w) for w in t.split()][:max_length] for t in texts]
            ids = [row + [0] * (max_length - len(row)) for row in ids]
            return {"input_ids": torch.tensor(ids), "attention_mask": (torch.tensor(ids) > 0).long()}

    examples = [Example("aa bbb", "c")]
    braces = tokenize_seq2seq(Words(), examples, "summarize {label}: {input} ->", 8, 4)  # other braces: literal
    assert braces["input_ids"][0].tolist()[:5] == [9, 8, 2, 3, 2]
    with pytest.raises(SystemExit):  # a template without {input} would train on no source text
        main(["train", "--template", "summarize:"])
    assert "must hold {input} once" in capsys.readouterr().err


def test_embedded_data_loads_offline():
    from peft_greentrainer.cli.data import load_examples

    train = load_examples(None, "train")
    test = load_examples(None, "eval", limit=9)
    assert len(train) == 300 and len(test) == 9
    assert all(e.source and e.target for e in train)
    assert {e.source.split("\n", 1)[0] for e in test} == {  # the three aspects all appear in a small sample
        "What problem does the paper address?",
        "What do the authors propose?",
        "What did they find?",
    }


def test_every_embedded_prompt_keeps_its_aspect_question():
    """A source cut to the embedded run's limit keeps its question: after the abstract, most prompts lost it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from peft_greentrainer.cli.data import ACLSUM_QUESTIONS, PAPER_TEMPLATE, load_examples, tokenize_causal
    from peft_greentrainer.cli.evaluation import _prompt
    from peft_greentrainer.cli.train import EMBEDDED_DEFAULTS

    train, test = load_examples(None, "train"), load_examples(None, "eval")
    words = {word for e in train + test for word in f"{e.source} {e.target} {PAPER_TEMPLATE}".split()}
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<eos>", *sorted(words)])}))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # a token a word: abstracts run past 160 of them
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    limits = EMBEDDED_DEFAULTS["max_source_tokens"], EMBEDDED_DEFAULTS["max_target_tokens"]
    columns = tokenize_causal(tokenizer, train, PAPER_TEMPLATE, *limits)
    prompt_ids = zip(columns["input_ids"], (columns["labels"] == -100) & (columns["attention_mask"] == 1), strict=True)
    prompts = [tokenizer.decode(ids[in_prompt]) for ids, in_prompt in prompt_ids]
    prompts += [_prompt(tokenizer, PAPER_TEMPLATE, e.source, limits[0]) for e in test]
    assert any(len(e.source.split()) > limits[0] for e in train)  # cut, as with the real tokenizer
    for example, prompt in zip(train + test, prompts, strict=True):
        question = next(q for q in ACLSUM_QUESTIONS.values() if q in example.source)
        assert question in prompt and prompt.endswith(PAPER_TEMPLATE.partition("{input}")[2])
    assert len(set(prompts[: len(train)])) == len(train)  # no prompt of one abstract stands for three aspects


@pytest.mark.slow
def test_embedded_model_converts_once_and_is_a_real_pretrained_model(tmp_path, monkeypatch):
    from peft_greentrainer.cli import embedded

    monkeypatch.setenv("PEFT_GREENTRAINER_CACHE", str(tmp_path))
    path = embedded.embedded_model_path()
    assert (path / "model.safetensors").is_file() and not list(tmp_path.glob(".tmp-*"))
    assert embedded.embedded_model_path() == path  # cached: no second conversion
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is Paris. It is a beautiful city.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0  # a random 49k-vocabulary model scores ~10.8: these are real pretrained weights


@pytest.mark.parametrize(
    ("units", "own_data", "lr"),
    [("tensors", False, 3e-4), ("lora", False, 1e-3), ("tensors", True, 2e-5), ("lora", True, 2e-4)],
)
def test_default_learning_rate_is_the_protocols_on_the_embedded_run_and_the_papers_elsewhere(units, own_data, lr):
    args = build_parser().parse_args(
        ["train", "--units", units, "--device", "cpu", *(["--dataset", "mine.jsonl"] if own_data else [])]
    )
    _apply_defaults(args)
    assert args.lr == lr
    explicit = build_parser().parse_args(["train", "--units", units, "--device", "cpu", "--lr", "5e-5"])
    _apply_defaults(explicit)
    assert explicit.lr == 5e-5
