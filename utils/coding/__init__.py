"""Bitstreams: the .cps/.cpsl container and the fast context coder over CompressAI's rANS."""
