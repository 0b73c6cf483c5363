"""How an out-of-tree method joins PEFT 0.21: a ``PeftType`` member plus ``register_peft_method``.

PEFT looks methods up by ``PeftType``, a closed enum. We add the member ``GREENTRAINER`` to it (once per process,
idempotently), then register the config and tuner classes. After ``import peft_greentrainer``, ``get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and the state-dict helpers all know the method.
A units="lora" adapter is saved as a plain LoRA adapter with GreenTrainer's fields alongside (config.py), so it loads
without this package. Two PEFT behaviours need a hook, both idempotent and inert for other methods' adapters:

* Loading: PEFT builds the config from ``adapter_config.json`` alone, which says LoRA. With this package imported, a
  LoRA directory that also holds ``greentrainer_config.json`` loads as the ``GreenTrainerConfig`` it was saved from
  (local directories; from the Hub it loads as plain LoRA). Directories without that file are untouched.
* ``PeftModel.disable_adapter()`` inspects the adapter layers before it asks the tuner to disable them, so a tuner
  that has none (units="tensors") would fail there with PEFT's unrelated "No adapter layers found". The hook lets the
  tuner refuse first, with its own message.
"""

from __future__ import annotations

import contextlib
import functools
import os

from peft.utils import PeftType

GREENTRAINER_NAME = "greentrainer"


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to the ``PeftType`` enum, as if it had been declared there."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)
    return member


GREENTRAINER_PEFT_TYPE = _add_peft_type_member(GREENTRAINER_NAME.upper())


def register(config_cls, model_cls) -> None:
    """Register GreenTrainer with PEFT; calling it again is a no-op."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    _let_tuners_refuse_disable_adapter()
    _load_lora_with_metadata_as(config_cls)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(GREENTRAINER_PEFT_TYPE) is model_cls:
        return
    try:
        # The tuner reuses PEFT's LoRA layers, so its parameters carry LoRA's prefix.
        register_peft_method(
            name=GREENTRAINER_NAME, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix
        )
    except KeyError:
        # A PEFT release that insists on a prefix no other method uses: register the same three entries directly.
        PEFT_TYPE_TO_PREFIX_MAPPING[GREENTRAINER_PEFT_TYPE] = model_cls.prefix
        PEFT_TYPE_TO_CONFIG_MAPPING[GREENTRAINER_PEFT_TYPE] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[GREENTRAINER_PEFT_TYPE] = model_cls


DISABLE_ADAPTER_CHECK = "check_can_disable_adapter"


def _let_tuners_refuse_disable_adapter() -> None:
    """Wrap ``PeftModel.disable_adapter`` to call the tuner's ``check_can_disable_adapter()`` first (idempotent)."""
    from peft import PeftModel

    original = PeftModel.disable_adapter
    if getattr(original, "_greentrainer_hook", False):
        return

    @contextlib.contextmanager
    @functools.wraps(original)
    def disable_adapter(self):
        check = getattr(self.base_model, DISABLE_ADAPTER_CHECK, None)
        if callable(check):
            check()
        with original(self):
            yield

    disable_adapter._greentrainer_hook = True
    PeftModel.disable_adapter = disable_adapter


def _load_lora_with_metadata_as(config_cls) -> None:
    """Wrap ``PeftConfigMixin.from_pretrained``: a LoRA config saved with GreenTrainer metadata loads as ``config_cls``.

    Every loader goes through it (``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``, ``load_adapter``).
    """
    from peft import LoraConfig
    from peft.config import PeftConfigMixin

    original = PeftConfigMixin.__dict__["from_pretrained"].__func__
    if getattr(original, "_greentrainer_hook", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        config = original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if type(config) is not LoraConfig:
            return config
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        metadata = config_cls.read_metadata(directory) if os.path.isdir(directory) else None
        return config if metadata is None else config_cls.from_lora_config(config, metadata)

    from_pretrained._greentrainer_hook = True
    PeftConfigMixin.from_pretrained = classmethod(from_pretrained)
