"""Writing adapters to disk: atomically (complete or absent, never half-written), and as plain LoRA adapters."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable


def export_lora_adapter(model, save_directory: str | os.PathLike) -> None:
    """Write a units="lora" GreenTrainer adapter as a plain PEFT LoRA adapter (loads without this package).

    The LoRA weights are the same tensors under the same keys; only the config changes to a ``LoraConfig``. The
    directory is written atomically: it appears complete or not at all.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = model.peft_config[model.active_adapter]
    if config.units != "lora":
        raise ValueError("Only units='lora' adapters can be exported as LoRA; units='tensors' trained base tensors.")
    lora_config = config.to_lora_config()
    state_dict = get_peft_model_state_dict(model, adapter_name=model.active_adapter)

    def write(directory: str) -> None:
        lora_config.save_pretrained(directory)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state_dict.items()},
            os.path.join(directory, "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )

    write_atomically(save_directory, write)


def save_adapter(model, save_directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained`` into a temporary sibling directory, renamed into place when complete.

    An interrupted save leaves the previous adapter (or nothing), never a half-written one.
    """
    write_atomically(save_directory, lambda directory: model.save_pretrained(directory, **kwargs))


def write_atomically(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(directory)`` into a hidden sibling of ``target``, then swap it in with renames on the same filesystem.

    A directory cannot replace a non-empty one in a single rename, so the previous ``target`` is moved aside first
    and moved back if the second rename fails: ``target`` is the old or the new complete directory at every point.
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        write(staging)
        if not os.path.isdir(target):
            os.replace(staging, target)
            return
        backup = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.rmdir(backup)
        os.replace(target, backup)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
