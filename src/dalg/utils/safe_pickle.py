"""Reading pickles from elsewhere (Revisited ``gnd_*.pkl`` files) without running code from them.

A plain ``pickle.load`` calls whatever a file names (``__reduce__``), so a downloaded ground-truth file could run
code. :func:`load_plain_pickle` admits only plain data: the builtin containers, numbers and strings (pickle's own
opcodes) plus the handful of globals that NumPy arrays, dtypes and scalars pickle through (protocols 0-5, NumPy 1
``numpy.core`` and NumPy 2 ``numpy._core`` names). Any other global is refused before it is looked up.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

# (module, name) pairs a plain-data pickle may name; everything else is refused
_NUMPY = {
    ("multiarray", "_reconstruct"),  # ndarray.__reduce__
    ("multiarray", "scalar"),  # numpy scalars (np.float64(1.5))
    ("numeric", "_frombuffer"),  # ndarray under protocol 5
}
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("__builtin__", "bytes"),  # protocols 0-2
}
_NUMPY_CORE_PACKAGES = ("numpy.core", "numpy._core")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that plain data does not need (it could run code); nothing was called."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # bytes under protocols 0-2: latin-1 text -> bytes
            return _latin1_encode
        package, _, sub = module.rpartition(".")
        if (module, name) in _ALLOWED or (package in _NUMPY_CORE_PACKAGES and (sub, name) in _NUMPY):
            if package == "numpy.core":  # NumPy 1.x files: the same functions live in numpy._core in NumPy 2
                module = _numpy_core_module(sub)
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refused global {module}.{name}: only builtin containers, numbers, strings "
            f"and NumPy arrays are allowed"
        )


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # only the codec pickle itself uses: another name would make codecs.lookup import an encodings module
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return str(text).encode("latin1")


def _numpy_core_module(sub: str) -> str:
    import numpy

    return f"numpy._core.{sub}" if int(numpy.__version__.split(".")[0]) >= 2 else f"numpy.core.{sub}"


def loads_plain_pickle(data: bytes) -> Any:
    """Unpickle ``data`` holding plain data only (see the module docstring); raises UnsafePickleError otherwise."""
    return _PlainDataUnpickler(io.BytesIO(data)).load()


def load_plain_pickle(path: str | os.PathLike, what: str = "pickle") -> Any:
    """Read the plain-data pickle ``path``; every failure raises ValueError naming ``what`` and the file.

    A pickle that names any other global (``__reduce__`` payloads) is refused before anything is called.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from e
    if not data:
        raise ValueError(f"{what} {path} is empty (0 bytes)")
    try:
        return loads_plain_pickle(data)
    except UnsafePickleError as e:
        raise ValueError(
            f"{what} {path} was refused: it holds more than plain data, and unpickling it could run "
            f"code ({e}); nothing from it was run"
        ) from e
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        UnicodeDecodeError,
    ) as e:
        raise ValueError(
            f"{what} {path} is not a readable pickle (truncated or another format?): {type(e).__name__}: {e}"
        ) from e
