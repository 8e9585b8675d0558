"""nfq_tcpcrypt: transparent TCP-ENO (RFC 8547) and tcpcrypt (RFC 8548) over NFQUEUE."""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
from pathlib import Path

__version__ = "0.1.0"


def _check_compiled() -> None:
    """Refuse compiled modules built from other sources than the ones beside them (setup.py).

    Python imports a compiled module in preference to its source, so after an edit (or a checkout)
    without a rebuild the old code would run, silently. Costs about a millisecond per process.
    """
    root = Path(__file__).resolve().parent
    try:
        built = json.loads((root / "_compiled.json").read_text())
    except FileNotFoundError:
        return  # a pure build
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for source, digest in built.items():
        path = root.parent / source
        if not path.with_suffix(suffix).exists():
            continue  # that module was not compiled in this tree
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ImportError(
                f"nfq_tcpcrypt: {source} has changed since it was compiled; rebuild with ./scripts/setup "
                "(or pip install again), or build pure Python with NFQ_TCPCRYPT_COMPILE=0 (README: Installing)"
            )


def build() -> str:
    """"compiled" when the per-packet modules run compiled (setup.py), else "pure"."""
    from .core import engine

    return "compiled" if engine.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) else "pure"


_check_compiled()
