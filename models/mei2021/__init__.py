"""Mei et al. 2021: quality- and spatially-scalable layered coding."""

from models.mei2021.network import Mei2021Quality, Mei2021Spatial

__all__ = ["Mei2021Quality", "Mei2021Spatial"]
