"""Build: the per-packet modules compiled with mypyc, the rest as plain Python (README: Installing).

The same sources run either way; compiled, the engine's and the queue's work per packet costs
about half (docs/benchmarks.md). A compiled build also builds one module of C, the fast queue
backend's receive and first verdict (`nfq_tcpcrypt/shell/_fastio.c`); the pure build reads and
writes the same bytes in Python (shell/fastqueue.py). `NFQ_TCPCRYPT_COMPILE=0` builds pure Python (no compiler needed)
and, in an editable tree, removes the compiled modules a previous build left beside the sources.
The build records a hash of each compiled source and of its own files (`nfq_tcpcrypt/_compiled.json`),
so that an import refuses compiled modules whose source has changed since (nfq_tcpcrypt/__init__.py)
and `scripts/setup` skips a rebuild that would change nothing (`setup.py --current`).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
STAMP = ROOT / "nfq_tcpcrypt" / "_compiled.json"
GROUP = "nfq_tcpcrypt"  # the compiled modules share one library, nfq_tcpcrypt__mypyc.*.so

# Everything a packet goes through: the engine (all of core) and the shell modules on a packet's
# way from the queue's socket to the engine and back, with the clock check of every wakeup
# (README: Queue backends says why the others stay interpreted).
COMPILED = sorted(
    str(path.relative_to(ROOT))
    for pattern in ("nfq_tcpcrypt/core/*.py", "nfq_tcpcrypt/core/wire/*.py",
                    "nfq_tcpcrypt/shell/fastqueue.py", "nfq_tcpcrypt/shell/nfnetlink.py",
                    "nfq_tcpcrypt/shell/nfq.py", "nfq_tcpcrypt/shell/loop.py",
                    "nfq_tcpcrypt/shell/freshness.py")
    for path in ROOT.glob(pattern)
)

NATIVE = ["nfq_tcpcrypt/shell/_fastio.c"]
"""The module of C (README: Queue backends); its stub `_fastio.pyi` types it for mypy and mypyc."""


def digests() -> dict[str, str]:
    """SHA-256 of each compiled source, and of the build's own files (a change there rebuilds too)."""
    return {name: hashlib.sha256((ROOT / name).read_bytes()).hexdigest()
            for name in [*COMPILED, *NATIVE, "setup.py", "pyproject.toml"]}


def current() -> bool:
    """Whether this tree's compiled modules are built from its sources as they are now."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    try:
        built = json.loads(STAMP.read_text())
    except FileNotFoundError:
        return False
    return built == digests() and all((ROOT / source).with_suffix(suffix).exists() for source in [*COMPILED, *NATIVE])


class BuildExt(build_ext):
    """build_ext that also writes the stamp beside the modules it builds: in the tree when it builds
    in place (an editable install), else into the wheel's contents, leaving the tree's alone."""

    def run(self) -> None:
        super().run()
        stamp = STAMP if self.inplace else Path(self.build_lib) / STAMP.relative_to(ROOT)
        stamp.write_text(json.dumps(digests(), indent=1, sort_keys=True) + "\n")


def compiled_modules() -> list[object]:
    """The extension modules; or none for a pure build, which in an editable install also removes
    what a compiled one left in the tree (Python would import those before the sources)."""
    if os.environ.get("NFQ_TCPCRYPT_COMPILE", "1") == "0":
        if "editable_wheel" not in sys.argv:
            return []
        suffixes = importlib.machinery.EXTENSION_SUFFIXES
        for source in [*COMPILED, *NATIVE]:
            for suffix in suffixes:
                (ROOT / source).with_suffix(suffix).unlink(missing_ok=True)
        for leftover in ROOT.glob(f"{GROUP}__mypyc*"):
            leftover.unlink()
        STAMP.unlink(missing_ok=True)
        return []
    from mypyc.build import mypycify

    # The build's environment holds the build requirements only, so mypy sees the dependencies
    # (cryptography, NetfilterQueue, pyroute2) as missing, their values as Any: the checks Any would
    # trip are off here. The test suite runs mypy --strict with them installed (tests/test_lint.py).
    checks = ["--ignore-missing-imports", "--no-warn-unused-ignores", "--no-warn-return-any",
              "--cache-dir=build/mypy-cache"]
    native = [Extension(source[:-2].replace("/", "."), [source], extra_compile_args=["-O2"]) for source in NATIVE]
    return [*mypycify([*checks, *COMPILED], opt_level="3", group_name=GROUP), *native]


if sys.argv[1:] == ["--current"]:  # scripts/setup: skip a rebuild that would change nothing
    sys.exit(0 if current() else 1)
setup(ext_modules=compiled_modules(), cmdclass={"build_ext": BuildExt})
