"""The model: a Llama-family decoder (``transformer``), its config and presets (``config``), and conversion to and
from Hugging Face ``transformers`` (``hf``)."""

from dataeff._imports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "config": ["PRESETS", "ModelConfig", "count_parameters", "flops_per_token"],
    "transformer": ["Attention", "Block", "KVCache", "RMSNorm", "StepWeights", "SwiGLU", "Transformer", "apply_rope",
                    "packed_linear", "rope_cache"],
})
