"""The data layer: corpora → documents → a tokenizer → a content-addressed token store → the epoch order.

- ``config``: :class:`DataConfig` (corpus, splits, token budget, synthetic mix) and :class:`TokenizerConfig`;
- ``corpora``: named corpora under ``DATAEFF_DATA_DIR``, local files and Hugging Face datasets as documents;
- ``tokenizer``: byte-level BPE, word-level, or a ``tokenizer.json``;
- ``tokens``: the token store (``prepare``), its splits (train, val, test, synthetic) and fitness slices;
- ``order``: the per-epoch shuffle of training windows, a pure function of (seed, epoch).

Synthetic corpora reach training only through ``DataConfig.synthetic``: producers write files, this layer reads them.
"""

from dataeff._imports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "config": ["DataConfig", "Format"],
    "corpora": ["DATA_DIR_ENV", "NAMED_CORPORA", "NamedCorpus", "NamedSource", "Source", "corpus_fingerprint",
                "corpus_name", "data_root", "default_tokenizer_kind", "file_sha256", "holdout", "load_documents",
                "named_corpus_default_tokenizer", "read_path", "read_source", "resolve_sources", "split_text"],
})
