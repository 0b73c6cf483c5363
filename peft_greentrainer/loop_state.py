"""What a plain or accelerate training loop checkpoints besides weights and optimizer state: the selection state.

A ``Trainer`` keeps it in ``trainer_state.json`` (``callback.py``). A loop of one's own saves
``model.greentrainer_state`` beside its checkpoint; with accelerate, :class:`SelectionCheckpoint` makes
``accelerator.save_state`` and ``load_state`` carry it
(``accelerator.register_for_checkpointing(SelectionCheckpoint(model, optimizer))``), so that a resumed loop trains
the same units, and a saved adapter holds every tensor trained before the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .model import GreenTrainerState, find_tuner

__all__ = ["SelectionCheckpoint"]


class SelectionCheckpoint:
    """The selection state of a GreenTrainer model, as an object accelerate checkpoints (``state_dict`` /
    ``load_state_dict``). Loading it gives the state back and re-applies the selection in force at the checkpoint.

    Args:
        model: the ``PeftModel`` (or a wrapper around it: DDP, ``accelerator.prepare``'s).
        optimizer: the optimizer the loop trains with, given to ``restore_selection`` (accumulation windows).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._tuner = find_tuner(model)
        self._optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self._tuner.greentrainer_state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restored = GreenTrainerState.from_dict(state)
        self._tuner.greentrainer_state = restored
        if restored.selected:  # a checkpoint before the first selection: every candidate trains, as it did
            self._tuner.restore_selection(restored.selected, self._optimizer)
