"""The listing of a model's modules the step check reuses: reused exactly while a fresh walk would list the same."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from peft_greentrainer.engine.module_tree import ModuleTree


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 4), nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.ReLU()}), nn.Sequential(nn.Linear(4, 2))
    )


class _Gelu(nn.ReLU):
    pass


class _WalksItsOwnWay(nn.Module):
    def named_modules(self, *args, **kwargs):
        yield from super().named_modules(*args, **kwargs)


def _add(model: nn.Module) -> None:
    model[2].extra = nn.Linear(2, 2)


def _delete(model: nn.Module) -> None:
    del model[1]["a"]  # ModuleDict deletion registers nothing: no torch hook would tell


def _replace(model: nn.Module) -> None:
    model[1]["b"] = nn.ReLU()  # the same name and class, another module


def _reorder(model: nn.Module) -> None:
    model[1]["a"] = model[1].pop("a")  # the same items in another order: another walk order


def _swap_class(model: nn.Module) -> None:
    model[1]["b"].__class__ = _Gelu  # what fully_shard does to a module


def _rename(model: nn.Module) -> None:
    model[1]["c"] = model[1].pop("b")


def _share(model: nn.Module) -> None:
    model[2].again = model[0]  # listed once: named_modules drops duplicates


@pytest.mark.parametrize("change", [_add, _delete, _replace, _reorder, _swap_class, _rename, _share])
def test_a_listing_is_made_again_after_any_change_of_the_tree(change):
    model = _model()
    tree = ModuleTree(model)
    assert ModuleTree.of(model, tree) is tree  # unchanged: reused
    change(model)
    fresh = ModuleTree.of(model, tree)
    assert fresh is not tree
    assert [(n, id(m)) for n, m in fresh.named] == [(n, id(m)) for n, m in model.named_modules()]
    assert ModuleTree.of(model, fresh) is fresh


def test_modes_and_hooks_are_read_at_each_use_not_listed():
    """Eval mode and forward hooks change no tree: a reused listing still sees them, as it holds the modules."""
    model = _model()
    tree = ModuleTree(model)
    model[1].eval()
    assert ModuleTree.of(model, tree) is tree
    assert [n for n, m in tree.named if not m.training] == ["1", "1.a", "1.b"]


def test_another_root_or_a_module_that_walks_its_own_way_is_listed_afresh():
    model = _model()
    tree = ModuleTree(model)
    assert ModuleTree.of(_model(), tree) is not tree
    model[2].own = _WalksItsOwnWay()
    tree = ModuleTree(model)
    assert ModuleTree.of(model, tree) is not tree


def test_a_copy_keeps_no_listing():
    """Pickled or deep-copied with the tuner, a listing is made again for the copy's own modules."""
    model = _model()
    tree = ModuleTree(model)
    copied, listing = copy.deepcopy((model, tree))
    assert ModuleTree.of(copied, listing) is not listing
    assert pickle.loads(pickle.dumps(tree)).root is None
