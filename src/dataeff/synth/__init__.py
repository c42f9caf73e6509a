"""Synthetic-data producers: embedding and pairing documents (SBP), and the generators that build on them.

Producers write file formats (embedding shards, pair tables, JSONL corpora with a ``text`` field plus
provenance); training reads only those formats, never this package.
"""
