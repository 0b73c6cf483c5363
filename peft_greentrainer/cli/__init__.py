"""The ``greentrainer`` command-line application: ``train`` (data -> model -> GreenTrainer -> evaluation -> report)
and ``profile`` (the cost of reaching each depth of a model, and the smallest feasible rho).

Built on the PEFT method (``peft_greentrainer``) like any user script; nothing below imports from here.
"""

from .main import main

__all__ = ["main"]
