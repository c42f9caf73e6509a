"""Evaluation: held-out loss, bits per byte and word perplexity (``loss``), ensembles of runs (``ensemble``),
downstream tasks (``tasks``), the lm-evaluation-harness model type (``lm_eval_adapter``) and the ``dataeff eval``
command (``command``)."""
