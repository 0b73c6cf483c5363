"""``python -m peft_greentrainer.cli``: the same as the ``greentrainer`` console script."""

import sys

from . import main

sys.exit(main())
