"""Synthetic-data generators (EntiGraph, SBP, rephrasing) and the theory behind them.

Each generator writes a JSONL corpus that training reads through ``data.synthetic``; nothing in training
imports this package.
"""
