"""A weightless twin of a tuned model: the same architecture and GreenTrainer config, without weights, for profiling.

Profiles only need shapes, so a twin costs no memory. Both users make it of fake tensors on the real device
(:func:`fake_twin`): ``model.py`` to price full fine-tuning of a quantized base (which cannot be fully fine-tuned
itself), ``fsdp.py`` to profile a sharded model as if it were whole.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

from .backprop import keep_backprop_shallow
from .engine.attention_spans import SPAN_INPUTS
from .engine.checkpointing import non_reentrant_keywords
from .engine.profile import CLIP_MASKS, KEYED_BY_VALUE
from .engine.units import inputs_device, unwrapped_name

# inputs a twin's step reads the values of: the input ids and the token types that mark image tokens (a
# vision-language model counts its image tokens, Qwen-VL's rope indexes them), labels, attention's spans, how a vision
# tower cuts its patches, and the images themselves (Idefics3 and SmolVLM drop those of all zeros)
VALUED_INPUTS = (
    "input_ids", "mm_token_type_ids", "labels", "shift_labels", *SPAN_INPUTS, "image_grid_thw", "video_grid_thw",
    "pixel_values", "pixel_attention_mask", *CLIP_MASKS, *KEYED_BY_VALUE,
)  # fmt: skip


def weightless_twin(tuner, model_class: type[nn.Module]):
    """``tuner``'s architecture (``model_class`` built from its base's config) on ``meta``, tuned with a copy of its
    GreenTrainer config; the twin never trains, and it is float even where the base is quantized."""
    from peft import get_peft_model

    config = copy.deepcopy(tuner.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # with a KV cache transformers skips a data-dependent mask check that meta tensors cannot run; the cache only keeps
    # keys and values, it adds no FLOPs
    config.use_cache = True
    with torch.device("meta"):
        base = runnable_on_meta(model_class(config).to(compute_dtype(tuner.model)))
    twin = get_peft_model(base, copy.deepcopy(tuner.greentrainer_config)).base_model
    twin._runtime.step_hook.remove()
    keep_backprop_shallow(twin.model, quiet=True)
    return twin


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model``'s weights compute in: FSDP2's mixed-precision ``param_dtype`` where one is set, else the
    dtype of most of its floating-point weights, adapters aside (a quantized base's are those left unquantized).

    A twin built in another dtype would be priced on other kernels: CUDA runs SDPA with grouped-query heads on its
    math path in float32 and on flash attention in bf16, whose backward costs differ."""
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)  # the outermost module FSDP2 sharded
        if callable(state):
            policy = getattr(state(), "_mp_policy", None)
            if getattr(policy, "param_dtype", None) is not None:
                return policy.param_dtype
            break
    sizes: dict[torch.dtype, int] = {}
    for name, parameter in model.named_parameters():
        # PEFT keeps LoRA weights in float32 whatever the base computes in: at a large rank they could outnumber a
        # quantized base's float weights
        if parameter.is_floating_point() and "lora_" not in name:
            sizes[parameter.dtype] = sizes.get(parameter.dtype, 0) + parameter.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32


def runnable_on_meta(model: nn.Module) -> nn.Module:
    """``model``, built on ``meta``, made able to run there: experts run as one grouped matmul (transformers 5's default
    for mixture-of-experts models), whose meta kernel takes bf16 only, are cast to it. FLOP counts do not depend on
    dtype, and the per-expert loop that would take float32 picks experts from the data, which meta tensors do not hold.
    """
    if getattr(model.config, "_experts_implementation", None) == "grouped_mm":
        model.to(torch.bfloat16)
    return model


def fake_twin(tuner, model_class: type[nn.Module]):
    """:func:`weightless_twin` made of fake tensors on ``tuner``'s device, and the ``FakeTensorMode`` they belong to
    (inputs are made fake with it: :func:`fake_inputs`).

    Fake tensors hold no memory, like ``meta`` ones, but keep the device: kernels are chosen as on the real model
    (SDPA runs its fused CPU/CUDA op, whose backward FlopCounterMode counts as 2.5x its forward, where ``meta`` falls
    back to the math path and counts 2x), so the twin's profile is the real model's. Built on ``meta`` (PEFT's adapter
    injection needs real ``.to()`` moves), then every tensor is made fake on the device.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    twin = weightless_twin(tuner, model_class)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _make_fake(twin, mode, inputs_device(tuner.model))  # where the model computes (not an offloaded weight's meta)
    return twin, mode


def checkpointed_blocks(model: nn.Module) -> set[str]:
    """Names (without wrappers' path parts) of the modules ``model`` checkpoints: wrapped for activation
    checkpointing (an FSDP config, ``apply_activation_checkpointing``) or checkpointed by transformers
    (``gradient_checkpointing``)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return {
        unwrapped_name(name)
        for name, module in model.named_modules()
        if isinstance(module, CheckpointWrapper) or getattr(module, "gradient_checkpointing", False) is True
    }


def mirror_modes(model: nn.Module, twin: nn.Module) -> None:
    """Give ``twin`` (same architecture) the train/eval modes and the checkpointed blocks of ``model`` (possibly
    wrapped or sharded), module by module.

    Not through ``gradient_checkpointing_enable``, which would also turn the twin's KV cache off and send
    transformers' mask code into data-dependent checks that ``meta`` tensors cannot run.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    checkpointed = checkpointed_blocks(model)
    originals = {unwrapped_name(name): module for name, module in model.named_modules()}
    for name, module in twin.named_modules():
        original = originals.get(name)
        module.training = module.training if original is None else original.training
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = name in checkpointed
            # as the model's layer checkpoints (a selective policy included), or plainly where a wrapper checkpoints it
            keywords = non_reentrant_keywords(original if original is not None else module)
            module._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, **keywords)


def fake_inputs(batch: Mapping[str, Any], mode) -> dict[str, Any]:
    """``batch`` for a twin made by :func:`fake_twin`: every tensor made fake on its device, except those whose values
    decide what a step computes, which keep them (``VALUED_INPUTS``): the input ids and token types (vision-language
    models count and index their image tokens by them), the labels (a sparse LM head projects the labelled rows), the
    inputs that delimit attention's sequences (``SPAN_INPUTS``), and what says how a vision or audio encoder cuts its
    input (image grids and sizes, the images themselves, clip masks).

    transformers and flash attention read those values (``attention_mask.all()``, the packed-sequence test on
    ``position_ids``), which a fake tensor cannot answer. So the twin runs outside ``mode``: ops on its fake weights
    and activations still run fake (a fake tensor dispatches to its own mode), while ops on real inputs alone run for
    real on these few small tensors.
    """
    return {
        k: v if k in VALUED_INPUTS or not isinstance(v, torch.Tensor) else mode.from_tensor(v) for k, v in batch.items()
    }


@contextmanager
def twin_runs(model: nn.Module) -> Iterator[None]:
    """Profiling ``model``'s weightless twin: a forward that reads the values of a tensor it computes (an audio
    language model keeping the frames its mask selects from the features its encoder made: Qwen2-Audio, Qwen3-ASR)
    cannot run on fake tensors, and is refused with what to do instead of torch's error."""
    try:
        yield
    except (DataDependentOutputException, DynamicOutputShapeException) as error:
        raise NotImplementedError(
            f"GreenTrainer prices full fine-tuning of this {type(model).__name__} on a weightless twin (its base is "
            "quantized, or sharded by FSDP2), and its forward reads the values of a tensor it computes, which a twin "
            f"without weights does not have ({type(error).__name__}: {error}). Load the base "
            "unquantized and unsharded to train it with GreenTrainer, or train it with plain LoRA (peft.LoraConfig)."
        ) from error


def _make_fake(module: nn.Module, mode, device: torch.device) -> None:
    """Replace each ``meta`` parameter and buffer of ``module`` by a fake tensor on ``device`` (tied ones stay tied)."""
    fakes: dict[int, torch.Tensor] = {}

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in fakes:
            value = mode.fake_tensor_converter.from_meta_and_device(mode, tensor.detach(), device)
            if isinstance(tensor, nn.Parameter):
                value = nn.Parameter(value, requires_grad=tensor.requires_grad)
            fakes[id(tensor)] = value
        return fakes[id(tensor)]

    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None and tensor.device.type == "meta":
                    store[name] = fake(tensor)
