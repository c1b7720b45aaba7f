"""Weight sync of the OpenAI-compatible and vLLM engine backends (issue 18, point 2), no services.

The HTTP path runs for real: `OpenAIModel` against our own server (`megaflow.model.serve`)
over a loopback socket, its vLLM-shaped update endpoints in front of the scripted model
(the SmolLM2 swap itself is in tests/test_rl_policy_pg.py). SGLang's endpoints are checked
against a stub transport; the in-process vLLM engine against a fake engine (no GPU here).
"""

from __future__ import annotations

import json
import sys
import threading
import types

import httpx
import pytest

from megaflow.errors import ModelUnavailableError
from megaflow.model.base import Message, ModelRequest
from megaflow.model.config import OpenAIModelConfig, ScriptedModelConfig, VLLMModelConfig
from megaflow.model.openai_http import OpenAIModel
from megaflow.model.policy import PolicyRef
from megaflow.model.scripted import ScriptedModel
from megaflow.model.serve import make_server
from megaflow.model.weights import update_server

REQUEST = ModelRequest(messages=[Message(role="user", content="hi")])


class ServedScripted(ScriptedModel):
    """The scripted model as `serve` needs it: token strings, and swaps that say when they are done."""

    def __init__(self):
        super().__init__(ScriptedModelConfig(replies=["weights v{version}"]))
        self.loaded: list[PolicyRef] = []

    def token_strings(self, ids):
        return [str(i) for i in ids]

    def load_policy(self, ref):
        self.loaded.append(ref)
        super().load_policy(ref)


@pytest.fixture
def served():
    model = ServedScripted()
    server = make_server(model, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield model, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def client(url: str, **config) -> OpenAIModel:
    return OpenAIModel(OpenAIModelConfig(model="m", endpoints=[url], max_retries=0, **config))


def test_vllm_shaped_lora_load_over_http_then_requests_name_the_adapter(served, tmp_path):
    model, url = served
    first, second = client(url), client(url)  # two model workers sharing one server
    before = first.generate(REQUEST)
    assert (before.text, before.policy_version) == ("weights v0", 0)
    ref = PolicyRef("p", 1, str(tmp_path), "lora")
    first.load_policy(ref)
    second.load_policy(ref)  # the server says "already loaded": that is success
    assert [r.kind for r in model.loaded] == ["lora"]
    after = second.generate(REQUEST)
    assert (after.text, after.policy_version) == ("weights v1", 1)
    assert second._serving == ("p-v1", 1)  # later requests name the adapter


def test_vllm_shaped_full_reload_over_http(served, tmp_path):
    model, url = served
    c = client(url)
    c.load_policy(PolicyRef("p", 3, str(tmp_path), "full"))
    assert (model.loaded[-1].path, model.loaded[-1].kind) == (str(tmp_path), "full")
    done = c.generate(REQUEST)
    assert (done.text, done.policy_version, c._serving[0]) == ("weights v1", 3, "m")  # the server counts its own


def test_a_refused_update_is_an_infra_error_and_changes_nothing(served):
    _, url = served
    c = client(url, weight_sync="sglang")  # our server has no SGLang routes: 404
    with pytest.raises(ModelUnavailableError, match="HTTP 404"):
        c.load_policy(PolicyRef("p", 1, "/x", "full"))
    assert c.policy_version == 0


def test_sglang_endpoints():
    calls: list[tuple[str, dict]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.path, json.loads(request.content)))
        ok = request.url.path != "/update_weights_from_disk" or "bad" not in request.content.decode()
        return httpx.Response(200, json={"success": ok, "message": "no such file" if not ok else ""})

    http = httpx.Client(base_url="http://sglang:30000/v1", transport=httpx.MockTransport(answer))
    assert update_server(http, "sglang", PolicyRef("p", 2, "/ckpt", "full")) is None
    assert update_server(http, "sglang", PolicyRef("p", 3, "/adapter", "lora")) == "p-v3"
    assert calls == [("/update_weights_from_disk", {"model_path": "/ckpt"}),
                     ("/load_lora_adapter", {"lora_name": "p-v3", "lora_path": "/adapter"})]
    with pytest.raises(ModelUnavailableError, match="no such file"):
        update_server(http, "sglang", PolicyRef("p", 4, "/bad", "full"))


HOOKED: list = []


def hook(ref, endpoints):
    HOOKED.append((ref.version, endpoints))
    return f"custom-{ref.version}"


def test_a_user_hook_does_the_sync(served):
    _, url = served
    c = client(url, weight_sync=f"hook:{__name__}.hook")
    c.load_policy(PolicyRef("p", 5, "/x", "full"))
    assert HOOKED == [(5, [url])] and c._serving == ("custom-5", 5)


# -- vLLM's engine in process, faked -------------------------------------------------------


class FakeLLM:
    """What `VLLMModel` uses of `vllm.LLM`: generate (with a lora_request) and collective_rpc."""

    def __init__(self):
        self.rpc: list = []
        self.lora_seen: list = []

    def collective_rpc(self, fn, args=()):
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=types.SimpleNamespace(
            load_weights=lambda weights: self.rpc.append(("load_weights", args)))))
        fn(worker, *args)

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        self.lora_seen.append(lora_request)
        out = types.SimpleNamespace(text="ok", token_ids=[5], logprobs=None, finish_reason="stop")
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kw: kw
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, int_id, path: ("lora", name, int_id, path)
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)


def test_vllm_engine_switches_between_generate_calls(fake_vllm, monkeypatch, tmp_path):
    from megaflow.model import weights
    from megaflow.model.vllm_engine import VLLMModel

    monkeypatch.setattr(weights, "safetensors_weights", lambda path: iter(()))
    model = VLLMModel(VLLMModelConfig(model="m", enable_lora=True))
    llm = model._llm = FakeLLM()
    model._tokenizer = types.SimpleNamespace(apply_chat_template=lambda *a, **k: "p", encode=lambda *a, **k: [1, 2],
                                             chat_template="x")
    model._max_len = 100
    try:
        assert model.generate(REQUEST).policy_version == 0
        model.load_policy(PolicyRef("p", 1, "/adapter", "lora")).result(5)
        done = model.generate(REQUEST)
        assert (done.policy_version, done.prompt_token_ids) == (1, [1, 2])
        assert llm.lora_seen[-1] == ("lora", "p-v1", 1, "/adapter")
        model.load_policy(PolicyRef("p", 2, "/full", "full")).result(5)
        assert model.generate(REQUEST).policy_version == 2
        assert llm.rpc == [("load_weights", ("/full",))] and llm.lora_seen[-1] is None
        assert model.load_policy(PolicyRef("p", 2, "/full", "full")) is None  # not newer: nothing to do
    finally:
        model._batcher.close()  # not close(): it imports torch to free GPU memory (seconds here)
