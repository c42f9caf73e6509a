"""Generation: sampling from trained models (``dataeff.sample``), the LLM client (``dataeff.generate.llm``)
and an OpenAI-compatible server for dataeff models (``dataeff.generate.serve``)."""
