"""Evaluation.

Runs over datasets, coders, metrics, RD curves, classical codecs, demo.
"""
