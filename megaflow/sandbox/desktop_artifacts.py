"""Screenshots as artifacts: a content-addressed file store, referenced from the database by hash.

A screenshot is written once, by the env worker that took it, to
``<root>/sha256/<2 hex>/<64 hex>.png`` and named in every row, message and export
by its reference ``artifact:sha256:<64 hex>``. Why files and not PostgreSQL large
objects: a screenshot is 20-100 KB taken on every action, immutable and often
identical to the one before (an idle screen); a file written by the env host costs
no database round trip or WAL, equal screenshots are stored once, and the rows
stay small. The price: whoever turns a reference back into bytes (the model hop,
building the prompt) must see the same directory — one host, or a shared mount
(`megaflow.config.Settings.data_dir`, ``artifacts/``) on every model and env host.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path

PREFIX = "artifact:sha256:"
_REF = re.compile(r"artifact:sha256:([0-9a-f]{64})")


class ArtifactStore:
    """PNG files by content hash under `root`. Thread- and process-safe (write then rename)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def put(self, data: bytes) -> str:
        """Store `data` (once per content); returns its reference."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return PREFIX + digest

    def get(self, ref: str) -> bytes:
        """The bytes a reference names.

        Raises:
            ValueError: not a reference.
            FileNotFoundError: not in this store (another host's, or removed).
        """
        match = _REF.fullmatch(ref)
        if match is None:
            raise ValueError(f"not an artifact reference: {ref[:80]!r}")
        path = self._path(match.group(1))
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"artifact {ref} is not in the store {self.root}", str(path)) from None

    def data_url(self, ref: str) -> str:
        """The artifact as a ``data:image/png;base64,…`` URL (OpenAI-style image content)."""
        return "data:image/png;base64," + base64.b64encode(self.get(ref)).decode()

    def _path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / f"{digest}.png"


def default_store() -> ArtifactStore:
    """The store under ``Settings.data_dir`` (``$MEGAFLOW_DATA_DIR``)."""
    from megaflow.config import Settings

    return ArtifactStore(Path(Settings().data_dir) / "artifacts")


def refs_in(text: str) -> list[str]:
    """Every artifact reference in `text`, in order."""
    return [PREFIX + m for m in _REF.findall(text or "")]


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, None if `data` is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
