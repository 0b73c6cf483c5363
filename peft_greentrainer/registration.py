"""How an out-of-tree method joins PEFT 0.21: a ``PeftType`` member plus ``register_peft_method``.

PEFT looks methods up by ``PeftType``, a closed enum. We add the member ``GREENTRAINER`` to it (once per process,
idempotently), then register the config and tuner classes. After ``import peft_greentrainer``, ``get_peft_model``,
``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained`` and the state-dict helpers all know the method.
A units="lora" adapter is saved as a plain LoRA adapter with GreenTrainer's fields alongside (config.py), so it loads
without this package. Some PEFT behaviours need a hook, each idempotent and inert for other methods' adapters:

* Loading: PEFT builds the config from ``adapter_config.json`` alone, which says LoRA. With this package imported, a
  LoRA directory that also holds ``greentrainer_config.json`` loads as the ``GreenTrainerConfig`` it was saved from
  (local directories; from the Hub it loads as plain LoRA). Directories without that file are untouched. Where the
  adapter joins plain LoRA it stays plain LoRA, as without this package: ``load_adapter`` of a PeftModel of another
  method, and transformers' own ``model.load_adapter`` (which has no GreenTrainer tuner to train with). The other
  way round, a plain ``LoraConfig`` added to (or loaded into) a GreenTrainer model joins it as a units="lora"
  ``GreenTrainerConfig`` with the active adapter's GreenTrainer fields (a DPO reference adapter, say), where PEFT
  would refuse to mix the two methods.
* ``PeftModel.disable_adapter()`` inspects the adapter layers before it asks the tuner to disable them, so a tuner
  that has none (units="tensors") would fail there with PEFT's unrelated "No adapter layers found". The hook lets the
  tuner refuse first, with its own message.
"""

from __future__ import annotations

import contextlib
import contextvars
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
    _keep_plain_lora_plain()
    _let_plain_lora_join(config_cls)
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
        if type(config) is not LoraConfig or _AS_PLAIN_LORA.get():
            return config
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        metadata = config_cls.read_metadata(directory) if os.path.isdir(directory) else None
        return config if metadata is None else config_cls.from_lora_config(config, metadata)

    from_pretrained._greentrainer_hook = True
    PeftConfigMixin.from_pretrained = classmethod(from_pretrained)


# set while an adapter is loaded where it joins plain LoRA: its GreenTrainer metadata is then not read
_AS_PLAIN_LORA = contextvars.ContextVar("greentrainer_load_as_plain_lora", default=False)


@contextlib.contextmanager
def _loading_as_plain_lora(plain: bool = True):
    token = _AS_PLAIN_LORA.set(plain)
    try:
        yield
    finally:
        _AS_PLAIN_LORA.reset(token)


def _keep_plain_lora_plain() -> None:
    """Wrap ``PeftModel.load_adapter`` (on a model of another method) and transformers' ``load_adapter`` to load a
    units="lora" adapter as the plain LoRA adapter it is on disk (idempotent)."""
    from peft import PeftModel
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftModel.load_adapter
    if not getattr(original, "_greentrainer_hook", False):

        @functools.wraps(original)
        def load_adapter(self, *args, **kwargs):
            # (PeftMixedModel calls this on itself and has no peft_type: its adapters are never GreenTrainer's)
            with _loading_as_plain_lora(getattr(self, "peft_type", None) != GREENTRAINER_PEFT_TYPE):
                return original(self, *args, **kwargs)

        load_adapter._greentrainer_hook = True
        PeftModel.load_adapter = load_adapter

    original_hf = PeftAdapterMixin.load_adapter
    if not getattr(original_hf, "_greentrainer_hook", False):

        @functools.wraps(original_hf)
        def load_adapter_hf(self, *args, **kwargs):
            with _loading_as_plain_lora():
                return original_hf(self, *args, **kwargs)

        load_adapter_hf._greentrainer_hook = True
        PeftAdapterMixin.load_adapter = load_adapter_hf


def _let_plain_lora_join(config_cls) -> None:
    """Wrap ``PeftModel.add_adapter``: a plain ``LoraConfig`` added to a GreenTrainer model becomes a units="lora"
    ``config_cls`` with the active adapter's GreenTrainer fields (``load_adapter`` adds through it too)."""
    from peft import LoraConfig, PeftModel

    original = PeftModel.add_adapter
    if getattr(original, "_greentrainer_hook", False):
        return

    @functools.wraps(original)
    def add_adapter(self, adapter_name, peft_config, *args, **kwargs):
        if type(peft_config) is LoraConfig and self.peft_type == GREENTRAINER_PEFT_TYPE:
            # the active adapter's patterns name its modules, not this adapter's
            fields = {**self.peft_config[self.active_adapters[0]].greentrainer_fields(), "units": "lora"}
            fields.update(include_patterns=None, exclude_patterns=None)
            inference_mode = peft_config.inference_mode
            peft_config = config_cls.from_lora_config(peft_config, fields)
            peft_config.inference_mode = inference_mode
        return original(self, adapter_name, peft_config, *args, **kwargs)

    add_adapter._greentrainer_hook = True
    PeftModel.add_adapter = add_adapter
