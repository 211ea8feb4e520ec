"""DALG: Deep Attentive Local and Global modeling for image retrieval (reconstruction).

``from dalg import create_model`` builds any model config by name (dalg.factory).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["create_model"]


def __getattr__(name: str) -> Any:
    # imported on first use: `import dalg.models...` (every submodule import runs this file) stays free of Hydra
    if name == "create_model":
        from dalg.factory import create_model

        return create_model
    raise AttributeError(f"module 'dalg' has no attribute {name!r}")
