"""Embedding models: backbones, the side-information model and the forward transformation.

Every exported module maps named inputs with a leading batch axis B to one ``embedding`` (B, d) float32.
"""
