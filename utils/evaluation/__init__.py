"""Evaluation: runs over datasets, coders, metrics, RD curves, classical codecs, demo."""
