"""peft-greentrainer: GreenTrainer for Hugging Face PEFT."""

from .flops import register_flop_formulas

register_flop_formulas()

__version__ = "0.1.0"
