"""Generation: the KV-cached sampler for runs and ensembles (``sample``)."""
