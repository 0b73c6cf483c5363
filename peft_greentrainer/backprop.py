"""Keep autograd from backpropagating below the deepest selected unit.

Two common settings silently force backprop down to the input embeddings, whatever is frozen, and so throw
GreenTrainer's savings away (measured in ``benchmarks/bench_kbit.py``):

* *Forced input gradients.* ``model.enable_input_require_grads()`` hooks the input embedding so its output requires
  grad. ``peft.prepare_model_for_kbit_training``, transformers' ``gradient_checkpointing_enable`` (for any model whose
  main input is ``input_ids``) and ``PeftModel.__init__`` (when checkpointing is on) all install it; a second call
  leaks a hook that ``disable_input_require_grads()`` cannot remove any more.
* *Audio feature encoders' own input gradient.* transformers' convolutional feature encoders (wav2vec2, HuBERT,
  WavLM, SEW, UniSpeech, Data2VecAudio, SpeechT5, ...) set ``requires_grad`` on their input in training, for
  reentrant checkpointing, unless ``freeze_feature_encoder()`` cleared their ``_requires_grad`` flag: every step then
  backpropagates through the whole encoder to the waveform (measured 0.81 of full fine-tuning at rho 0.5).
* *Reentrant checkpointing* (the default of ``prepare_model_for_kbit_training``) needs those input gradients: a
  reentrant checkpointed block whose inputs do not require grad passes no gradient to the parameters inside it.

We remove every such hook, clear every such flag (the encoder's parameters stay trainable units: their gradients need
no input gradient) and switch checkpointed blocks to non-reentrant checkpointing, which gives trainable
parameters inside a block their gradients without any input gradient, and lets frozen blocks below the deepest
selected unit be neither recomputed nor backpropagated.

A third setting stops backprop altogether: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for fast
inference the first time its layer runs in eval mode without gradients (an evaluation, ``generate``) and keeps it so;
the packed matmul has no backward, so every later training step gets no gradient below that layer (or crashes). We
unpack such weights before training, as bitsandbytes itself does before saving.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .engine.checkpointing import non_reentrant_keywords
from .engine.module_tree import ModuleTree

logger = logging.getLogger(__name__)

# transformers' PreTrainedModel.enable_input_require_grads and PEFT's fallback in prepare_model_for_kbit_training
INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


def remove_forced_input_grads(model: nn.Module, tree: ModuleTree | None = None) -> int:
    """Remove every forward hook that makes a module's output require grad, and clear every feature encoder's flag
    that makes its input require grad; return how many were removed.
    ``tree``: ``model``'s modules, listed before (it runs before every training step)."""
    removed = 0
    for module in (tree or ModuleTree(model)).modules:
        if forces_input_grad(module):
            module._requires_grad = False  # what freeze_feature_encoder() clears, without freezing the parameters
            removed += 1
        if forces_bias_grad(module):
            module.gradient_checkpointing = False  # its only use; the blocks holding it stay checkpointed
            removed += 1
        if module._forward_hooks:  # most modules have none
            for key, hook in list(module._forward_hooks.items()):
                if getattr(hook, "__name__", "") in INPUT_GRAD_HOOKS:
                    del module._forward_hooks[key]
                    removed += 1
        # a plain attribute (enable_input_require_grads sets it), in __dict__: hasattr would raise and catch an
        # AttributeError in nn.Module.__getattr__ for every other module
        if "_require_grads_hook" in module.__dict__:
            del module._require_grads_hook  # its handle would now point at nothing
    return removed


def forces_input_grad(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers feature encoder that sets ``requires_grad`` on its input in training
    (``if self._requires_grad and self.training: hidden_states.requires_grad = True``, which its
    ``_freeze_parameters`` turns off)."""
    # read from __dict__: getattr would raise and catch an AttributeError in nn.Module.__getattr__ for most modules
    return module.__dict__.get("_requires_grad") is True and callable(getattr(type(module), "_freeze_parameters", None))


def forces_bias_grad(module: nn.Module) -> bool:
    """Whether ``module`` is a T5-style attention (T5, mT5, LongT5, UDOP, Pix2Struct, SwitchTransformers, Pop2Piano)
    that, checkpointed in training, makes the zero position bias of its layers without a relative bias require grad
    (``if self.gradient_checkpointing and self.training: position_bias.requires_grad = True``): the bias is shared by
    every layer, so each step backpropagated into every decoder layer's cross-attention (0.560 of full fine-tuning at
    rho 0.55 on a tiny T5, predicted 0.355)."""
    return "has_relative_attention_bias" in module.__dict__ and module.__dict__.get("gradient_checkpointing") is True


def make_checkpointing_non_reentrant(model: nn.Module, tree: ModuleTree | None = None) -> int:
    """Switch transformers' checkpointed layers to ``use_reentrant=False`` (and TRL's unapplied ``selective`` flag to
    its policy: :func:`~peft_greentrainer.engine.checkpointing.non_reentrant_keywords`); return how many layers
    were reentrant."""
    switched = 0
    for _, module in (tree or ModuleTree(model)).checkpointing_layers:
        if not module.gradient_checkpointing:
            continue
        function = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(function, "keywords", None) or {}
        reentrant = not isinstance(function, functools.partial) or keywords.get("use_reentrant") is not False
        if reentrant or "selective" in keywords:
            # through the layer's own function: transformers' activation offloading wraps torch's checkpoint in one
            through = function.func if isinstance(function, functools.partial) else torch.utils.checkpoint.checkpoint
            module._gradient_checkpointing_func = functools.partial(through, **non_reentrant_keywords(module))
            switched += reentrant
    return switched


def unpack_weights_packed_for_inference(model: nn.Module, tree: ModuleTree | None = None) -> int:
    """Give bitsandbytes' 4-bit weights packed for CPU inference their trainable layout back; return how many."""
    unpacked = 0
    for module in (tree or ModuleTree(model)).quantized_weight_holders:
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if not getattr(state, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # its own unpacking (bnb 0.50)

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        unpacked += 1
    return unpacked


def keep_backprop_shallow(model: nn.Module, quiet: bool = False, tree: ModuleTree | None = None) -> None:
    """Remove forced input gradients and reentrant checkpointing; say what was changed and why. ``tree``: ``model``'s
    modules, listed before."""
    tree = tree or ModuleTree(model)
    hooks = remove_forced_input_grads(model, tree)
    blocks = make_checkpointing_non_reentrant(model, tree)
    if (hooks or blocks) and not quiet:
        # once per model: TRL's DPO switches checkpointing off and on around every reference forward, putting the
        # hook back each time
        said_before = model.__dict__.setdefault("_greentrainer_told_backprop_fix", False)
        model.__dict__["_greentrainer_told_backprop_fix"] = True
        (logger.debug if said_before else logger.warning)(
            "GreenTrainer removed %d forced input-gradient hook(s) or feature-encoder flag(s) (_requires_grad) and "
            "switched %d checkpointed block(s) to non-reentrant checkpointing: each would force backprop down to the "
            "inputs and discard the savings. Trainable parameters still get their gradients (non-reentrant "
            "checkpointing needs no input gradient).",
            hooks,
            blocks,
        )
