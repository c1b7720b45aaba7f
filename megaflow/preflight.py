"""Checks that a run's sandbox and model backends can work here, before anything is queued.

`megaflow run` and `megaflow submit` call `check_spec`; every env worker calls
`check_sandbox_types` at start. Each check takes seconds at most and fails with a
`PreflightError` whose message is one line naming the fix: a run that cannot work
is refused at once instead of sitting at ``provisioning`` while hops retry.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from megaflow.config import Settings
from megaflow.errors import SandboxError
from megaflow.sandbox.base import SandboxConfig

#: How long a Docker engine or a model endpoint may take to answer a check.
ANSWER_TIMEOUT_S = 3.0
#: Label of the throw-away sandbox a local check makes (the reaper may find a leaked one).
PROBE_LABELS = {"megaflow.preflight": "1"}


class PreflightError(RuntimeError):
    """A backend cannot work on this host; the message is one line naming the fix."""


def check_model_proxy(settings: Settings) -> None:
    """The CLI agents' model socket (`megaflow.agent.cli.socket_path`) fits in a Unix socket's address.

    Checked at every env worker's start: otherwise the first CLI agent's launch would fail.
    """
    from megaflow.agent.cli import socket_path

    try:
        socket_path(settings.data_dir)
    except OSError as exc:
        raise PreflightError(str(exc)) from exc


# -- sandboxes -----------------------------------------------------------------------


def check_local(settings: Settings, config: SandboxConfig | None = None) -> None:
    """Make and remove one bubblewrap sandbox: bwrap present and able to make namespaces.

    Creating one is the check: it runs exactly what a provision runs (``true`` in a
    fresh tree), in well under a second.
    """
    from megaflow.sandbox.local import LocalBackend

    config = (config or SandboxConfig()).model_copy(update={"type": "local", "mode": "ephemeral"})
    try:
        backend = LocalBackend(root=settings.data_dir)
        backend.create(config, PROBE_LABELS).close()
    except (SandboxError, OSError, ValueError) as exc:
        text = _one_line(exc)
        if "needs" in text:  # the backend names the missing tools and the apt packages
            raise PreflightError(f"sandbox.type local: {text}; or use sandbox.type: docker") from exc
        raise PreflightError(
            f"sandbox.type local: bubblewrap cannot start a sandbox here ({text}); allow unprivileged user "
            "namespaces (sysctl kernel.unprivileged_userns_clone=1 / kernel.apparmor_restrict_unprivileged_userns=0)"
            " or use sandbox.type: docker") from exc


def check_docker(images: Iterable[str] = ()) -> None:
    """The Docker engine answers within seconds and holds every image in `images`."""
    import docker
    import requests

    url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    fix = "start one (`bash docker/start-dockerd.sh` prints a DOCKER_HOST to export) or use sandbox.type: local"
    if url.startswith("unix://") and not Path(url.removeprefix("unix://")).exists():
        raise PreflightError(f"sandbox.type docker: no Docker engine at {url}: {fix}")
    client = None
    try:
        client = docker.DockerClient(base_url=url, timeout=ANSWER_TIMEOUT_S)
        client.ping()
        missing = []
        for image in sorted(set(images)):
            try:
                client.api.inspect_image(image)
            except docker.errors.ImageNotFound:
                missing.append(image)
    except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
        raise PreflightError(f"sandbox.type docker: the Docker engine at {url} does not answer "
                             f"({type(exc).__name__}): {fix}") from exc
    finally:
        if client is not None:
            client.close()
    if missing:
        names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise PreflightError(f"sandbox.type docker: image {names} not on the engine at {url}: "
                             f"{_how_to_build(missing)}")


def _how_to_build(images: list[str]) -> str:
    """How to get the missing images: they are built on this host, never pulled (`megaflow.sandbox.images`)."""
    from megaflow.sandbox.contexts import shipped as contexts

    shipped = {"megaflow/base", *(f"megaflow/{p.name}" for p in contexts())}
    ways = []
    if any(i.partition(":")[0] in shipped and i.partition(":")[2] in ("", "latest") for i in images):
        ways.append("`megaflow env build-base`")
    if any(i.partition(":")[0] == "megaflow/desktop" for i in images):
        ways.append("`megaflow env build-base --desktop`")
    if any(i.startswith("megaflow/repo-") for i in images):
        ways.append("`megaflow env build SPEC` (an image per task repo)")
    if not ways:
        return "build or load it into that engine (images are never pulled)"
    return "build it with " + " and ".join(ways)


def check_sandbox(settings: Settings, config: SandboxConfig, images: Iterable[str] = ()) -> None:
    """Check the backend `config.type` on this host (the memory fake always works)."""
    if config.type == "local":
        check_local(settings, config)
    elif config.type == "docker":
        check_docker(images)
    elif config.type == "desktop":
        from megaflow.sandbox.desktop import docker_config

        check_docker({docker_config(config.model_copy(update={"image": i})).image for i in images or [config.image]})


def check_sandbox_types(settings: Settings, types: Iterable[str]) -> None:
    """Check each named backend with its default config (an env worker's start check)."""
    for kind in types:
        if kind not in ("local", "docker", "memory", "desktop"):
            raise PreflightError(f"MEGAFLOW_SANDBOX_BACKENDS names {kind!r}; known: local, docker, memory, desktop")
        # No images: which ones an env host needs depends on the runs it will get.
        check_sandbox(settings, SandboxConfig(type=kind), images=())


# -- models --------------------------------------------------------------------------


def check_model(config) -> None:
    """The model backend can load: packages and weights present, or the endpoint answers."""
    if config.type == "scripted":
        return
    if config.type == "transformers":
        _need_packages("transformers", ("torch", "transformers"), "pip install 'megaflow[model]'")
        from megaflow.model.smollm import ALIAS, smollm2_path

        if config.model == ALIAS:
            try:
                smollm2_path()
            except FileNotFoundError as exc:
                raise PreflightError(f"model.type transformers: {exc}") from exc
        elif not Path(config.model).exists():
            raise PreflightError(f"model.type transformers: no weights at {config.model!r}: give a local "
                                 f"directory (or 'smollm2' for the shipped SmolLM2-135M)")
        elif config.gguf_file and not (Path(config.model) / config.gguf_file).is_file():
            raise PreflightError(f"model.type transformers: no file {config.gguf_file!r} in {config.model}")
    elif config.type == "openai":
        _check_endpoints(config)
    elif config.type == "vllm":
        _need_packages("vllm", ("vllm",), "pip install vllm (GPU hosts only)")


def check_model_types(types: Iterable[str]) -> None:
    """What a model worker can check at start without a run's config: each backend's packages."""
    for kind in types:
        if kind == "transformers":
            _need_packages("transformers", ("torch", "transformers"), "pip install 'megaflow[model]'")
        elif kind == "vllm":
            _need_packages("vllm", ("vllm",), "pip install vllm (GPU hosts only)")
        elif kind not in ("scripted", "openai"):
            raise PreflightError(f"MEGAFLOW_MODEL_BACKENDS names {kind!r}; known: scripted, transformers, openai, vllm")


def _need_packages(kind: str, packages: tuple[str, ...], fix: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise PreflightError(f"model.type {kind}: package {', '.join(missing)} not installed: {fix}")


def _check_endpoints(config) -> None:
    """Every endpoint answers an HTTP request (any status: a server is there) within seconds."""
    import httpx

    if config.api_key_env and not os.environ.get(config.api_key_env):
        raise PreflightError(f"model.type openai: api_key_env names {config.api_key_env}, which is not set: "
                             f"export {config.api_key_env}=...")
    for url in config.endpoints:
        try:
            httpx.get(url.rstrip("/") + "/models", timeout=ANSWER_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise PreflightError(f"model.type openai: endpoint {url} does not answer within "
                                 f"{ANSWER_TIMEOUT_S:g}s ({type(exc).__name__}): start the server or fix "
                                 "model.endpoints") from exc


# -- a whole run ---------------------------------------------------------------------


def check_spec(spec, settings: Settings, *, sandbox: bool = True, model: bool = True) -> None:
    """Check a run's backends: its sandbox type (with every image its tasks need) and its model.

    Args:
        spec: the `RunSpec`.
        settings: where local sandboxes live (``data_dir``).
        sandbox: check the sandbox backend on this host (off when env hosts are elsewhere).
        model: check the model backend; when False, only what does not depend on the host
            (an OpenAI-compatible endpoint answering) is checked.

    Raises:
        PreflightError: a backend cannot work; nothing should be queued.
    """
    if sandbox:
        from megaflow.envs.swe import sandbox_config

        images = {sandbox_config(spec.sandbox, task).image for task in spec.tasks}
        check_sandbox(settings, spec.sandbox, images)
    if model or spec.model.type == "openai":
        check_model(spec.model)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
