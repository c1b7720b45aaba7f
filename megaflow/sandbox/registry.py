"""Sandbox backends by name; heavy imports only for the backend used."""

from __future__ import annotations

from megaflow.sandbox.base import SandboxBackend


def make_backend(type: str, **kwargs) -> SandboxBackend:  # noqa: A002 - matches SandboxConfig.type
    if type == "memory":
        from megaflow.sandbox.memory import MemoryBackend

        return MemoryBackend(**kwargs)
    if type == "local":
        from megaflow.sandbox.local import LocalBackend

        return LocalBackend(**kwargs)
    if type == "docker":
        from megaflow.sandbox.docker import DockerBackend

        return DockerBackend(**kwargs)
    raise ValueError(f"unknown sandbox backend {type!r}; expected local, docker or memory")
