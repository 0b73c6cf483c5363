"""Backward-cost profile of any ``nn.Module``, measured rather than derived from per-architecture formulas.

One forward pass runs under a recording dispatch mode nested in ``FlopCounterMode``. For every aten op it notes

* the forward FLOPs FlopCounterMode charges to it (so the profile agrees with every FLOP measurement),
* which inputs are *parameters* (directly, or through views and casts such as ``weight.t()`` or an autocast copy),
  and which are *activations* (tensors computed from some parameter, the only ones that can carry a gradient),
* its position in execution order.

The backward FLOPs of each op with forward FLOPs are then measured by replaying that single op on the ``meta``
device under autograd and FlopCounterMode, once per distinct signature (so a 32-layer model replays a handful of ops):
``dy`` is the cost of the gradients of its activation inputs, ``dw[p]`` the cost of the gradient of parameter ``p``.

Why this predicts autograd: autograd computes the gradient of an op's input ``x`` exactly when some trainable
parameter was used to compute ``x``. Each activation carries ``latest``, the index of the latest op that consumed a
parameter among its ancestors. If the deepest selected unit (in backward order: the earliest used) is first used at
op ``k``, then every selected unit is used at or after ``k``, so ``x`` can need a gradient only if ``k <= latest(x)``.
Charging ``x``'s gradient exactly then never under-predicts (the budget is a promise), and it is exact on a chain of
residual blocks: ``k_proj``'s input does not pay when only ``q_proj`` of its layer is selected, and the encoder output
read by a decoder's cross-attention pays only when an encoder unit is selected. Encoder-decoder models need no
special case: the encoder runs first, so its units are deeper than every decoder unit and pay the decoder path.

An op is charged nothing backward when autograd would never reach it: the profiled forward records full fine-tuning's
graph, and ops no path leads to from the loss, the model's outputs, or what hooks and modules can keep of the forward
are left out, as a discarded final state is (``_Roots``).
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_map, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from .checkpointing import (
    SAVES_INPUTS_FIRST,
    SAVES_NOTHING,
    CheckpointCall,
    checkpoint_calls_followed,
    checkpoints_selectively,
    is_checkpointed,
    saves_attention_only,
    stops_early,
)
from .costs import UnitCosts
from .flops import (
    backward_may_count_without_forward,
    fused_attention_on_meta,
    is_attention_op,
    register_flop_formulas,
    uncounted_matmul_op,
)
from .module_tree import ModuleTree
from .rng import fork_rng
from .targets import labelled_counts
from .units import Unit, is_trainable_storage, parameter_aliases, requires_grad_kept

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]

# Ops that only describe a tensor; they never create a graph node.
_METADATA_OPS = {
    torch.ops.aten.size.default,
    torch.ops.aten.sym_size.int,
    torch.ops.aten.stride.default,
    torch.ops.aten.sym_stride.int,
    torch.ops.aten.numel.default,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.dim.default,
    torch.ops.aten.is_contiguous.default,
    torch.ops.aten.is_contiguous.memory_format,
    torch.ops.aten.storage_offset.default,
    torch.ops.aten.sym_storage_offset.default,
    torch.ops.prim.layout.default,
    torch.ops.prim.device.default,
}

# Zero-FLOP ops that only re-present a parameter (same values, other dtype/layout). A parameter reached through them
# is still "that parameter" for the next op, whose weight gradient is the one we must cost.
_PARAMETER_PASSTHROUGH = {
    torch.ops.aten._to_copy.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.lift_fresh.default,
    torch.ops.aten.detach.default,
}


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor | None:
    """The loss transformers models compute themselves when ``labels`` are in the batch (None without them: a profile
    only needs the forward pass; importance says what is missing)."""
    outputs = model(**batch)
    return outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    role: str  # "act", "const", or "param:<canonical name>"


@dataclass
class OpCost:
    """One executed op that touches a parameter or an activation."""

    index: int
    name: str
    forward: float
    dw: dict[str, float] = field(default_factory=dict)
    # (threshold, flops): activation-gradient work paid when the deepest selected unit is used at op <= threshold
    dy: list[tuple[int, float]] = field(default_factory=list)
    # (parameters, flops): gradient of an input computed from those parameters alone, paid when any of them trains
    derived: list[tuple[frozenset[str], float]] = field(default_factory=list)
    # what those gradients add to full fine-tuning's backward, computed together with the activations' (exact there)
    derived_full: float = 0.0
    # whether rho's reference counts it: a selective checkpoint's recompute may be none or all of its forward (its
    # policy saves some ops), so a unit is charged all of it and the reference none
    in_reference: bool = True

    @property
    def dy_flops(self) -> float:
        return sum(flops for _, flops in self.dy)


@dataclass
class CostProfile:
    """Measured FLOPs of one training step of a model on one batch shape.

    Attributes:
        forward_flops: FLOPs of the forward pass, as FlopCounterMode counts them.
        full_backward_flops: Backward FLOPs with every parameter trainable (full fine-tuning).
        ops: The ops that carry a gradient, in execution order.
        first_use: Canonical parameter name -> index of the first op that consumes it.
        t_dw: Canonical parameter name -> FLOPs of its weight gradient, summed over all its uses (tied weights).
        forward_share: Canonical parameter name -> forward FLOPs of the ops that consume it.
        derived: (parameter names, FLOPs): gradients of tensors computed from parameters alone (a weight with a LoRA
            delta folded in, a tied weight with trainable token rows): paid when any of those parameters trains.
        scales_with_rows: False where an op counts FLOPs on parameters alone (``B @ A`` folded into a weight,
            DeBERTa's relative position projections), whose cost does not grow with the batch's rows (ops that read
            no parameter and no activation are not followed: on the models seen they count none).
    """

    forward_flops: float
    full_backward_flops: float
    ops: list[OpCost]
    first_use: dict[str, int]
    t_dw: dict[str, float]
    forward_share: dict[str, float]
    derived: list[tuple[frozenset[str], float]] = field(default_factory=list)
    scales_with_rows: bool = True

    @property
    def full_flops(self) -> float:
        """Forward plus full backward: the denominator of ``rho``."""
        return self.forward_flops + self.full_backward_flops

    def unit_costs(self, units: Iterable[Unit], full_flops: float | None = None) -> UnitCosts:
        """Aggregate tensor costs into unit costs, sorted into backward order.

        Units none of whose tensors is used in the forward pass cannot be trained and are dropped (with a warning).
        ``full_flops`` overrides the reference cost (e.g. the base model's full fine-tuning for LoRA units).
        """
        placed: list[tuple[int, Unit]] = []
        for unit in units:
            uses = [self.first_use[n] for n in unit.param_names if n in self.first_use]
            if uses:
                placed.append((min(uses), unit))
            else:  # the tuner freezes such units (it cannot cost them) and says so once
                logger.debug("Unit %s is not used in the forward pass; it is never selected.", unit.name)
        # Backward order: latest first use first. A stable sort keeps model order among units of one op.
        placed.sort(key=lambda item: -item[0])
        positions = np.array([p for p, _ in placed], dtype=np.int64)
        ordered = [u for _, u in placed]

        events = sorted(event for op in self.ops for event in op.dy)
        thresholds = np.array([t for t, _ in events], dtype=np.int64)
        suffix = np.concatenate([np.cumsum([f for _, f in events][::-1])[::-1], [0.0]])

        def dy_above(position: int) -> float:
            """Activation-gradient FLOPs when the deepest selected unit is first used at op ``position``."""
            return float(suffix[np.searchsorted(thresholds, position, side="left")])

        above = np.array([dy_above(p) for p in positions], dtype=np.float64)
        dy_head = float(above[0]) if len(above) else 0.0
        below_next = np.append(above[1:], dy_above(-1)) if len(above) else above
        t_dy = below_next - above
        t_dw = np.array([sum(self.t_dw.get(n, 0.0) for n in u.param_names) for u in ordered], dtype=np.float64)
        for j, unit in enumerate(ordered):  # once per unit that holds any of the parameters (more: never less)
            names = set(unit.param_names)
            t_dw[j] += sum(flops for sources, flops in self.derived if not names.isdisjoint(sources))
        share = np.array([sum(self.forward_share.get(n, 0.0) for n in u.param_names) for u in ordered])
        return UnitCosts(
            units=ordered,
            t_dw=t_dw,
            t_dy=np.maximum(t_dy, 0.0),
            forward_share=share,
            dy_head=dy_head,
            forward_flops=self.forward_flops,
            full_flops=self.full_flops if full_flops is None else full_flops,
        )


def routed_expert_modules(model: nn.Module) -> list[str]:
    """Containers of per-expert modules that a router sends tokens to (``experts.0``, ``experts.expert_1``, ...).

    Which of them run, and on how many tokens, depends on the data, so a step's FLOPs are not a function of its batch
    shape and no price per shape bounds them. Experts stacked in one tensor per projection (transformers 5's Mixtral,
    Qwen2-MoE, OLMoE, ...) are not listed: every token reaches the same tensors, and their cost is fixed.
    """
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)) or "expert" not in name.rsplit(".", 1)[-1].lower():
            continue
        with_weights = [child for child in module.children() if any(True for _ in child.parameters())]
        if len(with_weights) > 1:
            found.append(name)
    return found


def layer_drop_settings(model: nn.Module) -> dict[str, float]:
    """LayerDrop probabilities above 0, by where they are set: configs' ``layerdrop``, ``encoder_layerdrop``,
    ``decoder_layerdrop``, ``speech_encoder_layerdrop`` (nested configs too), and the copies modules take of them at
    construction (``layerdrop``: BART's and Whisper's encoders and decoders, ...).

    In training each layer is skipped at random, so a step's FLOPs depend on the draws, not only on its batch shape,
    and profiles of two shapes skip different layers (their units in different orders): no price per shape holds.
    """
    return _positive_settings(model, lambda key: key.endswith("layerdrop"), module_attribute="layerdrop")


def computation_free_experts(model: nn.Module) -> dict[str, float]:
    """Numbers above 0 of experts that compute nothing (LongCat-Flash's ``zero_expert_num``: a token routed there is
    passed through), by the config field that sets them, or the copy the experts module keeps.

    Stacked experts otherwise cost the same for every routing (each token reaches ``top_k`` matmuls); with such
    experts a step's FLOPs follow how many tokens the router sends to them, not the batch shape.
    """
    return _positive_settings(
        model, lambda key: "zero_expert" in key or "identity_expert" in key, module_attribute="zero_expert_num"
    )


def _positive_settings(
    model: nn.Module, matches: Callable[[str], bool], module_attribute: str | None = None
) -> dict[str, float]:
    """Numbers above 0 in the model's configs (nested ones too) under a field ``matches`` accepts, and in modules'
    own ``module_attribute`` (a copy taken at construction), by where they are set."""
    from transformers import PretrainedConfig

    found: dict[str, float] = {}
    seen: set[int] = set()

    def visit(config: PretrainedConfig, path: str) -> None:
        if id(config) in seen:
            return
        seen.add(id(config))
        for key, value in vars(config).items():
            if isinstance(value, PretrainedConfig):
                visit(value, f"{path}.{key}")
            elif matches(key) and _is_positive_number(value):
                found[f"{path}.{key}"] = value

    for name, module in model.named_modules():
        config = module.__dict__.get("config")  # (a module's own attribute: no nn.Module.__getattr__ miss)
        if isinstance(config, PretrainedConfig):
            visit(config, f"{name}.config" if name else "config")
        if module_attribute is not None and _is_positive_number(module.__dict__.get(module_attribute)):
            found[f"{name}.{module_attribute}" if name else module_attribute] = module.__dict__[module_attribute]
    return found


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


# Forward inputs that only scale the loss: they change no FLOPs and may differ from step to step.
_LOSS_ONLY_INPUTS = ("num_items_in_batch",)


# Inputs indexed by image or video rather than by row (transformers' vision-language models)
_PER_IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "image_", "video_")

# Audio masks that say how much of each padded clip is real: the encoders of ``ModuleTree.valid_frame_encoders`` run
# on those frames alone, so their steps are priced by the masks' values, on the whole batch (pricing.py)
CLIP_MASKS = ("input_features_mask", "feature_attention_mask")

# Tensor inputs whose values, not only their shapes, decide what a forward computes: each image's size within the
# padded pixel_values, which the vision tower crops to (Pixtral / Mistral3) or cuts into as many crops (LLaVA-NeXT,
# LLaVA-OneVision), and how many images each row holds (LLaVA-OneVision crops a row's only image, not the images of a
# row with several). Keyed by shape alone, a batch of small images shared a batch of large ones' price: 0.537 of full
# fine-tuning at rho 0.5 on a tiny Mistral3 (LLaVA-OneVision 0.766 at rho 0.75). Each distinct set of values is
# profiled once.
KEYED_BY_VALUE = ("image_sizes", "batch_num_images")


def costliest_row(batch: Mapping[str, Any], counts: Sequence[int] | None = None) -> dict[str, Any]:
    """``batch`` cut to one sample, when every tensor in it has the same leading (batch) dimension: the sample with the
    most positions whose label counts (``labels != -100``), the first one if there are no labels or a tie.

    Every op FlopCounterMode counts in a transformer (matmuls, attention) is linear in the batch size, so the costs as
    fractions of full fine-tuning do not depend on it: profiling one row is as exact and ``batch size`` times cheaper,
    and an uneven last batch is no new shape. A head that only projects labelled positions (the sparse LM head) costs
    more on rows with more next-token targets: the row with the most bounds every row of the batch. A batch whose
    tensors disagree on the leading dimension (or that holds images: ``batch_size``) is kept whole. ``counts``:
    ``labelled_counts(batch)`` already read to the host, which spares the check before every step a wait for the
    device.
    """
    if batch_size(batch) in (None, 1):
        return dict(batch)
    if counts is None:
        found = labelled_counts(batch)
        counts = found.tolist() if found is not None else None
    row = counts.index(max(counts)) if counts is not None else 0  # the first of the largest, as torch.argmax
    return rows_of(batch, slice(row, row + 1))


def rows_of(batch: Mapping[str, Any], rows: slice | list[int]) -> dict[str, Any]:
    """``batch`` with every tensor in it (nested ones too: a forward may take a dict or a tuple) indexed by ``rows``
    along its leading dimension (a list may repeat a row)."""
    return {
        k: tree_map(lambda v: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v, v)
        for k, v in batch.items()
    }


def batch_size(batch: Mapping[str, Any]) -> int | None:
    """The leading dimension all tensors of ``batch`` share, nested ones too, None if they do not (what
    ``costliest_row`` cuts), or if the batch holds images or videos: their leading dimension counts images, which may
    agree with the rows' count without being one per row (a LLaVA row with two images beside one with none)."""
    if any(name.startswith(_PER_IMAGE_INPUTS) for name in batch):
        return None
    sizes = {int(v.shape[0]) for v in tree_flatten(dict(batch))[0] if isinstance(v, torch.Tensor) and v.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def returns_dict(model: nn.Module, batch: Mapping[str, Any]) -> bool:
    """Whether a transformers forward of ``model`` on ``batch`` returns a ``ModelOutput`` rather than a tuple: the
    ``return_dict`` it is given, else its config's (``None`` means the config's too)."""
    value = batch.get("return_dict")
    return bool(value) if value is not None else getattr(getattr(model, "config", None), "return_dict", True)


def profile_key(model: nn.Module, batch: Mapping[str, Any], tree: ModuleTree | None = None) -> tuple:
    """What a cost profile of ``model`` on ``batch`` depends on: input shapes and dtypes, plain-value inputs, which
    modules are in eval mode or checkpoint their forward (both change what a training step computes), and autocast
    (:func:`autocast_state`). ``tree``: ``model``'s modules, listed before."""
    return (input_key(model, batch), module_modes(tree or ModuleTree(model)))


def input_key(model: nn.Module, batch: Mapping[str, Any]) -> tuple:
    """The first part of ``profile_key``: input shapes and dtypes, plain-value inputs, and the values of the few
    tensor inputs whose values decide the work (``KEYED_BY_VALUE``)."""
    inputs = []
    for name, value in sorted(batch.items()):
        if name in _LOSS_ONLY_INPUTS or value is None:  # None: the default (PEFT passes some explicitly)
            continue
        if name == "return_dict" and value == returns_dict(model, {}):  # the default spelled out (PEFT's wrappers
            continue  # for classification, token classification and question answering pass it)
        # a forward may take tensors inside a dict or a tuple: each is keyed by its path, a shape in it is a shape
        for path, leaf in tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor):
                values = (tuple(leaf.flatten().tolist()),) if name in KEYED_BY_VALUE else ()
                inputs.append((name + keystr(path), tuple(leaf.shape), str(leaf.dtype), *values))
            elif isinstance(leaf, (bool, int, float, str)):
                inputs.append((name + keystr(path), repr(leaf)))
    return tuple(inputs)


def module_modes(tree: ModuleTree) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The second part of ``profile_key``: the names of the modules in eval mode and of those that checkpoint their
    forward (``is_checkpointed``), each in ``named_modules`` order, and the autocast in force."""
    in_eval = tuple(name for name, module in tree.named if not module.training)
    checkpointed = tuple(name for name, m in tree.checkpointing_layers if m.gradient_checkpointing and m.training)
    return in_eval, checkpointed, autocast_state()


def autocast_state() -> tuple[str, ...]:
    """The device types autocast is on for, each with its dtype (``"cuda:torch.bfloat16"``).

    Autocast changes more than precision: a device picks kernels by dtype, and their backward costs differ. CUDA runs
    SDPA with grouped-query heads on its math path in float32, whose backward computes each input's gradient apart,
    and on flash attention in bf16, one backward kernel for all three. A selection made outside autocast (a plain
    loop's ``select_units``) must be checked again at the steps under it."""
    return tuple(f"{kind}:{dtype}" for kind, dtype in autocast_in_force())


def autocast_in_force() -> tuple[tuple[str, torch.dtype], ...]:
    """``(device type, dtype)`` of each device type autocast is on for (:func:`autocast_state`)."""
    types = ["cpu", "cuda"]
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and accelerator.is_available():
        types.append(accelerator.current_accelerator().type)
    on = [kind for kind in dict.fromkeys(types) if torch.is_autocast_enabled(kind)]
    return tuple((kind, torch.get_autocast_dtype(kind)) for kind in on)


@contextmanager
def training_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in training mode, each given back its own mode afterwards: training steps are
    priced in training mode (checkpointing and dropout act only there) whatever mode the caller left them in."""
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _Recorder(TorchDispatchMode):
    """Records ops and the parameter/activation roles of their inputs during one forward pass."""

    def __init__(self, counter: FlopCounterMode, canonical: dict[int, str]):
        super().__init__()
        self.counter = counter
        self.canonical = canonical  # id(parameter) -> canonical name
        self.params = {pid for pid in canonical}
        self.sources = WeakIdKeyDictionary()  # tensor -> canonical parameter name it re-presents
        self.latest = WeakIdKeyDictionary()  # activation -> index of the latest parameter-consuming op behind it
        self.producer = WeakIdKeyDictionary()  # output of a recorded op -> that op's index (the last writer's)
        # activation computed from parameters and constants alone -> those parameters: it needs a gradient exactly
        # when one of them trains, whatever units lie deeper (``latest`` would charge it for any deeper unit)
        self.derived = WeakIdKeyDictionary()
        self.data = WeakIdKeyDictionary()  # the batch's tensors and those computed from them
        self.pending: tuple[int, list[torch.Tensor]] | None = None  # the last recorded op's outputs (grad_fn unset)
        self.batch_independent = False  # an op counted FLOPs on parameters alone
        # op index -> the autograd nodes its outputs were seen with: held, so that their ids stay theirs
        self.grad_nodes: dict[int, list[torch.autograd.graph.Node]] = defaultdict(list)
        self.records: list[tuple[OpCost, Any, list, Any, list[int]]] = []  # op, func, leaf specs, treespec, levels
        self.next_index = 0
        self.warned: set = set()
        self.forced_leaf_seen = False  # a tensor no unit's price includes forces backprop down to it
        self.unseen = _UnseenWrites(counter)
        self.without_grad = WeakIdKeyDictionary()  # outputs of ops run under no_grad outside them: no backward
        self.unfollowed_seen = False
        self.calls: list[CheckpointCall] = []  # non-reentrant torch.utils.checkpoint calls under way, outermost first
        # a transformers checkpointed layer whose forward is about to begin (its hooks run outside the checkpoint
        # call since transformers 5.2x, inside it before): (first op, its checkpoint call once known), or None
        self.layer_starting: list | None = None
        # such calls that ended: (first op, last op, forward FLOPs recomputed, whether rho's reference counts them)
        self.checkpointed: list[tuple[int, int, float, bool]] = []

    def _source(self, t: torch.Tensor) -> str | None:
        name = self.canonical.get(id(t))
        if name is not None:
            return name
        return self.sources.get(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.note_pending_nodes()
        without_autograd = _without_autograd()  # a stack walk: once per op
        if func in _METADATA_OPS:
            return self._note_without_grad(func(*args, **kwargs), without_autograd)
        before = self.counter.get_total_flops()
        out = self._note_without_grad(func(*args, **kwargs), without_autograd)
        forward = float(self.counter.get_total_flops() - before)

        leaves, spec = tree_flatten((args, kwargs))
        tensor_leaves = [x for x in leaves if isinstance(x, torch.Tensor)]
        written = _mutated_arguments(func, args, kwargs)
        if torch.is_grad_enabled():  # written under grad: autograd records it now
            for x in written:
                for target in (x, x._base):
                    if target is not None:
                        self.without_grad.pop(target, None)
        unseen = self.unseen.follow(func, tensor_leaves, written, out)
        if unseen is not None:
            _warn_unseen_kernel(*unseen)
        self._follow_bases(tensor_leaves)
        self._warn_forced_leaves(tensor_leaves)
        self._warn_unfollowed_function(tensor_leaves)
        reads_data = any(x in self.data for x in tensor_leaves)
        if reads_data:  # the batch, and whatever is computed from it
            for o in [*tree_flatten(out)[0], *written]:
                if isinstance(o, torch.Tensor):
                    self.data[o] = True
        sources = [self._source(x) for x in tensor_leaves]
        is_act = [x in self.latest for x in tensor_leaves]
        if not any(sources) and not any(is_act):
            return out
        if without_autograd:
            # under torch.no_grad: autograd records nothing, so no backward runs through the op and what it computes
            # takes no gradient (DeepSeek-V3.2's indexer scores tokens so): its forward is counted, no backward
            # charged, and its outputs are no activations
            self.batch_independent |= forward > 0 and not reads_data
            return out
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]

        distinct_sources = {s for s in sources if s}
        if forward == 0 and not any(is_act) and len(distinct_sources) == 1 and _is_passthrough(func):
            source = next(iter(distinct_sources))
            for o in outputs:
                self.sources[o] = source
            return out

        if forward == 0 and uncounted_matmul_op(func) and func not in self.warned:
            self.warned.add(func)
            logger.warning(
                "%s has no FLOP formula, so its forward and backward count 0 and the budget under-predicts; register "
                "one in peft_greentrainer/engine/flops.py (or use attn_implementation='sdpa' / "
                "experts_implementation='eager').",
                func,
            )
        index = self.next_index
        self.next_index += 1
        self._note_grad_nodes(tensor_leaves)
        # the roles ``_role`` gives: a parameter (even one written into) is one; an activation computed from
        # parameters alone pays when they train; any other activation by the threshold of its ``latest``
        acts = [x for x in tensor_leaves if x in self.latest and _differentiable(x) and not self._source(x)]
        levels = sorted({self.latest[x] for x in acts if self._derived(x) is None}, reverse=True)
        derived_inputs = list(dict.fromkeys(d for x in acts if (d := self._derived(x)) is not None))
        roles = [self._role(x, levels, derived_inputs) if isinstance(x, torch.Tensor) else x for x in leaves]
        op = OpCost(index=index, name=str(func), forward=forward, dw=dict.fromkeys(distinct_sources, 0.0))
        op.derived = [(names, 0.0) for names in derived_inputs]
        self.records.append((op, func, roles, spec, levels))
        self.batch_independent |= forward > 0 and not reads_data
        latest = max([index if distinct_sources else -1] + [self.latest[x] for x in tensor_leaves if x in self.latest])
        # its outputs are computed from parameters alone if every activation it reads is
        derived = None
        read = [self._derived(x) for x in tensor_leaves if x in self.latest]
        if not reads_data and all(d is not None for d in read):
            derived = frozenset(distinct_sources).union(*read)
            derived = derived if 0 < len(derived) <= _DERIVED_NAMES else None
        for o in outputs:
            self.producer[o] = index
            if _differentiable(o):
                self.latest[o] = latest
                if derived is not None:
                    self.derived[o] = derived
        self.pending = (index, [o for o in outputs if _differentiable(o)])
        # in-place and out= ops write into an argument: it now depends on the inputs too, and so does the tensor it
        # is a view of (RWKV's CPU recurrence fills its output one time step at a time through views)
        for x in written:
            for target in (x, x._base) if x._base is not None else (x,):
                # what it was computed from before (a parameter or a constant: itself), if from parameters alone
                before = (
                    self._derived(target) if target in self.latest else frozenset(filter(None, [self._source(target)]))
                )
                self.latest[target] = max(latest, self.latest.get(target, -1))
                self.producer[target] = index
                if derived is not None and before is not None and len(derived | before) <= _DERIVED_NAMES:
                    self.derived[target] = derived | before
                else:  # judged by ``latest`` from now on, and so are its views
                    self.derived.pop(target, None)
        return out

    def begin_checkpoint_call(self) -> CheckpointCall | None:
        """A non-reentrant ``torch.utils.checkpoint`` call begins (``checkpoint_calls_followed``): its ops, from
        the next one on, are computed again in backward as soon as the gradient has to enter them."""
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if not hooks or not torch.is_grad_enabled():
            return None
        call = CheckpointCall(hooks[0], self.next_index, float(self.counter.get_total_flops()))
        starting, self.layer_starting = self.layer_starting, None
        if starting is not None and starting[0] == self.next_index and starting[1] is None:
            call.layer, starting[1] = True, call  # the layer's own call: priced by _checkpointed_blocks
        self.calls.append(call)
        return call

    def end_checkpoint_call(self, call: CheckpointCall | None) -> None:
        """The call's forward is done: its recompute is charged, unless it is a transformers checkpointed layer's
        (``_checkpointed_blocks`` prices those). A call that held others recomputes their forwards too, which their
        own recomputes do not replace: charged in full to units, and not at all to rho's reference."""
        if call is None:
            return
        self.calls.remove(call)
        if self.calls:
            self.calls[-1].holds_calls = True
        if call.layer:
            return
        flops = float(self.counter.get_total_flops()) - call.flops_before
        if call.stops_early and not call.holds_calls:
            flops -= _tail_never_recomputed(self.records, call.first)
        self.checkpointed.append((call.first, self.next_index - 1, flops, not (call.selective or call.holds_calls)))

    def _follow_bases(self, tensors: list[torch.Tensor]) -> None:
        """A view reads what was written into its base after it was taken (through the base or another view): it
        depends on what that was computed from, as autograd sees it."""
        for x in tensors:
            base = x._base
            if base is None:
                continue
            if base in self.latest and self.latest.get(x, -1) < self.latest[base]:
                self.latest[x] = self.latest[base]
            if base in self.data:
                self.data[x] = True

    def _warn_forced_leaves(self, tensors: list[torch.Tensor]) -> None:
        """Warn where an op reads a tensor that requires grad yet is no parameter and comes out of no op (its
        ``requires_grad`` set by hand, as T5's checkpointed attention does to its position bias): autograd
        backpropagates down to it whatever is selected, which no unit's price includes."""
        if self.forced_leaf_seen or not torch.is_grad_enabled():
            return
        for x in tensors:
            if not x.requires_grad or x.grad_fn is not None:
                continue
            leaf = x if x._base is None else x._base  # a view of a parameter taken without grad is one too
            if id(leaf) not in self.params and not isinstance(leaf, nn.Parameter):
                self.forced_leaf_seen = True  # the first reader is named (T5's bias is read by every layer)
                _warn_forced_leaf(_innermost_module(self.counter), tuple(x.shape))
                return

    def _note_without_grad(self, out: Any, without_autograd: bool) -> Any:
        if without_autograd:
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self.without_grad[o] = True
        return out

    def _warn_unfollowed_function(self, tensors: list[torch.Tensor]) -> None:
        """Warn where a tensor made under no_grad, and so charged no backward, came out with an autograd node: it was
        made inside an ``autograd.Function`` whose forward was not followed (a C++ one), whose backward then runs."""
        if self.unfollowed_seen or not self.without_grad:
            return
        for x in tensors:
            if x.grad_fn is not None and x in self.without_grad:
                self.unfollowed_seen = True
                _warn_unfollowed_function(_innermost_module(self.counter), type(x.grad_fn).__name__)
                return

    def _derived(self, x: torch.Tensor) -> frozenset[str] | None:
        """The parameters ``x`` is computed from, if from parameters and constants alone (and never written into)."""
        found = self.derived.get(x)
        if found is None or x._base is None or x._base not in self.latest:
            return found
        base = self.derived.get(x._base)  # written into since the view was taken: what was written counts too
        return None if base is None else found | base

    def note_pending_nodes(self) -> None:
        """Note the autograd node of the last recorded op's outputs, attached once that op returned through autograd:
        an output nothing reads (a parametrization's consistency check, discarded) is judged by it too."""
        if self.pending is not None:
            index, outputs = self.pending
            self.pending = None
            for o in outputs:
                node = o.grad_fn
                if node is not None and all(node is not n for n in self.grad_nodes[index]):
                    self.grad_nodes[index].append(node)

    def _note_grad_nodes(self, inputs: list[torch.Tensor]) -> None:
        """Note the autograd node each input came out of, next to the op that wrote it: autograd has attached the node
        by the time a later op reads the tensor (not yet while the writing op dispatches)."""
        for x in inputs:
            node = x.grad_fn
            index = self.producer.get(x)
            if node is not None and index is not None and all(node is not n for n in self.grad_nodes[index]):
                self.grad_nodes[index].append(node)

    def _role(self, x: torch.Tensor, levels: list[int], derived: list[frozenset[str]]) -> _TensorSpec:
        source = self._source(x)
        if source:
            role = f"param:{source}"
        elif (found := self._derived(x)) is not None and _differentiable(x):
            role = f"derived:{derived.index(found)}"
        elif x in self.latest and _differentiable(x):
            role = f"act:{levels.index(self.latest[x])}"  # rank of its threshold: 0 = latest
        else:
            role = "const"
        return _TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype, role)


# Most parameters a tensor computed from parameters alone is followed with (beyond: judged by ``latest``)
_DERIVED_NAMES = 16


# Ops that return memory as they found it: a kernel launched outside the dispatcher fills what they allocate
_ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


class _UnseenWrites:
    """Finds memory allocated uninitialised and then read before any op the dispatcher saw wrote it.

    Such memory was filled by a kernel launched outside torch's dispatcher (a Triton or CUDA-extension kernel called
    directly, as flash-linear-attention, mamba-ssm, causal-conv1d or Liger do), whose FLOPs no FlopCounterMode counts.
    Memory is followed by its storage, so writes through any alias (a view, ``detach()``, ``.data``) count.
    """

    def __init__(self, counter: FlopCounterMode) -> None:
        self.counter = counter
        self.unwritten: dict[int, tuple[str, str]] = {}  # storage address -> (the allocating op, the module running)

    def follow(self, func, tensors: list[torch.Tensor], written: list[torch.Tensor], out) -> tuple[str, str] | None:
        """Note what ``func`` allocates and writes (``written``: the arguments it writes into); where memory it reads
        unwritten was allocated, if any."""
        name = getattr(func, "_opname", "")
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if name in _ALLOCATIONS:
            for address in filter(None, map(_storage_address, outputs)):
                self.unwritten[address] = (str(func), _innermost_module(self.counter))
            return None
        if not self.unwritten:
            return None
        found = None
        # views and ``*_like``/``new_*`` factories read only shapes; ops that write a tensor need not read it
        if not (getattr(func, "is_view", False) or name.endswith("_like") or name.startswith("new_")):
            for x in tensors:
                if not any(x is w for w in written):
                    found = found or self.unwritten.get(_storage_address(x))
        fresh = [] if getattr(func, "is_view", False) else outputs  # an op's own output is memory it wrote
        for x in [*written, *fresh]:
            self.unwritten.pop(_storage_address(x), None)
        return found


def _innermost_module(counter: FlopCounterMode) -> str:
    """The innermost module running (FlopCounterMode tracks them by qualified name)."""
    modules = getattr(getattr(counter, "mod_tracker", None), "parents", ()) or ("the model",)
    return max(modules, key=len)


def _storage_address(x: torch.Tensor) -> int | None:
    """Where ``x``'s memory lies; None where there is none to fill (meta and fake tensors, sparse layouts)."""
    if x.device.type == "meta" or isinstance(x, FakeTensor) or x.layout != torch.strided or not x.numel():
        return None
    try:
        return x.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # subclasses and nested tensors without one plain storage
        return None


_WARNED: set[tuple[str, str]] = set()  # (message, module): each said once per module and process


def _warn_once(module: str, message: str, *args: object) -> None:
    """Log ``message`` (whose first ``%s`` is ``module``) once per module: a model repeats a layer in every block."""
    if (message, module) in _WARNED:
        return
    _WARNED.add((message, module))
    logger.warning(message, module, *args)


def _warn_unseen_kernel(allocated: str, module: str) -> None:
    """Say once per module where a kernel ran that no FLOP count sees."""
    _warn_once(
        module,
        "GreenTrainer: in %s a tensor allocated by %s was filled by a kernel torch's dispatcher does not see (a "
        "Triton or CUDA-extension kernel called directly, e.g. flash-linear-attention, mamba-ssm, causal-conv1d, "
        "Liger). If it does matmul-class work (attention, a scan, a fused linear layer), FlopCounterMode counts none "
        "of it, so neither does the budget: rho bounds the rest of each step; load the model without such kernels to "
        "have it counted. Element-wise kernels (norms, activations) count 0 anyway.",
        allocated,
    )


def _warn_forced_leaf(module: str, shape: tuple[int, ...]) -> None:
    """Say once per module where a tensor that forces backprop down to it, unpriced, is first read."""
    _warn_once(
        module,
        "GreenTrainer: %s reads a tensor of shape %s that requires grad but is no parameter and comes from no op "
        "(its requires_grad was set by hand, in the forward or on the batch). Every step backpropagates down to it, "
        "whatever is selected, and the profile does not price that: the FLOPs budget does not hold for this model. "
        "Keep it from requiring grad (or detach it) to have every step within rho.",
        shape,
    )


_FUNCTION_APPLY = torch.autograd.Function.apply.__func__.__code__


def _without_autograd() -> bool:
    """Whether an op now runs with no backward: grad disabled, and no custom ``autograd.Function`` forward under way
    (checkpointing's reentrant one, bitsandbytes', TRL's fused LM head, a ``torch.library`` op's): those run with grad
    disabled too, yet their backward computes through what they ran. Known by ``Function.apply`` on the Python
    stack, which holds however a library keeps a reference to it."""
    if torch.is_grad_enabled():
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _FUNCTION_APPLY:
            return False
        frame = frame.f_back
    return True


def _warn_unfollowed_function(module: str, node: str) -> None:
    """Say once per module where the output of a Function whose forward no profile followed is read."""
    _warn_once(
        module,
        "GreenTrainer: %s reads the output of an autograd.Function (%s) whose forward ran where the profile saw no "
        "Python autograd.Function: its work was taken for work under torch.no_grad, which has no backward, so the "
        "budget does not count that backward. Implement it as a Python torch.autograd.Function or a torch.library "
        "custom op to have it counted.",
        node,
    )


def _differentiable(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point or t.dtype.is_complex


# Quantized weights are de-quantized right before their matmul; the float copy still *is* that weight, whose
# gradient (when it is trainable at all) the matmul's backward would compute.
_DEQUANTIZE_OPS = ("dequantize_4bit", "dequantize_blockwise", "int8_vectorwise_dequant", "dequantize_nf4")


def _is_passthrough(func) -> bool:
    if getattr(func, "is_view", False) or func in _PARAMETER_PASSTHROUGH:
        return True
    return func.namespace == "bitsandbytes" and func._opname in _DEQUANTIZE_OPS


def _mutated_arguments(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors ``func`` writes into, lists of them (``out=[...]``, ``_foreach_*_``) included."""
    mutated = []
    schema = func._schema
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(argument.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        mutated += [x for x in values if isinstance(x, torch.Tensor)]
    return mutated


class _NoAutogradFormulaError(RuntimeError):
    pass


def _replay_key(func, roles: list) -> tuple:
    """Signature of one op call with parameter names abstracted away (layers share their replays)."""
    key, params = [], {}
    for r in roles:
        if isinstance(r, _TensorSpec):
            role = r.role
            if role.startswith("param:"):
                role = f"param{params.setdefault(role, len(params))}"
            key.append((r.shape, r.stride, r.dtype, role))
        else:
            key.append(repr(r))
    return (func, *key)


def _backward_flops(func, roles: list, spec, requires_grad: set[int]) -> float:
    """FLOPs FlopCounterMode counts for this op's backward when only ``requires_grad`` leaves need gradients."""
    leaves = []
    for i, r in enumerate(roles):
        if isinstance(r, _TensorSpec):
            t = torch.empty_strided(r.shape, r.stride, dtype=r.dtype, device="meta")
            leaves.append(t.requires_grad_() if i in requires_grad else t)
        elif isinstance(r, torch.device):
            leaves.append(torch.device("meta"))
        else:
            leaves.append(r)
    args, kwargs = tree_unflatten(leaves, spec)
    with torch.enable_grad():
        out = func(*args, **kwargs)
    outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.requires_grad]
    if not outputs:
        # Inputs needed gradients, yet nothing came out differentiable: the op has no autograd formula at the
        # dispatcher (bitsandbytes' matmuls get theirs from a Python autograd.Function around them).
        raise _NoAutogradFormulaError(str(func))
    inputs = [leaves[i] for i in sorted(requires_grad)]
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(outputs, inputs, [torch.empty_like(o) for o in outputs], allow_unused=True)
    return float(counter.get_total_flops())


def _unreplayed_backward(func, roles: list, forward: float, needing: int) -> float:
    """Backward FLOPs of an op that cannot be replayed, when ``needing`` of its inputs need gradients.

    flash_attn calls its kernels from a Python ``autograd.Function``, so they have no autograd formula to replay. Its
    backward kernel computes dq, dk and dv together however few are needed: it recomputes the scores and runs four
    more matmuls, ``3 d_qk + 2 d_v`` to the forward's ``d_qk + d_v`` (2.5x when the head dims agree; 3x, the most it
    can be, when they are unknown). Other ops (bitsandbytes' matmuls) are taken as matmul-like: one forward's FLOPs
    per input gradient.
    """
    if not needing:
        return 0.0
    if not is_attention_op(func):
        return forward * needing
    float_inputs = [r for r in roles if isinstance(r, _TensorSpec) and r.dtype.is_floating_point]
    if len(float_inputs) < 3 or not float_inputs[0].shape or not float_inputs[2].shape:
        return 3.0 * forward
    d_qk, d_v = float_inputs[0].shape[-1], float_inputs[2].shape[-1]  # query, key, value come first
    return forward * (3 * d_qk + 2 * d_v) / (d_qk + d_v)


def _leaves_where(roles: list, wanted: Callable[[str], bool]) -> set[int]:
    return {i for i, r in enumerate(roles) if isinstance(r, _TensorSpec) and wanted(r.role)}


def _activation_rank(role: str) -> int | None:
    return int(role[4:]) if role.startswith("act:") else None


def _measure_op(op: OpCost, func, roles: list, spec, levels: list[int], cache: dict) -> None:
    """Fill ``op.dy`` and ``op.dw`` by replaying the op on ``meta`` (cached per signature).

    Activation inputs are grouped by threshold: when the deepest selected unit moves down past a threshold, the
    inputs at that level start needing gradients too. Each level is replayed with all inputs at or above it needing
    gradients, so fused kernels that produce all input gradients at once (SDPA) are charged once, not per input.
    """
    if op.forward == 0 and not backward_may_count_without_forward(func):
        return  # no matmul-class work forward means none backward either (norms, casts, embeddings)
    param_roles = list(dict.fromkeys(r.role for r in roles if isinstance(r, _TensorSpec) and r.role.startswith("p")))
    key = _replay_key(func, roles)
    if key not in cache:
        needing = [
            _leaves_where(
                roles, lambda role, rank=rank: (_activation_rank(role) if role.startswith("act:") else 1e9) <= rank
            )
            for rank in range(len(levels))
        ]
        weights = [_leaves_where(roles, lambda role, p=p: role == p) for p in param_roles]
        derived = [_leaves_where(roles, lambda role, j=j: role == f"derived:{j}") for j in range(len(op.derived))]
        try:
            cumulative = [_backward_flops(func, roles, spec, leaves) for leaves in needing]
            dw = [_backward_flops(func, roles, spec, leaves) for leaves in weights]
            dd = [_backward_flops(func, roles, spec, leaves) for leaves in derived]
            joint = _backward_flops(func, roles, spec, set().union(*needing, *derived)) if derived else 0.0
            joint -= cumulative[-1] if derived and cumulative else 0.0
        except Exception as error:  # an op without a meta kernel or autograd formula
            logger.debug("Replaying %s failed (%s); pricing its backward from its forward.", func, error)
            cumulative = [_unreplayed_backward(func, roles, op.forward, len(leaves)) for leaves in needing]
            dw = [op.forward] * len(param_roles)
            dd = [_unreplayed_backward(func, roles, op.forward, len(leaves)) for leaves in derived]
            joint = sum(dd)
        cache[key] = (np.diff([0.0, *cumulative]).tolist(), dw, dd, joint)
    increments, dw, dd, op.derived_full = cache[key]
    op.derived = [(names, flops) for (names, _), flops in zip(op.derived, dd, strict=True)]
    op.dy = [(level, flops) for level, flops in zip(levels, increments, strict=True) if flops]
    for role, flops in zip(param_roles, dw, strict=True):
        op.dw[role.removeprefix("param:")] = flops


def profile_model(model: nn.Module, batch: Mapping[str, Any], loss_fn: LossFn = default_loss) -> CostProfile:
    """Measure the cost profile of one training step of ``model`` on ``batch``.

    Runs one forward pass (on whatever device the model is: use the ``meta`` device to profile billions of
    parameters in seconds) and no backward. Weights, flags and RNG state are left untouched.

    Gradient checkpointing is accounted: a checkpointed block (a module with ``gradient_checkpointing`` on, as
    transformers marks them) recomputes its forward during backward whenever the gradient has to enter it, i.e. when
    the deepest selected unit is in or below it, and never otherwise.
    """
    register_flop_formulas()
    canonical = {id(model.get_parameter(name)): name for name in parameter_aliases(model)}
    recomputed: list[OpCost] = []
    # Inside autocast a weight is cast once and the copy reused: a cast cached by an earlier forward in the same block
    # would hide which parameter a matmul reads, and that weight's gradient would go uncharged.
    torch.clear_autocast_cache()
    # (roots first: FlopCounterMode's module tracking registers a global forward hook of its own)
    with fork_rng(), fused_attention_on_meta(), _full_graph(model) as roots, FlopCounterMode(display=False) as counter:
        with (
            _Recorder(counter, canonical) as recorder,
            checkpoint_calls_followed(recorder.begin_checkpoint_call, recorder.end_checkpoint_call),
            _checkpointed_blocks(model, recorder, counter, recomputed),
        ):
            roots.ours = _global_hooks()
            for value in tree_flatten(list(batch.values()))[0]:
                if isinstance(value, torch.Tensor):
                    recorder.data[value] = True
            loss = loss_fn(model, batch)
            recorder.note_pending_nodes()
        forward_flops = float(counter.get_total_flops())
        roots.settle_essential(loss)
        roots.add_kept_on_modules()
        dead, dead_for_reference = set(), set()
        if roots.model_called:
            dead = _ops_backward_never_reaches(recorder.grad_nodes, roots.nodes)
            # full fine-tuning surely backpropagates from the loss and the outputs only: what a hook or a module may
            # keep could train too, which a unit is charged for, but rho's reference is not (a larger one would let
            # every step cost more): PEFT's discarded parametrization check, seen by a caller's global hooks
            dead_for_reference = _ops_backward_never_reaches(recorder.grad_nodes, roots.essential) | dead
    del loss, roots
    recorder.grad_nodes.clear()  # the graph they hold
    torch.clear_autocast_cache()  # casts of weights the step keeps frozen, made while the profile trained them all

    cache: dict = {}
    first_use: dict[str, int] = {}
    t_dw: dict[str, float] = defaultdict(float)
    share: dict[str, float] = defaultdict(float)
    ops = []
    for op, func, roles, spec, levels in recorder.records:
        if op.index not in dead:
            _measure_op(op, func, roles, spec, levels, cache)
        ops.append(op)
        total_dw = sum(op.dw.values())
        for name, flops in op.dw.items():
            first_use.setdefault(name, op.index)
            t_dw[name] += flops
            share[name] += op.forward * (flops / total_dw if total_dw else 1.0 / len(op.dw))
    recomputed += [
        OpCost(
            index=last,
            name="recompute torch.utils.checkpoint",
            forward=0.0,
            dy=[(last, flops)],
            in_reference=in_reference,
        )
        for first, last, flops, in_reference in recorder.checkpointed
        if last >= first and flops > 0
    ]
    # An op that writes into a preallocated buffer (``out=``) has no autograd formula: it runs inside a custom
    # autograd.Function, whose backward may run it again (TRL's fused LM head recomputes each logits tile). Charged
    # once more as soon as anything is selected, whether or not it is recomputed: the budget stays a promise.
    recomputed += [
        OpCost(index=op.index, name=f"recompute {func}", forward=0.0, dy=[(recorder.next_index, op.forward)])
        for op, func, *_ in recorder.records
        if op.forward and getattr(func, "_overloadname", "").endswith("out")
    ]
    ops.extend(recomputed)
    derived = [(names, flops) for op in ops for names, flops in op.derived if flops]
    recorded = {id(op) for op, *_ in recorder.records}
    full_backward = sum(
        op.dy_flops + sum(op.dw.values()) + op.derived_full
        for op in ops
        if (op.in_reference if id(op) not in recorded else op.index not in dead_for_reference)
    )
    return CostProfile(
        forward_flops=forward_flops,
        full_backward_flops=full_backward,
        ops=ops,
        first_use=first_use,
        t_dw=dict(t_dw),
        forward_share=dict(share),
        derived=derived,
        scales_with_rows=not recorder.batch_independent,
    )


@dataclass
class _Roots:
    """Where a training loss can start backpropagating from: the autograd nodes of what ``loss_fn`` returned, of what
    the model returned (a trainer's loss may use any output), of what a hook can capture (the inputs and outputs of
    modules with hooks, every module's while the caller has global hooks), and of tensors kept on modules."""

    model: nn.Module
    callers_global_hooks: int  # global forward (pre-)hooks registered before the profile
    nodes: list[torch.autograd.graph.Node] = field(default_factory=list)
    # what full fine-tuning, rho's reference, surely backpropagates from (``settle_essential``)
    essential: list[torch.autograd.graph.Node] = field(default_factory=list)
    outputs: list[torch.autograd.graph.Node] = field(default_factory=list)  # what the model returned
    model_called: bool = False
    ours: int = 0  # global hooks once the profile's own are in place (FlopCounterMode's module tracking has some)

    def add(self, value: Any) -> list[torch.autograd.graph.Node]:
        found = [x.grad_fn for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor) and x.grad_fn]
        self.nodes += found
        return found

    def settle_essential(self, loss: Any) -> None:
        """The reference's roots: what ``loss_fn`` returned (a loss, the outputs a loss reads, or the outputs), or if
        it returned nothing with a graph, every output of the model. An output the loss does not use (a head of
        another task) would make full fine-tuning look dearer than it is, and every step's budget with it."""
        self.essential = self.add(loss) or self.outputs

    def module_returned(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        every = self.callers_global_hooks or _global_hooks() > self.ours  # one registered inside loss_fn, too
        if module is self.model:
            self.outputs += self.add(output)
        elif module._forward_hooks or every:
            self.add(output)
        if module._forward_pre_hooks or every:
            self.add((args, kwargs))
        self.model_called = self.model_called or module is self.model

    def add_kept_on_modules(self) -> None:
        for module in self.model.modules():
            for value in vars(module).values():
                self.add(value)


def _global_hooks() -> int:
    hooks = torch.nn.modules.module
    return len(hooks._global_forward_hooks) + len(hooks._global_forward_pre_hooks)


@contextmanager
def _full_graph(model: nn.Module) -> Iterator[_Roots]:
    """During the profiled forward, autograd records the graph full fine-tuning backpropagates through: every float
    parameter needs a gradient, and nothing is saved for a backward that never runs (no activation memory). Weights
    that parametrizations cached meanwhile are dropped with it: a training step must not reuse their graph."""
    roots = _Roots(model, callers_global_hooks=_global_hooks())
    params = list(model.parameters())
    parametrized = getattr(torch.nn.utils.parametrize, "_cache", {})
    cached = set(parametrized)
    with requires_grad_kept(params), torch.autograd.graph.saved_tensors_hooks(_drop, _dropped):
        for param in params:
            if is_trainable_storage(param):
                param.requires_grad_(True)
        handle = torch.nn.modules.module.register_module_forward_hook(roots.module_returned, with_kwargs=True)
        try:
            yield roots
        finally:
            handle.remove()
            # torch's handle forgets the with_kwargs flag (its extra_dict names only always_called): left behind, it
            # makes torch.compile warn of a global hook at every compiled call, and one more is left per profile
            torch.nn.modules.module._global_forward_hooks_with_kwargs.pop(handle.id, None)
            for key in set(parametrized) - cached:
                parametrized.pop(key, None)


def _drop(tensor: torch.Tensor) -> weakref.ref:
    return weakref.ref(tensor)  # not the tensor: freed as soon as the forward is done with it


def _dropped(packed: weakref.ref) -> torch.Tensor:
    tensor = packed()
    if tensor is None:
        raise RuntimeError("A profile's forward keeps no tensor for backward; its graph cannot be backpropagated.")
    return tensor


def _ops_backward_never_reaches(grad_nodes: Mapping[int, list], roots: list[torch.autograd.graph.Node]) -> set[int]:
    """Recorded ops whose backward never runs, because no autograd path leads from ``roots`` to them.

    An op's output can be discarded unread (the final state of a linear-attention scan in training) while its inputs
    carry gradients: charging its backward would over-count full fine-tuning, the reference of ``rho``. Only ops seen
    in the graph are judged; an op whose node was never seen (its output not read by a later op, or computed inside
    a custom ``autograd.Function``) keeps its cost, so this can only lower a charge that autograd really skips.

    A custom ``autograd.Function`` may run autograd itself in its backward (``torch.autograd.grad`` through a graph
    it kept, as reentrant checkpointing does), reaching ops no edge leads to: unless it is one known not to, nothing
    is judged dead.
    """
    reached: dict[int, torch.autograd.graph.Node] = {}  # id -> node, held so that no id is reused while walking
    nodes = list(roots)
    while nodes:
        node = nodes.pop()
        if id(node) in reached:
            continue
        if _may_run_autograd(node):
            logger.debug("%s may backpropagate through a graph of its own; no op is judged dead.", type(node))
            return set()
        reached[id(node)] = node
        nodes.extend(following for following, _ in node.next_functions if following is not None)
    if not reached:
        return set()  # nothing to backpropagate from (a forward without grad): nothing is known dead
    return {index for index, seen in grad_nodes.items() if not any(id(node) in reached for node in seen)}


# Custom autograd.Functions whose backward computes gradients from what they saved, without autograd of its own
_PLAIN_BACKWARD_FUNCTIONS = ("bitsandbytes.autograd._functions.", "trl.kernels.", "flash_attn.")


def _may_run_autograd(node: torch.autograd.graph.Node) -> bool:
    function = getattr(node, "_forward_cls", None)  # set on the nodes of Python autograd.Functions only
    return function is not None and not f"{function.__module__}.".startswith(_PLAIN_BACKWARD_FUNCTIONS)


@contextmanager
def _checkpointed_blocks(model: nn.Module, recorder: _Recorder, counter: FlopCounterMode, out: list[OpCost]):
    """Record, for each checkpointed block that runs, its forward FLOPs and its last op: its recompute cost."""
    starts: dict[int, list[tuple[int, float, bool, list, CheckpointCall | None]]] = defaultdict(list)

    def before(module, args, kwargs):
        # the layer's own checkpoint call begins after this hook (transformers 5.2x: hooks outside the call), or
        # began just before it with no op yet (earlier versions: hooks inside); a call a caller began just before
        # looks like the latter, so it is taken for the layer's only if no call begins after this hook (``after``)
        call = recorder.calls[-1] if recorder.calls else None
        began_just_before = call if call is not None and call.first == recorder.next_index and not call.layer else None
        # A block run without grad has no backward to recompute for; but transformers before 5.2x checkpoint the
        # whole call, hooks included, so reentrant checkpointing runs them under no_grad: inputs that need a
        # gradient say that a backward will come
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        backward = torch.is_grad_enabled() or any(x.requires_grad for x in inputs)
        layer_call = [recorder.next_index, None]  # (filled in by the call that begins next, if any)
        recorder.layer_starting = layer_call
        entry = (recorder.next_index, float(counter.get_total_flops()), backward, layer_call, began_just_before)
        starts[id(module)].append(entry)

    def after(module, args, kwargs, output):
        first, flops_before, backward, (_, call), began_just_before = starts[id(module)].pop()
        recorder.layer_starting = None
        if call is None and began_just_before is not None:
            call = began_just_before
            call.layer = True  # its charge is this layer's (its end comes after this hook)
        holds_calls = call is not None and call.holds_calls  # (see _Recorder.end_checkpoint_call)
        last = recorder.next_index - 1
        flops = float(counter.get_total_flops()) - flops_before
        if stops_early(module) and not holds_calls:
            flops -= _tail_never_recomputed(recorder.records, first)
        known_policy = saves_attention_only(module) and not holds_calls
        if known_policy:
            flops -= _attention_in(recorder.records, first)  # saved in the forward, never recomputed
        if last >= first and flops > 0 and backward:
            name = f"recompute {type(module).__name__}"
            in_reference = known_policy or not (checkpoints_selectively(module) or holds_calls)
            out.append(OpCost(index=last, name=name, forward=0.0, dy=[(last, flops)], in_reference=in_reference))

    handles = []
    for module in model.modules():
        if is_checkpointed(module):
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _tail_never_recomputed(records: list, first: int) -> float:
    """FLOPs at the end of a checkpointed block (ops from index ``first`` on) that an early-stopping recompute skips.

    The recompute stops while saving the last tensor the block saved. If the block's last op that saves anything
    is a matmul, that happens before its kernel runs (inputs are saved first), so the kernel is never recomputed;
    any other last saving op (a norm, a dropout mask, a scaling) runs in full, and everything before it too.
    """
    for op, func, roles, *_ in reversed(records):
        if op.index < first:
            break
        name = getattr(func, "_opname", "")
        if name in SAVES_NOTHING or _scales_by_a_number(name, roles):
            continue
        return op.forward if name in SAVES_INPUTS_FIRST else 0.0
    return 0.0


def _attention_in(records: list, first: int) -> float:
    """Forward FLOPs of the attention kernels of a checkpointed block (ops from index ``first`` on)."""
    flops = 0.0
    for op, func, *_ in reversed(records):
        if op.index < first:
            break
        if is_attention_op(func):
            flops += op.forward
    return flops


def _scales_by_a_number(name: str, roles: list) -> bool:
    """A product or quotient with a Python number (Granite's residual multiplier): autograd saves nothing for it."""
    return name in ("mul", "div", "mul_", "div_") and sum(isinstance(r, _TensorSpec) for r in roles) == 1


def measure_flops(
    model: nn.Module,
    batch: Mapping[str, Any],
    trainable: Iterable[str] | None = None,
    loss_fn: LossFn = default_loss,
) -> tuple[float, float]:
    """(forward, backward) FLOPs of one step measured by FlopCounterMode with only ``trainable`` tensors trainable.

    It runs ``loss.backward()``, so hooks on the tensors' gradients fire: a layer-wise optimizer's (transformers'
    ``optim="galore_adamw_layerwise"``) would step them. Measure such a model with its hooks removed, or on a copy.

    ``trainable`` holds parameter names (aliases allowed); ``None`` keeps the model's own flags. Flags, ``.grad``
    and RNG state are restored afterwards. This is the ground truth the profile is checked against.
    """
    register_flop_formulas()
    params = list(model.parameters())
    # set aside, not kept in place: backward would add into existing gradient tensors, whose values restoring the
    # same tensors would not undo (a step audited between its backward and its optimizer step would train on more)
    grads = [p.grad for p in params]
    with requires_grad_kept(params):
        if trainable is not None:
            wanted = {id(model.get_parameter(n)) for n in trainable}
            for p in params:
                p.requires_grad_(id(p) in wanted and is_trainable_storage(p))
        try:
            for p in params:
                p.grad = None
            with fork_rng(), fused_attention_on_meta():
                with FlopCounterMode(display=False) as counter:
                    loss = loss_fn(model, batch)
                forward = float(counter.get_total_flops())
                backward = 0.0
                if loss.requires_grad:
                    with FlopCounterMode(display=False) as counter:
                        loss.backward()
                    backward = float(counter.get_total_flops())
        finally:
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
    return forward, backward


def dummy_batch(
    config: Any,
    batch_size: int = 4,
    seq_len: int = 512,
    target_len: int | None = None,
    device: str | torch.device = "meta",
) -> dict[str, torch.Tensor]:
    """A batch of the given shape for profiling: ``input_ids`` and ``labels``.

    Encoder-decoder configs (``config.is_encoder_decoder``) get ``labels`` of ``target_len`` (default ``seq_len``),
    from which transformers derives the decoder inputs.
    """
    vocab = int(getattr(config, "vocab_size", 2))
    ids = torch.randint(0, vocab, (batch_size, seq_len), device="cpu").to(device)
    batch = {"input_ids": ids}  # no attention mask: all-ones is the default, and masks need .item() on meta
    if getattr(config, "is_encoder_decoder", False):
        batch["labels"] = torch.randint(0, vocab, (batch_size, target_len or seq_len)).to(device)
    else:
        batch["labels"] = ids.clone()
    return batch
