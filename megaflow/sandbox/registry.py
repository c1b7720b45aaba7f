"""Build a sandbox backend from its type name.

Backends are imported only when asked for, so that importing MegaFlow needs neither
the docker SDK nor bubblewrap.
"""

from __future__ import annotations

from typing import Any

from megaflow.sandbox.base import SandboxBackend

#: Every backend type `make_backend` knows.
BACKEND_TYPES = ("local", "docker", "memory", "desktop")


def make_backend(type: str, **kwargs: Any) -> SandboxBackend:  # `type` as in SandboxConfig.type
    """Create the backend named `type`.

    Args:
        type: "local" (bubblewrap), "docker", "memory" (the in-memory fake) or "desktop" (Docker + X).
        **kwargs: Passed to the backend's constructor (e.g. ``root`` for local).

    Raises:
        ValueError: unknown type.
    """
    if type == "local":
        from megaflow.sandbox.local import LocalBackend

        return LocalBackend(**kwargs)
    if type == "memory":
        from megaflow.sandbox.memory import MemoryBackend

        return MemoryBackend(**kwargs)
    if type == "docker":
        from megaflow.sandbox.docker import DockerBackend

        return DockerBackend(**kwargs)
    if type == "desktop":
        from megaflow.sandbox.desktop import DesktopBackend

        return DesktopBackend(**kwargs)
    raise ValueError(f"unknown sandbox backend {type!r}; known: {', '.join(BACKEND_TYPES)}")
