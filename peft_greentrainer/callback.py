"""``GreenTrainerCallback``: runs GreenTrainer's selections inside ``transformers.Trainer``.

It selects before the first step and every ``selection_interval`` epochs (or ``selection_interval_steps`` steps),
from its own sample of the training set (the Trainer's data order is not disturbed), adds the current selection's
figures to every Trainer log (so TensorBoard / W&B / the console receive them), and saves its state in checkpoints
so that ``trainer.train(resume_from_checkpoint=...)`` continues with the same selection instead of re-selecting.
``greentrainer/flops_ratio`` is the FLOPs of the last training step at its own batch shape, as a fraction of full
fine-tuning at that shape (``greentrainer/flops_ratio_max``: the largest since the previous log).

Under ``torchrun`` / ``accelerate launch`` every rank makes the same selection at the same step (see ``ranks.py``
and ``distributed.py``): importance is evaluated on the global batches, sharded across ranks, and the Trainer's DDP
wrapper is set up to reduce whichever units are trained. Under FSDP2 (``fsdp.py``) importance runs through the FSDP
root on the local shards, and checkpoints are made to hold every unit and optimizer state a resumed run needs.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback, ExportableState

from . import distributed, fsdp, ranks
from .engine.profile import default_loss
from .model import GreenTrainerModel, GreenTrainerState, find_tuner
from .sampling import importance_batches
from .sparse_head import attached_sparse_lm_head

logger = logging.getLogger(__name__)

LOG_PREFIX = "greentrainer/"
_LOSS_FN_KEY = "_greentrainer_callback_loss_fn"

__all__ = ["GreenTrainerCallback", "find_tuner"]


class GreenTrainerCallback(TrainerCallback, ExportableState):
    """Selects the units to train during ``Trainer.train``.

    Resuming needs nothing from the user: the selection state is exported to ``trainer_state.json`` of every
    checkpoint, and a resumed run reads it back from the restored ``TrainerState`` whether or not
    ``TrainingArguments(restore_callback_states_from_checkpoint=True)`` is set.

    Args:
        loss_fn: ``loss_fn(model, batch) -> loss`` used for importance; defaults to ``model(**batch).loss``, which is
            what the Trainer optimizes unless it changes the loss: a custom ``compute_loss`` or ``compute_loss_func``,
            ``label_smoothing_factor``, or a TRL ``loss_type`` other than the model's cross-entropy. Pass that loss
            here to rank units by what is trained.
        selected / last_selection_epoch / last_selection_step / epochs_completed / state: Written by the Trainer
            when it rebuilds the callback from a checkpoint (``restore_callback_states_from_checkpoint=True``); not
            meant to be passed.
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
        *,
        selected: list[str] | None = None,
        last_selection_epoch: int = -1,
        last_selection_step: int = -1,
        epochs_completed: int = 0,
        state: dict | None = None,
    ):
        self.loss_fn = loss_fn
        self.selected = selected
        self.last_selection_epoch = last_selection_epoch
        self.last_selection_step = last_selection_step
        # passes over the data, counted here: with an IterableDataset and max_steps, TrainerState.epoch is a fraction
        # of max_steps, not the number of passes
        self.epochs_completed = epochs_completed
        self.saved_state = state
        # Rebuilt by the Trainer from a checkpoint: the user's loss_fn is not in the checkpoint (see on_init_end).
        self._rebuilt = selected is not None or state is not None

    # ExportableState: written to trainer_state.json in every checkpoint.
    def state(self) -> dict:
        return {
            "args": {
                "selected": self.selected,
                "last_selection_epoch": self.last_selection_epoch,
                "last_selection_step": self.last_selection_step,
                "epochs_completed": self.epochs_completed,
                "state": self.saved_state,
            },
            "attributes": {},
        }

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):
        # FSDP1 / DeepSpeed, or a model FSDP2 cannot serve: fail at Trainer(...) rather than after loading data
        distributed.check_backend(args, kwargs.get("model"))
        self._report_before_integrations()
        model = kwargs.get("model")
        if model is not None:
            # a resumed run that reloads its best checkpoint needs the base values the resume load overwrites
            find_tuner(model)._runtime.reloads_best = bool(getattr(args, "load_best_model_at_end", False))
        if model is not None and find_tuner(model).greentrainer_state.history:
            # a model trained before (a second Trainer, a second stage): the optimizer this Trainer creates must
            # hold every candidate, so they are trainable until its first selection
            find_tuner(model).unfreeze_candidates()
        if model is not None and not self._rebuilt:
            # restore_callback_states_from_checkpoint=True replaces this instance by one built from the checkpoint,
            # which cannot hold a function: leave the loss_fn with the model for it.
            find_tuner(model).__dict__[_LOSS_FN_KEY] = self.loss_fn

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._report_before_integrations()
        tuner = find_tuner(kwargs["model"])
        self._prepare_distributed(args, kwargs["model"], tuner)
        if self._rebuilt and self.loss_fn is None:
            if _LOSS_FN_KEY in tuner.__dict__:
                self.loss_fn = tuner.__dict__[_LOSS_FN_KEY]
            else:
                logger.warning("GreenTrainerCallback was rebuilt from a checkpoint and uses the model's own loss.")
        loss_type = getattr(args, "loss_type", "nll")  # TRL's configs: "nll" is the model's own cross-entropy
        # TRL's trainers smooth only their "nll" loss (DPOConfig's loss_type is a list: never smoothed)
        if self.loss_fn is None and args.label_smoothing_factor > 0 and loss_type == "nll":
            logger.warning(
                "label_smoothing_factor=%g: unless a compute_loss_func or the trainer's own loss replaces it, training "
                "smooths its labels, while importance ranks units by the model's own loss; pass the loss trained as "
                "GreenTrainerCallback(loss_fn=...) (the README shows one with LabelSmoother).",
                args.label_smoothing_factor,
            )
        if self.loss_fn is None and loss_type not in ("nll", None):
            logger.warning(
                "loss_type=%r: the trainer trains that loss, while importance ranks units by the model's own loss; "
                "pass the loss trained as GreenTrainerCallback(loss_fn=...) (a TRL trainer's own compute_loss counts "
                "the importance passes in its logged metrics too, num_tokens included).",
                loss_type,
            )
        saved = self.checkpoint_state(state) if state.global_step > 0 else None
        if saved is not None and saved.get("selected") is not None:  # resuming: same selection, no new importance
            self.selected = list(saved["selected"])
            self.last_selection_epoch = int(saved.get("last_selection_epoch", -1))
            self.last_selection_step = int(saved.get("last_selection_step", -1))
            # a checkpoint saved at an epoch's last step is written before on_epoch_end counts that epoch, and the
            # resumed Trainer skips it: the passes its state has finished count too
            finished = math.floor((state.epoch or 0.0) + 1e-6)
            self.epochs_completed = max(int(saved.get("epochs_completed", finished)), finished)
            self.saved_state = saved.get("state")
            if self.saved_state:
                tuner.greentrainer_state = GreenTrainerState.from_dict(self.saved_state)
            tuner.restore_selection(self.selected, kwargs.get("optimizer"))
            if fsdp.is_sharded(tuner.model):
                fsdp.finish_resume(kwargs.get("optimizer"))
            logger.info(
                "GreenTrainer resumed the selection of %d units at step %d.", len(self.selected), state.global_step
            )
            return
        self.epochs_completed = 0
        self._select(args, state, tuner, kwargs)

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        tuner = find_tuner(kwargs["model"])
        fsdp.finish_checkpoint(tuner)
        if tuner.greentrainer_config.selection_interval_steps is not None:
            return
        epoch = self.epochs_completed
        if epoch > self.last_selection_epoch and epoch % tuner.greentrainer_config.selection_interval == 0:
            self._select(args, state, tuner, kwargs)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        tuner = find_tuner(kwargs["model"])
        fsdp.finish_checkpoint(tuner)
        tuner.note_training_position(state.global_step, float(state.epoch or 0.0))
        interval = tuner.greentrainer_config.selection_interval_steps
        if interval is None or state.global_step == self.last_selection_step:
            return
        if state.global_step % interval == 0:
            self._select(args, state, tuner, kwargs)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # a step at a new batch shape may have re-selected (model.py): checkpoints must resume with that selection
        tuner = find_tuner(kwargs["model"])
        history = tuner.greentrainer_state.history
        if history and len((self.saved_state or {}).get("history", [])) != len(history):
            self.selected = list(tuner.greentrainer_state.selected)
            self.saved_state = tuner.greentrainer_state.to_dict()
        if control.should_save or control.should_evaluate:  # FSDP2: what a checkpoint must hold (fsdp.py)
            fsdp.prepare_checkpoint(tuner, kwargs.get("optimizer"))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.epochs_completed += 1
        if control.should_save or control.should_evaluate:
            fsdp.prepare_checkpoint(find_tuner(kwargs["model"]), kwargs.get("optimizer"))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        fsdp.finish_checkpoint(find_tuner(kwargs["model"]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or kwargs.get("model") is None:
            return
        tuner = find_tuner(kwargs["model"])
        record = tuner.greentrainer_state.last
        if record is None:
            return
        # the steps that ran, each at its own batch shape; before any, what the selection predicted
        steps = tuner.step_flops_ratios()
        last, largest = steps if steps is not None else (record.predicted_ratio, record.predicted_ratio)
        figures = {
            f"{LOG_PREFIX}flops_ratio": last,
            f"{LOG_PREFIX}flops_ratio_max": largest,
            f"{LOG_PREFIX}units_selected": len(record.selected),
            f"{LOG_PREFIX}units_total": record.num_units,
            f"{LOG_PREFIX}selection_seconds": record.seconds,
        }
        if record.ratio_vs_lora is not None:
            figures[f"{LOG_PREFIX}flops_ratio_vs_lora"] = record.ratio_vs_lora
        head = attached_sparse_lm_head(find_tuner(kwargs["model"]).model)
        if head is not None and head.kept_share is not None:
            figures[f"{LOG_PREFIX}lm_head_kept_share"] = head.kept_share  # positions the sparse LM head ran on
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)

    # ------------------------------------------------------------------ helpers
    @classmethod
    def checkpoint_state(cls, state: TrainerState) -> dict | None:
        """This callback's exported state in the checkpoint being resumed (the Trainer loaded it into ``state``)."""
        saved = (state.stateful_callbacks or {}).get(cls.__name__)
        if isinstance(saved, list):  # several instances of this class: the Trainer keeps them in list order
            saved = saved[0] if saved else None
        return saved.get("args") if isinstance(saved, dict) else None

    @staticmethod
    def _prepare_distributed(args: TrainingArguments, model: torch.nn.Module, tuner: GreenTrainerModel) -> None:
        """Refuse FSDP1 / DeepSpeed; make the DDP wrapper reduce every unit a selection may train (every rank)."""
        distributed.check_backend(args, model)
        if fsdp.is_sharded(model):  # FSDP2 reduces whatever requires grad; importance must enter through its root
            fsdp.attach(tuner, model)
            return
        if not ranks.is_distributed():
            return
        ddp = distributed.find_ddp(model)
        if ddp is None:
            distributed.warn_no_wrapper()
            return
        if (args.ddp_find_unused_parameters is False or args.ddp_static_graph) and args.process_index == 0:
            logger.warning(
                "GreenTrainer overrides TrainingArguments(ddp_find_unused_parameters=%s, ddp_static_graph=%s): units "
                "are frozen and unfrozen between selections, which DDP only follows with find_unused_parameters=True "
                "and no static graph.",
                args.ddp_find_unused_parameters,
                args.ddp_static_graph,
            )
        distributed.prepare_ddp(ddp, distributed.candidate_parameters(tuner))

    def _select(self, args: TrainingArguments, state: TrainerState, tuner: GreenTrainerModel, kwargs: dict) -> None:
        config = tuner.greentrainer_config
        # the importance selections so far: re-selections for a new batch shape depend on which shapes this process
        # has priced, which a resumed run learns again, and must not move later draws
        index = sum(record.reason != "batch shape" for record in tuner.greentrainer_state.history)
        rank, world_size = ranks.rank_and_world_size()
        loader = kwargs.get("train_dataloader")
        batches = list(
            importance_batches(loader, config.importance_batches, args.seed + index, rank, world_size, draw=index)
        )
        if batches and not isinstance(batches[0], Mapping):
            raise TypeError(
                "GreenTrainerCallback ranks units on batches from the Trainer's data loader, and this one yields "
                f"{type(batches[0]).__name__} objects, not model inputs: the trainer builds its inputs in each step "
                "(TRL's GRPO and RLOO generate their completions there), so the callback has nothing to estimate "
                "importance on. Train it with plain LoRA (peft.LoraConfig), or call model.base_model.select_units("
                "batches, optimizer) yourself with batches shaped as its training forward."
            )
        # each rank evaluates its share of the global batches; averaged gradients make the importance that of the
        # global batch, the same on every rank (a no-op in a single process)
        averaged = [] if fsdp.is_sharded(tuner.model) else distributed.candidate_parameters(tuner)  # FSDP2 averages
        loss_fn = self.loss_fn
        if loss_fn is None and getattr(args, "average_tokens_across_devices", False) and _takes_loss_kwargs(tuner):
            loss_fn = ranks.weighted_by_target_share(default_loss)  # the global mean over targets, as trained
        with ranks.gradients_averaged_across_ranks(averaged), _training_autocast(args, fsdp.is_sharded(tuner.model)):
            tuner.select_units(
                batches,
                kwargs.get("optimizer"),
                loss_fn=loss_fn,
                lr=args.learning_rate,
                max_grad_norm=getattr(args, "max_grad_norm", None),
                step=state.global_step,
                epoch=float(state.epoch or 0.0),
            )
        self.selected = list(tuner.greentrainer_state.selected)
        self.last_selection_epoch = self.epochs_completed
        self.last_selection_step = state.global_step
        self.saved_state = tuner.greentrainer_state.to_dict()

    def _report_before_integrations(self) -> None:
        """Move this callback ahead of the reporting integrations, so the figures it adds to a log reach them.

        The Trainer runs its default callbacks (TensorBoard, W&B, ...) before user callbacks and hands callbacks no
        reference to itself; the handler's list is found as the list that holds this callback and the Trainer's
        ``DefaultFlowCallback`` (the user's own ``callbacks=[...]`` list, which holds this callback too, is left as
        it is). Callbacks that measure the selections (``measures_selections``: the energy receipt, which moves
        itself ahead too) stay ahead of this one, so that the first selection, at train begin, falls inside them.
        """
        for referrer in gc.get_referrers(self):
            if (
                isinstance(referrer, list)
                and all(isinstance(c, TrainerCallback) for c in referrer)
                and any(isinstance(c, DefaultFlowCallback) for c in referrer)
            ):
                referrer.remove(self)
                ahead = [c for c in referrer if isinstance(c, DefaultFlowCallback)]
                if not getattr(self, "measures_selections", False):
                    ahead += [c for c in referrer if getattr(c, "measures_selections", False)]
                referrer.insert(len(ahead), self)
                return


def _training_autocast(args: TrainingArguments, sharded: bool) -> contextlib.AbstractContextManager:
    """The autocast a ``Trainer(bf16=True)`` or ``Trainer(fp16=True)`` trains under, for the selection's forward and
    backward passes.

    accelerate enters it around the wrapped model's forward only, and the selection calls the tuner's model directly:
    without it, importance would run in float32, on a GPU slower than a training step and with about twice its
    activation memory, and the selection would be priced at float32's kernels and made again at the first step. Under
    float16 the importance scales its loss as the Trainer's steps are scaled (``engine/importance.py``); an FSDP2
    model's importance (``fsdp.py``), which accumulates sharded gradients it cannot take back, is not scaled, so it
    stays in float32 there.
    """
    if getattr(args, "bf16", False):
        return torch.autocast(device_type=args.device.type, dtype=torch.bfloat16)  # the device accelerate autocasts
    if getattr(args, "fp16", False) and not sharded:
        return torch.autocast(device_type=args.device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _takes_loss_kwargs(tuner: GreenTrainerModel) -> bool:
    """Whether the Trainer hands the model the global batch's target count (``num_items_in_batch``), so that ranks'
    losses are means over the global batch's targets: as the Trainer decides it, from the model's
    ``accepts_loss_kwargs`` or a ``**kwargs`` in its forward."""
    model = tuner.model
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)
