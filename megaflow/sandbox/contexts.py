"""The Docker build contexts MegaFlow ships, as package data.

Each directory of ``megaflow/sandbox/dockerfiles/`` (a ``Dockerfile`` and its
context) becomes ``megaflow/<name>`` on top of ``megaflow/base``. They live inside
the package, so ``megaflow env build-base`` and ``env build`` work from an
installed wheel as from a source tree (``docker/images`` links here).
"""

from __future__ import annotations

from pathlib import Path

#: Where the shipped build contexts are, installed or not.
DOCKERFILES = Path(__file__).resolve().parent / "dockerfiles"
#: Shipped contexts built only when asked for (``megaflow env build-base --desktop``):
#: the desktop image is ten times the base's size, and most hosts never run one.
ON_DEMAND = frozenset({"desktop"})


def context_dir(name: str) -> Path:
    """The build context of the shipped image ``megaflow/<name>``.

    Raises:
        FileNotFoundError: no such shipped image (or a broken install).
    """
    path = DOCKERFILES / name
    if not (path / "Dockerfile").is_file():
        raise FileNotFoundError(f"no shipped image context {name!r} in {DOCKERFILES}")
    return path


def shipped(on_demand: bool = False) -> list[Path]:
    """Every shipped build context, by name; those in `ON_DEMAND` only when `on_demand`."""
    if not DOCKERFILES.is_dir():
        return []
    return sorted(p for p in DOCKERFILES.iterdir()
                  if (p / "Dockerfile").is_file() and (on_demand or p.name not in ON_DEMAND))
