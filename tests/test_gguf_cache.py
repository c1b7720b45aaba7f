"""The converted-model cache (megaflow.model.gguf_cache).

Fast tests put a stand-in in place of the conversion and check the cache's own promises:
one conversion per file, racing processes included; a partial or damaged entry is rebuilt,
never used; a failed conversion leaves nothing. The integration test checks the one that
matters most on the real SmolLM2: the cached directory loads the same tokenizer and model
as the GGUF file (same ids, same greedy tokens, same logprobs).
"""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from megaflow.model import gguf_cache
from megaflow.model.gguf_cache import MANIFEST, converted, hf_source, is_complete

#: How long the stand-in conversion takes (the race test makes it long enough to overlap).
CONVERT_S = {"s": 0.0}


def _fake_convert(gguf, out):
    """Stands in for the transformers conversion: a few files, the manifest last, and a count."""
    with open(gguf.parent / "conversions", "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(CONVERT_S["s"])
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "model.safetensors").write_bytes(b"w" * 1000)
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    (out / MANIFEST).write_text(gguf_cache.json.dumps({"format": gguf_cache.FORMAT, "files": files}))


def _conversions(tmp_path) -> int:
    path = tmp_path / "conversions"
    return len(path.read_text().split()) if path.exists() else 0


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_cache, "_convert", _fake_convert)
    path = tmp_path / "Tiny.Q4.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 100)
    return path


def test_a_gguf_is_converted_once_and_then_read(gguf, tmp_path):
    cache = tmp_path / "cache"
    first = converted(gguf, cache)
    assert first.name.startswith("Tiny.Q4-") and is_complete(first)
    assert converted(gguf, cache) == first
    assert hf_source(str(gguf.parent), gguf.name, cache) == str(first)
    assert _conversions(tmp_path) == 1
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [first.name]  # no temp dirs left


def test_a_changed_file_gets_a_new_entry(gguf, tmp_path):
    cache = tmp_path / "cache"
    first = converted(gguf, cache)
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert converted(gguf, cache) != first and _conversions(tmp_path) == 2


@pytest.mark.parametrize("damage", ["truncated", "missing file", "no manifest", "bad manifest"])
def test_a_partial_or_damaged_entry_is_rebuilt_not_used(gguf, tmp_path, damage, caplog):
    cache = tmp_path / "cache"
    entry = converted(gguf, cache)
    if damage == "truncated":
        (entry / "model.safetensors").write_bytes(b"w" * 10)
    elif damage == "missing file":
        (entry / "config.json").unlink()
    elif damage == "no manifest":
        (entry / MANIFEST).unlink()
    else:
        (entry / MANIFEST).write_text("{not json")
    assert not is_complete(entry)
    assert converted(gguf, cache) == entry
    assert is_complete(entry) and (entry / "model.safetensors").stat().st_size == 1000
    assert _conversions(tmp_path) == 2 and "rebuilding" in caplog.text


def test_a_failed_conversion_leaves_nothing_behind(gguf, tmp_path, monkeypatch):
    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gguf_cache, "_convert", broken)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="out of memory"):
        converted(gguf, cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def _convert_in_child(gguf, cache, results):
    results.put(str(converted(gguf, cache)))


def test_racing_processes_convert_once_and_all_get_the_entry(gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setitem(CONVERT_S, "s", 0.3)
    ctx = multiprocessing.get_context("fork")  # the children keep the stand-in conversion
    results = ctx.Queue()
    children = [ctx.Process(target=_convert_in_child, args=(gguf, cache, results)) for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
    assert [child.exitcode for child in children] == [0] * 4
    entries = {results.get(timeout=5) for _ in children}
    assert len(entries) == 1 and is_complete(cache / os.path.basename(entries.pop()))
    assert _conversions(tmp_path) == 1


def test_an_unwritable_cache_falls_back_to_a_temporary_one(gguf, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(gguf_cache.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the directory unusable another way
        monkeypatch.setattr(gguf_cache.Path, "mkdir", _refuse_under(locked))
    source = hf_source(str(gguf.parent), gguf.name, locked / "cache")
    assert source.startswith(str(tmp_path / "tmp" / "megaflow-models-")) and is_complete(gguf_cache.Path(source))
    assert "not writable" in caplog.text


def _refuse_under(root):
    original = gguf_cache.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(root)):
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)
    return mkdir


def test_hf_source_passes_other_models_through_and_names_a_missing_gguf(tmp_path):
    assert hf_source("/models/llama") == "/models/llama"
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        hf_source(str(tmp_path), "absent.gguf", tmp_path / "cache")


@pytest.mark.integration
def test_the_cached_smollm2_loads_the_same_tokenizer_and_model_as_its_gguf(smollm2_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaflow.export import HFChatTokenizer
    from megaflow.model.smollm import smollm2_path

    directory, gguf_name = smollm2_path()
    cached_dir = hf_source("smollm2")
    assert is_complete(gguf_cache.Path(cached_dir))
    direct_tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_name, local_files_only=True)
    direct = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_name, local_files_only=True).eval()
    cached = AutoModelForCausalLM.from_pretrained(cached_dir, local_files_only=True).eval()

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    text = direct_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    by_name = HFChatTokenizer("smollm2")  # a name, as `megaflow export --tokenizer smollm2` gives it
    for s in (text, "ls -la | grep 'é✓'\n\tdone", "<tool_call>{\"name\": \"x\"}</tool_call>"):
        ids = direct_tok(s, add_special_tokens=False)["input_ids"]
        assert smollm2_tokenizer(s, add_special_tokens=False)["input_ids"] == ids
        assert by_name.text_ids(s) == ids
    assert (smollm2_tokenizer.eos_token_id, smollm2_tokenizer.pad_token) == (direct_tok.eos_token_id,
                                                                             direct_tok.pad_token)

    prompt = torch.tensor([direct_tok(text, add_special_tokens=False)["input_ids"]])

    def greedy(model):
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=8, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        new = out.sequences[0, prompt.shape[1]:]
        logprobs = torch.stack([torch.log_softmax(s[0], -1)[t] for s, t in zip(out.scores, new, strict=True)])
        return new.tolist(), logprobs

    ids_direct, lp_direct = greedy(direct)
    ids_cached, lp_cached = greedy(cached)
    assert ids_cached == ids_direct and len(ids_direct) > 1
    # Bit-identical weights; the last bits of a decode step depend on where the tensors lie in memory.
    assert torch.allclose(lp_cached, lp_direct, rtol=0, atol=1e-5), (lp_cached - lp_direct).abs().max()
