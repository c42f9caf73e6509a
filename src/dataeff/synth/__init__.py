"""Synthetic data: producers that write JSONL corpora (a "text" field plus provenance fields), and the tools that
measure and clean them (near-duplicate detection, quality metrics). Training never imports this package; it reads
the corpora through ``data.synthetic``.
"""
