"""Kamisli et al. 2024: block-based masked convolutions with closed-loop training."""

from models.kamisli2024.network import Kamisli2024

__all__ = ["Kamisli2024"]
