"""pytest plugin: run PEFT's own ``tests/test_custom_models.py`` against GreenTrainer, without editing PEFT's files.

Loaded with ``-p greentrainer_peft_suite`` by ``run_peft_suite.py`` (which fetches the suite of the installed peft
version). What it changes, at collection time only:

* **LoRA cases become GreenTrainer cases.** Every ``pytest.mark.parametrize`` of the suite that holds ``LoraConfig``
  (the class, or an instance) gets a ``GreenTrainerConfig(units="lora")`` in its place: the class
  ``GreenTrainerLoraConfig`` below, or an instance of it with the same fields. Other PEFT methods' cases, and tests
  that write ``LoraConfig(...)`` inline instead of taking it as a parameter, are deselected (they test other methods
  or PEFT internals, not a config class swapped in).
* **Identity checks mean "is LoRA".** The suite asks ``config_cls == LoraConfig`` and
  ``config_cls in (..., LoraConfig)`` to decide LoRA-specific steps (where ``issubclass`` would be the general form).
  ``GreenTrainerLoraConfig`` compares equal to ``LoraConfig`` through its metaclass, which is exactly the
  ``issubclass`` answer: it *is* a LoraConfig.
* **units="tensors"** runs, one case per model of the LoRA cases, the suite's tests that make sense for base tensors
  trained in place: forward passes (fp32/fp16/bf16), save/load round trips and merge_and_unload. Its config is a
  LoraConfig too (the LoRA fields the suite sets, such as ``init_lora_weights``, are accepted and ignored).
* ``--greentrainer-subset=ci`` keeps a representative subset (see ``CI_CASES``); ``full`` (default) keeps all.
* ``--greentrainer-reference`` runs the same LoRA cases with PEFT's own ``LoraConfig``: the baseline to compare with.

Nothing is copied from PEFT: the cases and tests are PEFT's, taken from its sdist at run time.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from collections import Counter
from dataclasses import dataclass

import pytest
from peft import LoraConfig

from peft_greentrainer import GreenTrainerConfig

LORA_MARK = "greentrainer_lora"
TENSORS_MARK = "greentrainer_tensors"

# TEST_CASES-style tests that are meaningful for units="tensors" (the base model's own tensors, trained in place):
# forward passes, saving/loading, merging. The others need LoRA layers, a second adapter or disable_adapter(), which
# units="tensors" does not have by design (one adapter; the original weights are not kept). Others assume an adapter
# apart from the base: test_merge_layers, test_safe_merge and test_save_load_roundtrip first assert that the untrained
# adapter (init_lora_weights=False) already changes the output, which base tensors cannot do before training (on the
# MLP they would pass only because its dropout makes two train-mode calls differ), and test_training_custom_models
# asserts that only adapter tensors receive gradients. merge_and_unload of trained tensors: tests/test_tuner.py.
TENSORS_TESTS = {
    "test_forward_output_finite",
    "test_forward_float16",
    "test_forward_bfloat16",
    "test_forward_float16_no_autocast",
    "test_forward_bfloat16_no_autocast",
    "test_save_pretrained",
    "test_save_pretrained_pickle",
    "test_inference_safetensors",
    "test_peft_model_device_map",
    "test_from_pretrained_config_construction",
    "test_parameters_after_loading_model",
    "test_merge_layers_fp16",
    "test_get_base_model_state_dict",
}

# The CI subset: one LoRA case per model kind and per LoRA feature (plain, modules_to_save, dropout, DoRA, LoRA bias,
# trainable tokens, grouped convs, nn.Parameter targets), every test function, plus the multi-adapter classes whole.
CI_CASES = {
    "Vanilla MLP 5 LoRA",
    "Vanilla MLP 6 LoRA",
    "Vanilla MLP 8 LoRA with DoRA",
    "Embedding + transformers Conv1D 3 LoRA",
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens",
    "Conv1d LoRA",
    "Conv2d 2 LoRA",
    "Conv2d Groups LoRA",
    "Conv3d 1 LoRA with DoRA",
    "Conv2d 1 LoRA with lora_b bias",
    "MHA 2 LoRA",
    "MLP 2 using nn.Parameter LoRA",
}
CI_TENSORS_MODELS = {"MLP", "EmbConv1D", "Conv2d", "MHA"}


_PARAMETER_SET = type(pytest.param())


class _IsLora(type):
    """Metaclass: the class compares equal to ``LoraConfig`` (what ``issubclass(cls, LoraConfig)`` answers)."""

    def __eq__(cls, other):
        return cls is other or other is LoraConfig

    def __ne__(cls, other):
        return not (cls is other or other is LoraConfig)

    __hash__ = type.__hash__


@dataclass
class GreenTrainerLoraConfig(GreenTrainerConfig, metaclass=_IsLora):
    """``GreenTrainerConfig`` with ``units="lora"`` as default, standing in for ``LoraConfig`` in PEFT's cases."""

    units: str = "lora"


@dataclass
class GreenTrainerTensorsConfig(GreenTrainerConfig, metaclass=_IsLora):
    """``GreenTrainerConfig(units="tensors")``: the LoRA fields the suite sets are accepted and ignored (documented)."""

    units: str = "tensors"


def _as_greentrainer(value):
    """The GreenTrainer stand-in for ``LoraConfig`` (the class or an instance), else ``value`` unchanged."""
    if value is LoraConfig:
        return GreenTrainerLoraConfig
    if type(value) is LoraConfig:
        init = {f.name: getattr(value, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
        init.pop("peft_type", None)
        return GreenTrainerLoraConfig(**init)
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--greentrainer-subset",
        choices=("ci", "full"),
        default="full",
        help="ci: the representative subset run in CI; full: every LoRA case of the suite (default).",
    )
    parser.addoption("--greentrainer-report", default=None, help="write outcome counts and skip reasons here (JSON)")
    parser.addoption(
        "--greentrainer-reference",
        action="store_true",
        help="run the same LoRA cases with PEFT's own LoraConfig (nothing swapped in), for comparison",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{LORA_MARK}: a PEFT LoRA case run with GreenTrainerConfig(units='lora')")
    config.addinivalue_line("markers", f"{TENSORS_MARK}: a PEFT case run with GreenTrainerConfig(units='tensors')")
    _provide_diffusers_placeholder()


def _provide_diffusers_placeholder() -> None:
    """PEFT's ``testing_common`` imports diffusers at module level for its Stable Diffusion tests, which this plugin
    never runs. Where diffusers is not installed, a placeholder module stands in and fails loudly if used."""
    import importlib.util

    if "diffusers" in sys.modules or importlib.util.find_spec("diffusers") is not None:
        return

    class StableDiffusionPipeline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("diffusers is not installed: install it to run PEFT's Stable Diffusion tests.")

        from_pretrained = classmethod(__init__)

    placeholder = types.ModuleType("diffusers")
    placeholder.StableDiffusionPipeline = StableDiffusionPipeline
    sys.modules["diffusers"] = placeholder


def _argnames(argnames) -> list[str]:
    if isinstance(argnames, str):
        return [name.strip() for name in argnames.split(",") if name.strip()]
    return list(argnames)


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Rewrite the function's parametrize marks before pytest expands them (pytest's own hook runs after this one)."""
    subset = metafunc.config.getoption("--greentrainer-subset")
    reference = metafunc.config.getoption("--greentrainer-reference")
    markers = metafunc.definition.own_markers
    for index, mark in enumerate(markers):
        if mark.name != "parametrize":
            continue
        names = _argnames(mark.args[0])
        rewritten = []
        lora_models: dict[str, None] = {}
        for value in mark.args[1]:
            param = value if isinstance(value, _PARAMETER_SET) else None
            values = tuple(param.values) if param else ((value,) if len(names) == 1 else tuple(value))
            swapped = tuple(_as_greentrainer(v) for v in values)
            if all(new is old for new, old in zip(swapped, values, strict=True)):
                continue  # not a LoRA case
            if reference:
                swapped = values
            case = dict(zip(names, swapped, strict=True))
            if subset == "ci" and "test_name" in case and "model_id" in case and case["test_name"] not in CI_CASES:
                continue
            if "model_id" in case:
                lora_models.setdefault(case["model_id"], None)
            marks = [*(param.marks if param else ()), getattr(pytest.mark, LORA_MARK)]
            case_id = f"greentrainer-lora-{case['test_name']}" if "test_name" in case else None
            rewritten.append(pytest.param(*swapped, marks=marks, id=param.id if param and param.id else case_id))
        if not rewritten:
            continue
        if (
            names == ["test_name", "model_id", "config_cls", "config_kwargs"]
            and metafunc.function.__name__ in (TENSORS_TESTS)
            and not reference
        ):
            for model_id in lora_models:
                if subset == "ci" and model_id not in CI_TENSORS_MODELS:
                    continue
                name = f"{model_id} GreenTrainer tensors"
                rewritten.append(
                    pytest.param(
                        name,
                        model_id,
                        GreenTrainerTensorsConfig,
                        {},
                        marks=getattr(pytest.mark, TENSORS_MARK),
                        id=f"greentrainer-tensors-{model_id}",
                    )
                )
        markers[index] = pytest.mark.parametrize(mark.args[0], rewritten, **mark.kwargs).mark


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep only the GreenTrainer cases; everything else in the file tests other methods or PEFT internals."""
    kept, deselected = [], []
    for item in items:
        ours = item.get_closest_marker(LORA_MARK) or item.get_closest_marker(TENSORS_MARK)
        (kept if ours else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


class _Outcomes:
    """Each test's outcome (a failure in setup or teardown counts as failed) and every skip's reason."""

    def __init__(self) -> None:
        self.outcome: dict[str, str] = {}
        self.kind: dict[str, str] = {}
        self.skip_reasons: Counter[str] = Counter()

    def add(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.outcome[report.nodeid] = "failed"
        elif report.skipped and report.when in ("setup", "call"):
            self.outcome[report.nodeid] = "skipped"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skip_reasons[reason.removeprefix("Skipped: ")] += 1
        elif report.when == "call" and self.outcome.get(report.nodeid) != "failed":
            self.outcome[report.nodeid] = "passed"

    def summary(self) -> dict:
        counts = Counter(f"{self.kind.get(node, '?')} {outcome}" for node, outcome in self.outcome.items())
        by_test: dict[str, Counter] = {}
        for node, outcome in self.outcome.items():
            by_test.setdefault(node.split("::")[-1].split("[")[0], Counter())[outcome] += 1
        return {
            "counts": dict(sorted(counts.items())),
            "skip_reasons": dict(self.skip_reasons.most_common()),
            "by_test": {name: dict(sorted(c.items())) for name, c in sorted(by_test.items())},
        }


_OUTCOMES = _Outcomes()


def pytest_itemcollected(item: pytest.Item) -> None:
    _OUTCOMES.kind[item.nodeid] = "tensors" if item.get_closest_marker(TENSORS_MARK) else "lora"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _OUTCOMES.add(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--greentrainer-report")
    if path:
        with open(path, "w") as handle:
            json.dump(_OUTCOMES.summary(), handle, indent=1)
