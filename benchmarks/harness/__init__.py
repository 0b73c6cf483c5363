"""The benchmarks' shared harness: what every comparison needs once, so that a benchmark script is only a driver.

* ``workload``: the base model factory, tokenizer and tokenized data every method shares (the embedded SmolLM2 on
  ACLSum, or a tiny config-built model on synthetic data for ``--quick`` runs and tests).
* ``methods``: the registry, ``method key -> how to build the trainable model, its learning-rate family, its callbacks
  and optimizer``. Adding a method is one ``register(...)`` entry.
* ``runner``: trains one configured method with the Trainer and measures it (FLOPs counted on sampled steps and
  predicted for every step, wall time, peak RSS, selection cost, held-out loss curve, ROUGE).
* ``report``: formatting and plots of measured rows.
"""
