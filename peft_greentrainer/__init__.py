"""peft-greentrainer: GreenTrainer for Hugging Face PEFT.

Importing the package registers the method with PEFT (``get_peft_model(model, GreenTrainerConfig(...))``) and the
FLOP formulas FlopCounterMode lacks. Three layers, each importing only the ones below it:

* ``engine/``: the algorithm on plain data (units -> profile -> importance -> selector);
* this package: the PEFT method (config, registration, model, backprop, ranks, distributed, callback, saving,
  sparse_head, energy);
* ``cli/``: the ``greentrainer`` application (data, evaluation, report, planning).
"""

import logging

# bitsandbytes (imported by peft) warns at import on CPUs with AVX512-BF16 that an optional kernel cannot be fetched
# from a hub; it falls back to its own kernel. Drop that one message, nothing else.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in str(record.msg))

from .engine.flops import register_flop_formulas  # noqa: E402

register_flop_formulas()

from .config import GreenTrainerConfig  # noqa: E402
from .model import GreenTrainerModel, GreenTrainerState  # noqa: E402
from .registration import register  # noqa: E402
from .saving import export_lora_adapter, save_adapter  # noqa: E402

register(GreenTrainerConfig, GreenTrainerModel)

from .callback import GreenTrainerCallback  # noqa: E402
from .energy import EnergyCallback, EnergyReceipt  # noqa: E402
from .loop_state import SelectionCheckpoint  # noqa: E402
from .sparse_head import enable_sparse_lm_head, sparse_lm_loss  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "EnergyCallback",
    "EnergyReceipt",
    "GreenTrainerCallback",
    "GreenTrainerConfig",
    "GreenTrainerModel",
    "GreenTrainerState",
    "SelectionCheckpoint",
    "enable_sparse_lm_head",
    "export_lora_adapter",
    "register_flop_formulas",
    "save_adapter",
    "sparse_lm_loss",
]
