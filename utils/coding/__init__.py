"""Bitstreams: the .cps/.cpsl container and the fast context coder over
CompressAI's rANS.

``ORDERS`` lives here, free of PyTorch, so that command lines offer it before the
heavy libraries load.
"""

ORDERS = ("wavefront", "raster")
