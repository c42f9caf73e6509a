"""Generation: the KV-cached sampler for runs and ensembles (``sample``), the generation client for any
OpenAI-compatible endpoint or a local model (``llm``), and an OpenAI-compatible server for dataeff models
(``serve``)."""
