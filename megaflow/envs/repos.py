"""Where a SWE task's repository comes from, and the Docker image that holds it.

A repo source is one string (`SWETask.repo`):

* a local directory (relative paths are resolved against the tasks file when it is
  loaded);
* a git URL (``https://``, ``http://``, ``ssh://``, ``git://``, ``file://``, ``git@``,
  ``git+...`` or anything ending in ``.git``), optionally ``#REF`` for a branch, tag
  or commit;
* ``pypi:NAME==VERSION``: the project's source distribution, fetched with pip.

Remote sources are fetched once per env host into ``<data_dir>/repos`` and reused.
For the docker backend each source becomes one image (`build_repo_image`): the repo
at ``/work`` as a git commit on top of ``megaflow/python``, cached by content hash.
The local backend copies the files into the work directory at provision instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megaflow.errors import SandboxError

log = logging.getLogger(__name__)

#: Image every generated repo image starts FROM (shipped context megaflow/sandbox/dockerfiles/python).
REPO_BASE_IMAGE = "megaflow/python"
#: Turns the work directory into a git repo with one commit, so that the agent's
#: change is `git diff` against it and evaluation can restore test files.
GIT_BASELINE = (
    "git init -q && git add -A && git -c user.name=megaflow -c user.email=megaflow@localhost "
    "-c commit.gpgsign=false commit -q --allow-empty -m 'task base'"
)
_SKIP_DIRS = frozenset({".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".tox"})
_GIT_PREFIXES = ("https://", "http://", "ssh://", "git://", "file://", "git@", "git+")


@dataclass(frozen=True)
class RepoSource:
    """A parsed repo source string."""

    kind: str  # "dir" | "git" | "pypi"
    location: str
    ref: str | None = None

    @classmethod
    def parse(cls, source: str) -> RepoSource:
        """Parse `source`; see the module docstring for the forms.

        Raises:
            ValueError: empty, or a ``pypi:`` source without ``==VERSION``.
        """
        source = source.strip()
        if not source:
            raise ValueError("empty repo source")
        if source.startswith("pypi:"):
            req = source.removeprefix("pypi:")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*", req):
                raise ValueError(f"pypi source must be pypi:NAME==VERSION, got {source!r}")
            return cls("pypi", req)
        if source.startswith(_GIT_PREFIXES) or source.split("#", 1)[0].endswith(".git"):
            url, _, ref = source.partition("#")
            url = url.removeprefix("git+")
            # Both end up as git arguments on the env host: never let one read as an option.
            if url.startswith("-") or (ref and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._/@^~+-]*", ref)):
                raise ValueError(f"git source {source!r}: the URL or ref is not a plain URL / branch, tag or commit")
            return cls("git", url, ref or None)
        if source.startswith("-"):
            raise ValueError(f"repo source {source!r} must not start with '-'")
        return cls("dir", source)

    @property
    def slug(self) -> str:
        """A short readable name for images and cache directories."""
        base = self.location.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
        if self.kind == "pypi":
            base = self.location.replace("==", "-")
        slug = re.sub(r"[^a-z0-9._-]+", "-", base.lower())
        # A Docker repository name separates its parts by one "." or "_", "__", or dashes:
        # any other run ("-_" from a temporary directory's name) is an invalid reference.
        slug = re.sub(r"[._-]{2,}", lambda m: m.group(0) if re.fullmatch(r"-+|__", m.group(0)) else "-", slug)
        return slug[:40].strip("-._") or "repo"

    @property
    def digest(self) -> str:
        text = f"{self.kind}\0{self.location}\0{self.ref or ''}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def image_tag(source: str, env=None) -> str:
    """The image a repo source is built into (same source and environment, same tag)."""
    src = RepoSource.parse(source)
    if env is None:
        return f"megaflow/repo-{src.slug}:{src.digest}"
    from megaflow.envs.environments import digest

    return f"megaflow/repo-{src.slug}:{src.digest}-{digest(env)[:8]}"


def fetch(source: str, cache_root: Path) -> Path:
    """A directory holding the repo's files (fetched on first use for remote sources).

    Raises:
        SandboxError: the directory does not exist or the fetch failed.
    """
    src = RepoSource.parse(source)
    if src.kind == "dir":
        path = Path(src.location).expanduser()
        if not path.is_dir():
            raise SandboxError(f"repo directory {path} does not exist (on host {os.uname().nodename})")
        return path
    target = Path(cache_root) / "repos" / f"{src.slug}-{src.digest}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        fetched = _fetch_git(src, Path(tmp)) if src.kind == "git" else _fetch_pypi(src, Path(tmp))
        try:
            fetched.rename(target)  # atomic: a concurrent fetch of the same source loses harmlessly
        except OSError:
            if not target.is_dir():
                raise
    log.info("fetched %s into %s", source, target)
    return target


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=cwd, timeout=600)
    if proc.returncode != 0:
        raise SandboxError(f"{what} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")


def _fetch_git(src: RepoSource, tmp: Path) -> Path:
    out = tmp / "repo"
    if src.ref is None:
        _run(["git", "clone", "-q", "--depth", "1", "--", src.location, str(out)], f"git clone {src.location}")
    else:
        _run(["git", "clone", "-q", "--", src.location, str(out)], f"git clone {src.location}")
        _run(["git", "-c", "advice.detachedHead=false", "checkout", "-q", src.ref, "--"], f"git checkout {src.ref}",
             out)
    shutil.rmtree(out / ".git", ignore_errors=True)
    return out


def _fetch_pypi(src: RepoSource, tmp: Path) -> Path:
    dl = tmp / "dl"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(dl),
           src.location]
    _run(cmd, f"pip download {src.location}")
    archives = sorted(dl.iterdir())
    if len(archives) != 1:
        raise SandboxError(f"pip download {src.location} gave {len(archives)} files, expected one sdist")
    out = tmp / "unpacked"
    _unpack(archives[0], out)
    entries = list(out.iterdir())
    # An sdist holds one top directory NAME-VERSION/: the repo is what is inside it.
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else out


def _unpack(archive: Path, out: Path) -> None:
    out.mkdir()
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise SandboxError(f"unsafe path {name!r} in {archive.name}")
            zf.extractall(out)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(out, filter="data")  # refuses absolute paths, "..", devices


def iter_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, host path) of every regular file of a repo, caches skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if name.endswith((".pyc", ".pyo")) or path.is_symlink() or not path.is_file():
                continue
            yield path.relative_to(root).as_posix(), path


def build_context(repo_dir: Path, context: Path, base: str = REPO_BASE_IMAGE) -> None:
    """Write a Docker build context: the repo under ``repo/`` and a Dockerfile."""
    for rel, path in iter_files(repo_dir):
        dest = context / "repo" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    (context / "repo").mkdir(parents=True, exist_ok=True)
    (context / "Dockerfile").write_text(
        "# Generated by megaflow.envs.repos: one SWE task repository at /work.\n"
        f"FROM {base}\n"
        "COPY --chown=1000:1000 repo/ /work/\n"
        "WORKDIR /work\n"
        f"RUN {GIT_BASELINE}\n"
    )


def build_repo_image(client, source: str, cache_root: Path, *, force: bool = False, env=None,
                     find_links=None) -> str:
    """Build (or find cached) the image of one repo source; returns its tag.

    Args:
        client: A ``docker.DockerClient``.
        source: The repo source.
        cache_root: Where remote sources are fetched (``Settings.data_dir``).
        force: Rebuild even when the cached image matches.
        env: The task's `Environment`: the repo is built on its image (built first).
        find_links: Wheelhouse for the environment's pip requirements (offline hosts).

    Raises:
        SandboxError: the fetch or the build failed (``megaflow/python`` missing:
            run ``megaflow env build-base`` first).
    """
    from megaflow.sandbox.images import build_image

    tag = image_tag(source, env)
    base = REPO_BASE_IMAGE
    if env is not None:
        from megaflow.envs.environments import build_env_image

        base = build_env_image(client, env, find_links, force=force)
    repo_dir = fetch(source, cache_root)
    with tempfile.TemporaryDirectory(prefix="megaflow-repo-") as tmp:
        build_context(repo_dir, Path(tmp), base)
        build_image(client, tmp, tag, force=force)
    return tag
