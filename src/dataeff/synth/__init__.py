"""Synthetic data: producers that write new training corpora (JSONL) from a world or an outside model.

Training never imports this package; what it writes reaches a run through ``data.synthetic``.
"""
