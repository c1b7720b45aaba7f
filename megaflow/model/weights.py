"""Switching a model backend to a published policy version (issue 18, point 2).

A backend that can follow a policy has a ``policy_version`` (0: its config's own
weights) and ``load_policy(ref)``, which arranges for every request submitted after
the call to run on `ref`'s weights, and never a request on a mix:

* transformers (`hf.py`): the swap is a barrier on the batcher thread (drain the
  batches queued before it, swap, resume); `load_transformers` builds the new model
  beside the old one, so a batch in flight keeps its weights to the end.
* vLLM in process (`vllm_engine.py`): a LoRA adapter is a per-request
  ``LoRARequest``; full weights go to every worker through ``LLM.collective_rpc``.
* OpenAI-compatible servers (`openai_http.py`): the server's own update API
  (`update_server`), or a user's hook.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import httpx

from megaflow.errors import ModelUnavailableError
from megaflow.model import policy as policies
from megaflow.model.policy import Listener, PolicyRef

log = logging.getLogger(__name__)


def lora_name(ref: PolicyRef) -> str:
    """The name an adapter version is served under (requests name it as their model)."""
    return f"{ref.policy}-v{ref.version}"


# -- transformers ------------------------------------------------------------


def load_transformers(base: Any, ref: PolicyRef, device: str) -> Any:
    """A new model with `ref`'s weights; `base` (the config's own weights) is left as it is.

    full: a ``save_pretrained`` directory, or a state-dict file loaded into a copy of
    `base`; lora: a PEFT adapter on a copy of `base`, merged (generation then costs
    what the base costs).
    """
    from transformers import AutoModelForCausalLM

    if ref.kind == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(copy.deepcopy(base), ref.path).merge_and_unload()
    elif os.path.isdir(ref.path):
        model = AutoModelForCausalLM.from_pretrained(ref.path, local_files_only=True, dtype=base.dtype)
    else:
        model = copy.deepcopy(base)
        model.load_state_dict(_state_dict(ref.path))
    model.to(device)
    model.eval()
    return model


def _state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def safetensors_weights(path: str):
    """(name, tensor) pairs of a checkpoint directory's or file's safetensors, for vLLM's ``load_weights``."""
    from safetensors.torch import load_file

    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    for file in files:
        yield from load_file(file).items()


def reload_vllm_worker(worker: Any, path: str) -> None:
    """Run in each vLLM worker (``LLM.collective_rpc``): load `path`'s weights into its model."""
    worker.model_runner.model.load_weights(safetensors_weights(path))


# -- OpenAI-compatible servers -------------------------------------------------


def update_server(client: httpx.Client, engine: str, ref: PolicyRef) -> str | None:
    """Ask one server to serve `ref`; returns the model name requests must then use (None: unchanged).

    vLLM: a LoRA adapter through ``POST /v1/load_lora_adapter`` (the server runs with
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), served under its own name; full weights
    through the development endpoint ``POST /collective_rpc`` (``VLLM_SERVER_DEV_MODE=1``):
    ``update_config`` pointing the model at the new directory, then ``reload_weights``.
    SGLang: ``POST /update_weights_from_disk`` with ``model_path`` (full), or
    ``POST /load_lora_adapter`` (LoRA; requests then name ``base:adapter``).

    `client`'s base URL is the server's ``.../v1`` URL; the non-``/v1`` routes hang off
    its root.

    Raises:
        ModelUnavailableError: the server refused or failed (the caller retries).
    """
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    if engine == "vllm":
        if ref.kind == "lora":
            _post(client, f"{root}/v1/load_lora_adapter", {"lora_name": lora_name(ref), "lora_path": ref.path},
                  already_ok=True)
            return lora_name(ref)
        _post(client, f"{root}/collective_rpc",
              {"method": "update_config", "args": [{"model_config": {"model": ref.path}}]})
        _post(client, f"{root}/collective_rpc", {"method": "reload_weights"})
        return None
    if engine == "sglang":
        if ref.kind == "lora":
            _post(client, f"{root}/load_lora_adapter", {"lora_name": lora_name(ref), "lora_path": ref.path},
                  already_ok=True)
            return lora_name(ref)
        answer = _post(client, f"{root}/update_weights_from_disk", {"model_path": ref.path})
        if isinstance(answer, dict) and answer.get("success") is False:
            raise ModelUnavailableError(f"SGLang refused the weights {ref.path}: {answer.get('message')}")
        return None
    raise ValueError(f"unknown weight-sync engine {engine!r}")


def _post(client: httpx.Client, url: str, body: dict, already_ok: bool = False) -> Any:
    try:
        response = client.post(url, json=body, timeout=600.0)
    except httpx.HTTPError as exc:
        raise ModelUnavailableError(f"weight update {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 400:
        # Another model worker loaded the same adapter first: it is there, which is what we want.
        if already_ok and response.status_code == 400 and "already" in response.text.lower():
            return None
        raise ModelUnavailableError(f"weight update {url}: HTTP {response.status_code}: {response.text[:300]}")
    try:
        return response.json()
    except ValueError:
        return None


def load_hook(dotted: str) -> Callable[..., Any]:
    """The callable a dotted path (``pkg.module.function`` or ``pkg.module:function``) names.

    Raises:
        ValueError: nothing there; TypeError: not callable.
    """
    module, sep, name = dotted.partition(":")
    if not sep:
        module, _, name = dotted.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"weight-sync hook {dotted!r} not found: {exc}") from exc
    if not callable(fn):
        raise TypeError(f"weight-sync hook {dotted!r} is not callable")
    return fn


# -- a worker's followers ------------------------------------------------------


class Followers:
    """The model clients of one worker process that follow a policy, and what tells them.

    On PostgreSQL a `policy.Listener` thread hears each publication and has every
    client of that policy switch at once (a transformers client queues the swap
    behind the batches already queued). Before each request the model hop also calls
    `follow`, which reads the newest version and switches a client that lags: that is
    the only path on SQLite, and the guarantee on PostgreSQL when a notification is
    late (a reconnect reads what it missed, too).

    Args:
        db_url: The state database.
        session: Opens a read session (``Runtime.session``).
    """

    def __init__(self, db_url: str, session: Callable[..., Any]):
        self.db_url, self._session = db_url, session
        self._clients: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._listener: Listener | None = None

    def add(self, policy: str, client: Any) -> None:
        """Have `client` follow `policy` from now on.

        Raises:
            TypeError: the backend cannot switch weights.
        """
        if not callable(getattr(client, "load_policy", None)):
            raise TypeError(f"model backend {type(client).__name__} cannot switch to published policies")
        with self._lock:
            self._clients.setdefault(policy, []).append(client)
            if self._listener is None and Listener.supported(self.db_url):
                self._listener = Listener(self.db_url, self.on_publish, self.catch_up).start()

    def on_publish(self, ref: PolicyRef) -> None:
        with self._lock:
            clients = list(self._clients.get(ref.policy, ()))
        for client in clients:
            client.load_policy(ref)

    def catch_up(self) -> None:
        """Switch every client to its policy's newest version (after a lost connection)."""
        with self._lock:
            names = list(self._clients)
        for name in names:
            ref = self.newest(name)
            if ref is not None:
                self.on_publish(ref)

    def newest(self, policy: str) -> PolicyRef | None:
        with self._session(readonly=True) as s:
            return policies.newest(s, policy)

    def follow(self, client: Any, policy: str) -> int:
        """Switch `client` to `policy`'s newest version if it lags; returns that version (0: none yet)."""
        ref = self.newest(policy)
        if ref is None:
            return 0
        if client.policy_version < ref.version:
            client.load_policy(ref)
        return ref.version

    def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            self._clients.clear()
        if listener is not None:
            listener.stop()
