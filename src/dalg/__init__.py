"""DALG: Deep Attentive Local and Global modeling for image retrieval (reconstruction)."""

__version__ = "0.1.0"
