"""Peak memory per rank under DDP vs FSDP2: full fine-tuning, LoRA and GreenTrainer (rho 0.5), 2 processes, CPU/gloo.

Each configuration runs ``transformers.Trainer`` under ``torchrun --nproc_per_node=2`` on a ~55M-parameter LLaMA-shaped
model built from a config (per-device batch 2 x 128 tokens, AdamW, 3 optimizer steps). A callback placed first resets
the process's peak RSS when training begins (after the model is wrapped and sharded, before GreenTrainer's first
selection) and reads it when training ends; the table gives that peak minus the RSS before the model was built (the
Python/torch runtime), i.e. weights, gradients, optimizer state, activations and communication buffers.
``MALLOC_MMAP_THRESHOLD_`` makes freed tensors go back to the OS, so RSS follows what is allocated.

Usage: ``python benchmarks/bench_fsdp_memory.py`` (prints a markdown table; about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

METHODS = ["full", "lora", "greentrainer"]
BACKENDS = ["ddp", "fsdp2"]
ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> float:
    """A ``/proc/self/status`` figure in MiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(method: str, backend: str, steps: int) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    from peft_greentrainer import GreenTrainerCallback, GreenTrainerConfig

    torch.set_num_threads(1)
    baseline = _status("VmRSS")
    if backend == "fsdp2":
        sys.path.insert(0, str(ROOT / "examples"))
        from fsdp import fsdp_on_cpu  # accelerate enables FSDP on GPU-like devices only

        fsdp_on_cpu()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=12,
        vocab_size=8192,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config)
    callbacks = []
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    elif method == "greentrainer":
        model = get_peft_model(model, GreenTrainerConfig(rho=0.5, units="tensors", importance_batches=1))
        callbacks.append(GreenTrainerCallback())
    ids = torch.randint(0, config.vocab_size, (64, 128), generator=torch.Generator().manual_seed(1)).tolist()
    sharding = {}
    if backend == "fsdp2":
        fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
        sharding = {"fsdp": "full_shard", "fsdp_config": fsdp_config}
    args = transformers.TrainingArguments(
        output_dir=f"/tmp/bench-fsdp-memory-{os.getpid()}",
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-5,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        **sharding,
    )

    class Peak(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM to the current RSS
            self.start = _status("VmRSS")

        def on_train_end(self, args, state, control, **kwargs):
            self.peak = _status("VmHWM")

    peak = Peak()
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        callbacks=callbacks,
    )
    trainer.callback_handler.callbacks.insert(0, peak)
    trainer.train()
    sharded = trainer.is_fsdp_enabled
    rank = dist.get_rank() if dist.is_initialized() else 0
    row = {"method": method, "backend": backend, "rank": rank, "sharded": sharded}
    row |= {"baseline_mib": baseline, "start_mib": peak.start, "peak_mib": peak.peak}
    print("RESULT " + json.dumps(row), flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "BACKEND"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.one:
        run_one(*args.one, steps=args.steps)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    rows = []
    for method in METHODS:
        for backend in BACKENDS:
            port = f"--master_port={_free_port()}"
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", port]
            command = [*launcher, __file__, "--one", method, backend, "--steps", str(args.steps)]
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            rows += [json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")]
    print("Peak RSS per rank while training, above the Python/torch runtime (MiB); 2 processes on CPU/gloo,")
    print(f"LLaMA-shaped 55M model (fp32), per-device batch 2 x 128, AdamW, {args.steps} steps")
    print("(`python benchmarks/bench_fsdp_memory.py`)\n")
    print("| method | DDP | FSDP2 | FSDP2 / DDP |")
    print("|---|---|---|---|")
    for method in METHODS:
        figures = {}
        for backend in BACKENDS:
            ranks = [r for r in rows if r["method"] == method and r["backend"] == backend]
            assert ranks and all(r["sharded"] == (backend == "fsdp2") for r in ranks), ranks
            figures[backend] = max(r["peak_mib"] - r["baseline_mib"] for r in ranks)
        ratio = figures["fsdp2"] / figures["ddp"]
        print(f"| {method} | {figures['ddp']:.0f} | {figures['fsdp2']:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
