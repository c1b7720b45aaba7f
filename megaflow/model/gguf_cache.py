"""GGUF weights converted once into a Hugging Face directory, cached on disk.

transformers reads a GGUF file by dequantizing every tensor to float32 and rebuilding
the tokenizer from the file's metadata: ~14 s for SmolLM2-135M on two cores, paid by
every process that loads it (each model worker, trainer and test). A directory written
by ``save_pretrained`` holds the very same float32 tensors and tokenizer and loads in
under a second, so each GGUF file is converted once per machine and every later load,
in any process, reads the directory.

An entry's name carries a key made of the GGUF file's name, size and mtime, the
transformers version (its GGUF reader decides the tensors) and `FORMAT`. An entry is
written into a temporary directory and renamed into place, and its manifest (every
file and its size) is written last: a half-written or damaged entry fails the check,
is never used, and is rebuilt. A lock file serialises conversions of one entry, so
processes that race convert once and the others wait for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

log = logging.getLogger(__name__)

#: Bump when what an entry holds changes, so old entries are not read.
FORMAT = 1
MANIFEST = "megaflow-cache.json"


def hf_source(model: str, gguf_file: str | None = None, cache_dir: Path | str | None = None) -> str:
    """What to hand ``from_pretrained`` for a model setting: GGUF weights become their cached directory.

    Args:
        model: ``smollm2`` (the shipped weights), a local directory, or a model name.
        gguf_file: A GGUF file inside the directory ``model``, if the weights are one.
        cache_dir: Where converted entries live. Default: the ``model_cache`` setting.

    Returns:
        A directory of Hugging Face files for GGUF weights (converted now if not cached);
        otherwise ``model`` as given.

    Raises:
        FileNotFoundError: the shipped weights or the GGUF file are not there.
    """
    from megaflow.model.smollm import ALIAS, smollm2_path

    if model == ALIAS:
        model, gguf_file = smollm2_path()
    if not gguf_file:
        return model
    path = Path(model) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return str(converted(path, cache_dir))
    except PermissionError as exc:  # a read-only home (a container): still convert only once per boot
        fallback = Path(tempfile.gettempdir()) / f"megaflow-models-{os.getuid()}"
        log.warning("model cache not writable (%s); using %s (set MEGAFLOW_MODEL_CACHE)", exc, fallback)
        return str(converted(path, fallback))


def cache_key(gguf: Path) -> str:
    """The entry key of a GGUF file: its name, size and mtime, the transformers version, `FORMAT`."""
    st = gguf.stat()
    raw = json.dumps([gguf.name, st.st_size, st.st_mtime_ns, version("transformers"), FORMAT])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def converted(gguf: Path, cache_dir: Path | str | None = None) -> Path:
    """The cached Hugging Face directory of a GGUF file, converting it first if needed.

    Raises:
        OSError: the cache directory cannot be written (and the entry is not there).
    """
    gguf = Path(gguf)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / f"{gguf.stem}-{cache_key(gguf)}"
    if is_complete(entry):
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{entry.name}.lock"):
        if is_complete(entry):  # another process converted it while this one waited
            return entry
        if entry.exists():
            log.warning("model cache entry %s is incomplete or damaged: rebuilding it", entry)
            _discard(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        try:
            _convert(gguf, tmp)
            os.rename(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not is_complete(entry):  # not a racing writer's finished entry (no lock on this filesystem)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry


def is_complete(entry: Path) -> bool:
    """Whether an entry holds every file its manifest lists, each at its written size."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
        return bool(files) and manifest.get("format") == FORMAT and all(
            (entry / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def default_cache_dir() -> Path:
    """The ``model_cache`` setting (``MEGAFLOW_MODEL_CACHE``)."""
    from megaflow.config import Settings

    return Path(Settings().model_cache)


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory (once per machine)", gguf)
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    # The GGUF reader marks the model quantized even though it holds plain float32
    # tensors (it dequantized them), and save_pretrained refuses quantized models; a
    # config that kept the mark would send the next load back to the GGUF reader.
    # The identity test (tests/test_gguf_cache.py) checks the directory loads the same.
    if any(type(m).__name__.startswith("Gguf") for m in model.modules()):
        raise RuntimeError(f"{gguf.name}: transformers kept packed GGUF layers; nothing to cache")
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {"format": FORMAT, "source": str(gguf), "key": cache_key(gguf), "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _discard(entry: Path) -> None:
    # Renamed away first, so no process sees it half deleted under the entry's name.
    trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.trash.", dir=entry.parent))
    os.rename(entry, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: the rename still keeps entries whole
            pass
        yield
