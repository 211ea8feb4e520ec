"""Hydra multiruns: short job folder names, the varying overrides, and the summary written after every sweep."""
