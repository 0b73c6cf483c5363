"""The algorithm on plain data, with no PEFT tuner and no Trainer.

``units`` (what can be selected) -> ``profile`` (backward costs, measured with FlopCounterMode; ``flops`` registers
the formulas it lacks; ``targets`` says which labels a loss counts, ``label_buckets`` how a head that projects only
those is priced, ``attention_spans`` how attention that runs within the sequences the inputs delimit is) -> ``costs``
(per unit, in backward order; bounded over shapes) -> ``importance`` (``-sum(grad * delta_w)``, side-effect free) ->
``selector`` (exact budgeted DP on arrays). The PEFT method
(``peft_greentrainer.model``) composes them; this package imports nothing from it.
"""
