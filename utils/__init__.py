"""Helpers shared by codec.py, train.py and test.py."""
