"""FSDP2 (``torch.distributed.fsdp.fully_shard``): GreenTrainer on parameters sharded across processes.

FSDP2 replaces every parameter of a sharded module by a ``DTensor`` that holds this rank's shard (``.to_local()``), and
swaps all-gathered, unsharded copies in for each forward and backward. Freezing stays per tensor (a frozen shard stays
a plain frozen parameter, and FSDP copies ``requires_grad`` onto the unsharded parameter at every all-gather), so
selections work as they do without sharding. Three parts of GreenTrainer cannot run on the shards themselves:

* **The cost profile** is one forward pass over the registered parameters, which FSDP2 refuses outside its own forward
  ("got mixed torch.Tensor and DTensor"). It is measured on a non-sharded twin of the model made of fake tensors on
  the real device (no memory, no data; ``meta`` would run other attention kernels, see :func:`_twin`), with the same
  ``GreenTrainerConfig``, the same train / eval modes and the same checkpointed blocks (activation checkpointing from
  the FSDP config wraps blocks in ``CheckpointWrapper``, which the twin reproduces with transformers' own non-reentrant
  checkpointing).
* **Importance** needs the gradient of the global batch. ``torch.autograd.grad`` cannot reach the sharded parameters
  (the graph holds the unsharded copies), so each importance batch runs ``.backward()`` through the FSDP root: FSDP
  reduce-scatters the gradient, each rank receives the global batch's gradient for its shard, and ``-sum(g * delta_w)``
  is summed over the local shard with the optimizer's own state shard (``optimizer_update`` on DTensors is elementwise,
  so it stays local). One all-reduce of these partial sums gives every rank the exact importance of every unit; no
  gradient is gathered in full. ``.grad`` and ``requires_grad`` are restored afterwards.
* **Names**: activation checkpointing inserts ``_checkpoint_wrapped_module.`` into parameter and module names, not
  into state dict keys. Units keep the names of the unwrapped model (as accelerate's ``fsdp2_canonicalize_names`` maps
  them), which still resolve through the wrappers and match the twin and the state dicts; PEFT's LoRA key lookup, by
  module name, runs with the wrappers taken off (:func:`without_checkpoint_wrappers`).

What ``FlopCounterMode`` sees under FSDP2: each rank's own compute on its local batch over the unsharded parameters,
identical on every rank (the same as DDP). All-gathers and reduce-scatters move data and count no FLOPs. So the
budget is per rank, and a rank's count is what the profile predicts for the per-device batch.

Saving: :func:`save_adapter` gathers only the adapter's tensors (one all-gather each, all ranks take part) and rank 0
writes them atomically as a normal adapter that ``PeftModel.from_pretrained`` loads in one process. Trainer
checkpoints go through accelerate and ``torch.distributed.checkpoint``; :func:`prepare_checkpoint` makes them hold every
unit (also those trained earlier and frozen now) and an optimizer state for every parameter, which resuming requires.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from . import ranks
from .engine.importance import NO_LOSS, clip_coefficient, squared_norm
from .engine.optimizer_params import unwrap_optimizer
from .engine.optimizer_update import optimizer_update
from .engine.profile import LossFn
from .engine.rng import fork_rng
from .engine.units import Unit, is_trainable_storage, unwrapped_name
from .sparse_head import attached_sparse_lm_head
from .twin import checkpointed_blocks, fake_inputs, fake_twin, mirror_modes, twin_runs

logger = logging.getLogger(__name__)

__all__ = [
    "attach",
    "canonical_name",
    "canonical_units",
    "compute_importance",
    "configured_version",
    "full_adapter_state_dict",
    "is_sharded",
    "save_adapter",
]

_ROOT_KEY = "_greentrainer_fsdp_root"
_FLAGS_KEY = "_greentrainer_fsdp_checkpoint_flags"
_TWIN_KEY = "_greentrainer_fsdp_twin"


# ------------------------------------------------------------------------------------------------ detection
def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2-sharded (``DTensor``) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def configured_version(args: Any = None) -> int | None:
    """The FSDP version the job is configured for (Trainer arguments or ``accelerate launch``), None without FSDP."""
    if args is not None and getattr(args, "fsdp", None):
        plugin = getattr(args, "fsdp_plugin_args", None) or {}
        config = getattr(args, "fsdp_config", None)
        config = config if isinstance(config, Mapping) else {}
        version = plugin.get("fsdp_version", config.get("version", config.get("fsdp_version", 2)))
        return int(version)
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if AcceleratorState._shared_state and getattr(AcceleratorState(), "distributed_type", None) == DistributedType.FSDP:
        return int(getattr(AcceleratorState().fsdp_plugin, "fsdp_version", 1))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        return int(os.environ.get("FSDP_VERSION", "1"))  # the version accelerate builds its plugin with from the env
    return None


def unsharded_class(module: nn.Module) -> type:
    """The class ``module`` had before ``fully_shard`` (which swaps in a subclass of ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if not issubclass(cls, FSDPModule):
        return cls
    return next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))


def canonical_name(name: str) -> str:
    """``name`` without the path parts that wrappers insert (activation checkpointing, ``torch.compile``)."""
    return unwrapped_name(name)


def canonical_units(units: Iterable[Unit]) -> list[Unit]:
    """``units`` named as in the unwrapped model; those names still resolve through the wrappers."""
    return [
        Unit(
            name=canonical_name(u.name),
            param_names=tuple(map(canonical_name, u.param_names)),
            aliases=tuple(map(canonical_name, u.aliases)),
        )
        for u in units
    ]


@contextmanager
def without_checkpoint_wrappers(model: nn.Module) -> Iterator[None]:
    """While active, every activation-checkpointing wrapper in ``model`` is replaced by the module it wraps.

    PEFT finds a LoRA adapter's state dict keys by module names, which under the FSDP config's activation
    checkpointing contain ``_checkpoint_wrapped_module.`` while the state dict's keys do not (the wrapper strips them):
    saving would drop the adapters of every wrapped layer, and loading would not find them. Nothing runs a forward
    meanwhile; the wrappers (and FSDP's state on them) are put back as they were.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper

    swapped = []
    try:
        found = True
        while found:  # nested wrappers (offloading around checkpointing) come off one level per pass
            found = False
            for module in list(model.modules()):
                for name, child in list(module._modules.items()):
                    if isinstance(child, ActivationWrapper):
                        module._modules[name] = child._checkpoint_wrapped_module
                        swapped.append((module, name, child))
                        found = True
        yield
    finally:
        for module, name, child in reversed(swapped):
            module._modules[name] = child


# ------------------------------------------------------------------------------------------------ set-up
def check_model(model: nn.Module) -> None:
    """Refuse what GreenTrainer cannot do under FSDP2, before any data is loaded."""
    quantized = [n for n, p in model.named_parameters() if not is_trainable_storage(p)]
    if quantized:
        raise NotImplementedError(
            f"GreenTrainer under FSDP2 needs a floating-point base model, but {len(quantized)} parameter(s) are "
            f"quantized (e.g. {quantized[0]}): their costs can only be measured on the real, unsharded kernels. Train "
            "a quantized base with DDP (remove `fsdp=...`), or shard an unquantized (e.g. bf16) base with FSDP2."
        )
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        if isinstance(param, DTensor) and param.device_mesh.ndim != 1:
            raise NotImplementedError(
                f"GreenTrainer supports FSDP2 on a 1-D device mesh (plain sharding); {name} is placed on a "
                f"{param.device_mesh.ndim}-D mesh (HSDP or tensor parallelism). Use a 1-D mesh."
            )


def attach(tuner, root: nn.Module) -> None:
    """Tell ``tuner`` (the GreenTrainer model) that ``root`` is the FSDP2 root its forward passes must enter.

    FSDP2 requires every forward to start at the root module (the first forward decides which module is the root).
    :class:`~peft_greentrainer.GreenTrainerCallback` calls this with the Trainer's model; a plain loop calls
    ``attach(model.base_model, model)`` once after ``fully_shard``. Raises for what GreenTrainer cannot do under FSDP2.
    """
    check_model(tuner.model)
    _dense_lm_head(tuner.model)
    _check_checkpointed_blocks(tuner.model, _twin(tuner)[0].model)
    tuner.model.__dict__[_ROOT_KEY] = weakref.ref(root)


def _dense_lm_head(model: nn.Module) -> None:
    """The sparse LM head stays off under FSDP2: the cost profile runs on fake tensors, whose labels have no values
    to say which positions the head may skip, so the step must run the dense head the profile counts."""
    head = attached_sparse_lm_head(model)
    if head is not None and head.enabled:
        head.enabled = False
        logger.info("GreenTrainer: the sparse LM head is not used under FSDP2 (the dense head runs and is budgeted).")


def _root(model: nn.Module) -> nn.Module:
    reference = model.__dict__.get(_ROOT_KEY)
    root = reference() if reference is not None else None
    if root is None:
        raise RuntimeError(
            "GreenTrainer found FSDP2-sharded parameters but does not know the FSDP root module, through which every "
            "forward pass must run. GreenTrainerCallback finds it by itself; in a plain loop call "
            "peft_greentrainer.fsdp.attach(model.base_model, model) once after fully_shard."
        )
    return root


# ------------------------------------------------------------------------------------------------ cost profile
def measure_on_twin(tuner, batch: Mapping[str, Any], loss_fn: LossFn):
    """``tuner._measure`` on the non-sharded fake twin, set to the modes and checkpointing of the real model."""
    twin, mode = _twin(tuner)
    _dense_lm_head(twin.model)
    _check_checkpointed_blocks(tuner.model, twin.model)
    mirror_modes(tuner.model, twin.model)
    with twin_runs(tuner.model):
        return twin._measure(fake_inputs(batch, mode), loss_fn)


def _twin(tuner):
    """The same architecture and GreenTrainer config as ``tuner``, unsharded, made of fake tensors on the real device
    (:func:`~peft_greentrainer.twin.fake_twin`): the profile predicts the real step exactly, with no memory."""
    if _TWIN_KEY not in tuner.__dict__:
        tuner.__dict__[_TWIN_KEY] = fake_twin(tuner, unsharded_class(tuner.model))
    return tuner.__dict__[_TWIN_KEY]


def _check_checkpointed_blocks(model: nn.Module, twin: nn.Module) -> None:
    twins = dict(twin.named_modules())
    for name in checkpointed_blocks(model):
        if not isinstance(twins.get(name), GradientCheckpointingLayer):
            raise NotImplementedError(
                f"Activation checkpointing wraps {name!r}, which is not a transformers decoder/encoder layer "
                "(GradientCheckpointingLayer): GreenTrainer cannot predict what its recompute costs. Let the FSDP "
                "config wrap the model's transformer layer class (`transformer_layer_cls_to_wrap`)."
            )


# ------------------------------------------------------------------------------------------------ importance
def compute_importance(
    model: nn.Module,
    units: Sequence[Unit],
    batches: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    loss_fn: LossFn | None = None,
    candidates: np.ndarray | Sequence[bool] | None = None,
    lr: float | None = None,
    group_lrs: Sequence[float | None] | None = None,
    max_grad_norm: float | None = None,
) -> np.ndarray:
    """:func:`~peft_greentrainer.engine.importance.compute_importance` for an FSDP2-sharded ``model``.

    The same ``I_u = -sum(g_u * delta_w_u)``, with ``g_u`` the gradient of the global batch averaged over ``batches``
    (each rank passes its share of each global batch, as with DDP), computed on the local shards and summed across
    ranks with one all-reduce (module docstring). The result is identical on every rank. Parameters, ``.grad``,
    ``requires_grad``, optimizer state and RNG are left as they were. Every rank must call it with as many batches.
    """
    from peft_greentrainer.engine.profile import default_loss

    root = _root(model)
    units = list(units)
    mask = np.ones(len(units), dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool).reshape(-1)
    if mask.shape != (len(units),):
        raise ValueError(f"candidates has {mask.size} entries but there are {len(units)} units")
    if optimizer is None and lr is None:
        raise ValueError("compute_importance needs either an optimizer or `lr` (for delta_w = -lr * grad)")
    loss_fn = loss_fn or default_loss
    tensors = {id(p): p for u, unit in enumerate(units) if mask[u] for p in unit.parameters(model)}
    tensors = {key: p for key, p in tensors.items() if is_trainable_storage(p)}
    local = np.zeros(len(units), dtype=np.float64)
    if tensors:
        count = _accumulate_gradients(root, list(tensors.values()), batches, loss_fn)
        try:
            clip = _clip_coefficient(list(tensors.values()), count, max_grad_norm)
            with _each_warning_once(logging.getLogger("peft_greentrainer.engine.optimizer_update")):
                for u, unit in enumerate(units):
                    seen = set()
                    for param in unit.parameters(model):
                        if id(param) not in tensors or id(param) in seen:
                            continue
                        seen.add(id(param))
                        local[u] -= _local_inner_product(param, count, optimizer, lr, group_lrs, clip)
        finally:
            for param in tensors.values():
                param.grad = None
            _restore_grads(root)
    return _sum_across_ranks(local, next(iter(tensors.values()), None))


def _accumulate_gradients(
    root: nn.Module, tensors: list[nn.Parameter], batches: Iterable[Mapping[str, Any]], loss_fn: LossFn
) -> int:
    """Run ``.backward()`` on every batch with only ``tensors`` trainable; FSDP leaves the sum of the global batches'
    gradients in their (sharded) ``.grad``. The previous ``.grad`` and flags are kept on the root for restoring."""
    params = list(root.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    root.__dict__["_greentrainer_saved_grads"] = saved
    count = 0
    try:
        for param in params:
            param.requires_grad_(False)
            param.grad = None
        for param in tensors:
            param.requires_grad_(True)
        if hasattr(root, "set_requires_gradient_sync"):
            root.set_requires_gradient_sync(True)  # a plain loop may have left it off for accumulation
        with fork_rng(), torch.enable_grad():
            for batch in batches:
                loss = loss_fn(root, batch)
                if loss is None:
                    raise ValueError(NO_LOSS)
                if loss.numel() != 1:
                    raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
                count += 1
                if loss.requires_grad:  # the same on every rank: the same units feed the same model
                    loss.reshape(()).backward()
                del loss
    except BaseException:
        _restore_grads(root)
        raise
    if count == 0:
        _restore_grads(root)
        raise ValueError("batches is empty: at least one batch is needed to estimate gradients")
    return count


def _restore_grads(root: nn.Module) -> None:
    for param, flag, grad in root.__dict__.pop("_greentrainer_saved_grads", []):
        param.requires_grad_(flag)
        param.grad = grad


def _local_inner_product(
    param: nn.Parameter,
    count: int,
    optimizer: torch.optim.Optimizer | None,
    lr: float | None,
    group_lrs: Sequence[float | None] | None = None,
    clip: float = 1.0,
) -> float:
    """``sum(g * delta_w)`` over this rank's shard of ``param`` (the gradient averaged over ``count`` batches; the
    update from that gradient times ``clip``, as clipping scales it before the step)."""
    from torch.distributed.tensor import DTensor

    grad = _mean_gradient(param, count)
    delta = optimizer_update(param, grad if clip == 1.0 else grad * clip, optimizer, lr=lr, group_lrs=group_lrs)
    if isinstance(grad, DTensor):
        grad, delta = grad.to_local(), delta.to_local()
    return float(torch.dot(grad.reshape(-1), delta.reshape(-1).to(grad.dtype)))


def _mean_gradient(param: nn.Parameter, count: int) -> torch.Tensor:
    """``param``'s gradient summed over ``count`` batches, as their mean in (at least) float32."""
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    return grad.to(torch.promote_types(grad.dtype, torch.float32)) / count


def _clip_coefficient(params: list[nn.Parameter], count: int, max_grad_norm: float | None) -> float:
    """The clipping factor of the candidates' mean gradients: their squared norm summed over the sharding mesh."""
    from torch.distributed.tensor import DTensor

    if max_grad_norm is None or not max_grad_norm > 0:
        return 1.0
    local = [g.to_local() if isinstance(g, DTensor) else g for g in (_mean_gradient(p, count) for p in params)]
    total = _sum_across_ranks(np.array([squared_norm(local)]), params[0])
    return clip_coefficient(float(total[0]), max_grad_norm)


def _sum_across_ranks(local: np.ndarray, param: nn.Parameter | None) -> np.ndarray:
    """The sum over the ranks that hold shards of ``param`` (the whole sharding mesh) of ``local``."""
    from torch.distributed.tensor import DTensor

    if not (dist.is_available() and dist.is_initialized()):
        return local
    group = param.device_mesh.get_group() if isinstance(param, DTensor) else None
    total = torch.as_tensor(local, dtype=torch.float64, device=ranks.collective_device(group))
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.cpu().numpy()


@contextmanager
def _each_warning_once(log: logging.Logger) -> Iterator[None]:
    """Let each distinct message through ``log`` once (the optimizer mirror warns per tensor)."""
    seen: set[str] = set()

    def first_time(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in seen:
            return False
        seen.add(message)
        return True

    log.addFilter(first_time)
    try:
        yield
    finally:
        log.removeFilter(first_time)


# ------------------------------------------------------------------------------------------------ saving
def holds_shards(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` holds FSDP2 shards (a sharded checkpoint) rather than full tensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in state_dict.values())


def full_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors of the adapter of ``model`` (the FSDP root), on the CPU of rank 0; ``{}`` on the
    other ranks. Every rank must call it. Only the tensors the adapter holds are gathered, one at a time."""
    from peft.utils import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    sharded = model.state_dict()
    # PEFT (and GreenTrainer's tensor units) pick the adapter's keys from local views, as from a full state dict
    local = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in sharded.items()}
    adapter = get_peft_model_state_dict(model, state_dict=local, adapter_name=model.active_adapter)
    rename = type(model.base_model)._remove_adapter_name_from_key
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    full = {}
    for key in (k for k in sharded if rename(k, model.active_adapter) in adapter):  # the same order on every rank
        value = sharded[key]
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if rank == 0:
            full[key] = value.detach().to("cpu", copy=True)
    return full


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save the adapter of an FSDP2-sharded ``model`` (the root, e.g. ``trainer.model``): gathered on rank 0 and written
    atomically (complete or absent), in the format ``PeftModel.from_pretrained`` loads on one process.

    Every rank must call it; ``kwargs`` go to ``save_pretrained``.
    """
    from .saving import write_atomically

    state_dict = full_adapter_state_dict(model)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    error = None
    if rank == 0:
        try:
            write_atomically(
                save_directory, lambda d: model.save_pretrained(d, state_dict=state_dict, **kwargs), keep_others=True
            )
        except Exception as caught:  # the other ranks must not wait forever at the barrier
            error = caught
    if dist.is_available() and dist.is_initialized():
        failed = [error is not None]
        dist.broadcast_object_list(failed, src=0)
        if failed[0] and error is None:
            raise RuntimeError(f"Rank 0 could not save the adapter to {save_directory}; see its error.")
    if error is not None:
        raise error


# Optimizers whose first step from a zero gradient at lr 0 changes no parameter and whose fresh state is all zeros
_ZERO_INIT_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def prepare_checkpoint(tuner, optimizer: torch.optim.Optimizer | None) -> None:
    """Before a Trainer checkpoint of an FSDP2 model: make it hold every unit and every optimizer state it will need.

    * Every candidate requires grad while the checkpoint is written: accelerate's adapter checkpoint under
      ``FULL_STATE_DICT`` keeps only parameters that require grad (``ignore_frozen_params``), which would drop units
      trained earlier and frozen now. No gradient exists between optimizer steps, so nothing trains.
    * Every parameter of the optimizer gets a state: resuming, ``torch.distributed.checkpoint`` initialises the state
      of every trainable parameter and then requires each one in the checkpoint, but units a selection never trained
      have none. They get their fresh state (zero moments, step 0, as a first step would create it), which is
      removed again after the checkpoint (:func:`finish_checkpoint`) and after resuming (:func:`finish_resume`).

    Undone by :func:`finish_checkpoint`; does nothing unless ``tuner`` is sharded.
    """
    if _FLAGS_KEY in tuner.__dict__ or not is_sharded(tuner.model):
        return
    params = [p for unit in tuner.candidate_units() for p in unit.parameters(tuner.model)]
    flags = [(p, p.requires_grad) for p in params]
    for param in params:
        param.requires_grad_(True)
    inner = unwrap_optimizer(optimizer)
    tuner.__dict__[_FLAGS_KEY] = (flags, inner, _add_fresh_states(inner) if inner is not None else [])


def finish_checkpoint(tuner) -> None:
    """Undo :func:`prepare_checkpoint`: the selection's flags and the optimizer state as they were."""
    flags, optimizer, added = tuner.__dict__.pop(_FLAGS_KEY, ([], None, []))
    for param, flag in flags:
        param.requires_grad_(flag)
    for param in added:
        optimizer.state.pop(param, None)


def finish_resume(optimizer: torch.optim.Optimizer | None) -> None:
    """After resuming from a checkpoint: drop the fresh states :func:`prepare_checkpoint` saved (step 0), so that
    memory and the trained tensors are as in the uninterrupted run (an optimizer recreates them at its first step).

    Loading gives every parameter that required grad a state (the checkpoint holds one for each); a parameter without
    one did not require grad then, and its saved state was not loaded: that is warned about.
    """
    inner = unwrap_optimizer(optimizer)
    if inner is None or type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
        return
    skipped = sum(1 for group in inner.param_groups for p in group["params"] if not inner.state.get(p))
    if skipped:
        logger.warning(
            "GreenTrainer resumed without the optimizer state of %d tensor(s): torch.distributed.checkpoint loads "
            "the state of parameters that require grad when training resumes only. Keep every candidate trainable "
            "until Trainer.train() starts (do not freeze units before it).",
            skipped,
        )
    for param, state in list(inner.state.items()):
        step = state.get("step")
        if step is not None and float(step) == 0:
            del inner.state[param]


def _add_fresh_states(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Give every parameter of ``optimizer`` without state its fresh state, through one step at lr 0 from zero
    gradients on those parameters only (how ``torch.distributed.checkpoint`` initialises states), zeroed afterwards."""
    missing = [p for group in optimizer.param_groups for p in group["params"] if not optimizer.state.get(p)]
    if not missing:
        return []
    if type(optimizer) not in _ZERO_INIT_OPTIMIZERS:
        raise NotImplementedError(
            f"A Trainer checkpoint of an FSDP2 model needs an optimizer state for every unit, and GreenTrainer can "
            f"create the fresh state of torch.optim.Adam, AdamW and SGD only, not {type(optimizer).__name__}. Use "
            "one of those optimizers, or save_strategy='no' and peft_greentrainer.fsdp.save_adapter at the end."
        )
    grads = [(p, p.grad) for group in optimizer.param_groups for p in group["params"]]
    rates = [(group, group["lr"]) for group in optimizer.param_groups]
    try:
        for param, _ in grads:
            param.grad = torch.zeros_like(param) if any(param is m for m in missing) else None
        for group, rate in rates:
            group["lr"] = torch.zeros_like(rate) if isinstance(rate, torch.Tensor) else 0.0
        optimizer.step()
    finally:
        for group, rate in rates:
            group["lr"] = rate
        for param, grad in grads:
            param.grad = grad
    for param in missing:
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor):
                value.zero_()  # a fresh state: Adam's L2 weight decay put the weights into the moments
    return [p for p in missing if optimizer.state.get(p)]
