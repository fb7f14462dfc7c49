"""CPS (Zhang et al., IEEE SPL 2025): the padding-free network and its POPS codec."""

from models.cps.network import CPS

__all__ = ["CPS"]
