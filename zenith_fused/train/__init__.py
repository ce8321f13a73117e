"""The training command, ``python -m zenith_fused.train`` or ``zenith-train``: ZENITH against
the optimizers a user would otherwise pick, on real data that needs no download.

* a comparison (the default): every method on one task, for several seeds;
* ``--lr-sweep LR ...`` / ``--window-sweep W ...``: the final test metric against η0 or W;
* ``--dataset digits|mnist|cifar10``: a small CNN (:mod:`.images`, :mod:`.data`);
* ``--dataset stdlib-text``: a small byte-level transformer on the standard library's source
  (:mod:`.text`).

:mod:`.methods` builds the optimizers, :mod:`.loop` trains, :mod:`.report` writes the table, the
picture and the JSON, and :mod:`.cli` is the command line.

It lives apart from the optimizer: ``import zenith_fused`` imports nothing of it, and it uses
``ZenithFused`` through the public API only. Importing this package needs only torch; the command
needs the ``[train]`` extra, which :func:`main` checks before anything else.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

__all__ = ["main", "missing_extras", "install_hint"]

# What every mode of the command imports; scikit-learn only the image data sets (checked there).
EXTRA_MODULES = ("numpy", "matplotlib", "tqdm")
# The pip package of each module the [train] extra brings (the package is not on PyPI, so the
# hint names the packages themselves, and the extra for a clone).
EXTRA_PACKAGES = {"numpy": "numpy", "matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn"}


def install_hint(modules: Sequence[str]) -> str:
    """A command that installs ``modules``, anywhere."""
    packages = " ".join(EXTRA_PACKAGES.get(module, module) for module in modules)
    return f"pip install {packages} (from a clone of the repository: pip install -e '.[train]')"


def missing_extras(modules: Sequence[str] = EXTRA_MODULES) -> list[str]:
    """The modules among ``modules`` that cannot be imported here."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 when the ``[train]`` extra is missing)."""
    missing = missing_extras()
    if missing:
        print(f"zenith-train needs {', '.join(missing)}, which the [train] extra installs: {install_hint(missing)}",
              file=sys.stderr)
        return 2
    from .cli import run

    run(argv)
    return 0
