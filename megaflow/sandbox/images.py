"""Build the sandbox images locally: no image is ever pulled from a registry.

`build_base` makes ``megaflow/base`` from scratch with ``debootstrap`` against the
Debian mirror this host's apt already uses, then ``docker import``. `build_image`
builds a Dockerfile directory (the shipped ones: `megaflow.sandbox.contexts`) on top of it. Both are cached:
an image whose ``megaflow.content-hash`` label matches what would be built is kept,
so the second call costs one API round trip.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import docker.errors

from megaflow.errors import SandboxError

logger = logging.getLogger(__name__)

#: Label holding the hash of what an image was built from; equal hash = cache hit.
HASH_LABEL = "megaflow.content-hash"
#: Packages on top of debootstrap's minbase (which already has bash and coreutils).
DEFAULT_PACKAGES: tuple[str, ...] = ("git", "python3", "patch", "procps", "ca-certificates")
#: The unprivileged user every sandbox command runs as.
AGENT_UID = 1000
AGENT_USER = "agent"
_APT_SOURCES = Path("/etc/apt")


def build_base(
    client: docker.DockerClient,
    tag: str = "megaflow/base",
    rootfs_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    suite: str = "bookworm",
    packages: Sequence[str] = DEFAULT_PACKAGES,
    mirror: str | None = None,
) -> str:
    """Build the base image with debootstrap and import it, unless it is cached.

    The root filesystem is Debian `suite` (minbase variant) plus `packages`, with an
    unprivileged user ``agent`` (uid 1000, home ``/home/agent``), ``/work`` owned
    by it and ``python`` linked to ``python3``, so the image works as a sandbox without any further layer.

    Args:
        client: Docker client of the engine that will run the sandboxes.
        tag: Name to give the image.
        rootfs_dir: Where to build the root filesystem. Kept afterwards, and reused
            if it already holds a finished build; a temporary directory if None.
        force: Rebuild even if an image with the same content hash exists.
        suite: Debian release to bootstrap.
        packages: Extra packages to include.
        mirror: Debian mirror url; default ``Settings.debian_mirror`` or the one in
            this host's apt sources.

    Returns:
        The image id.

    Raises:
        SandboxError: debootstrap or the import failed.
    """
    # v2: /usr/bin/python links to python3 (task commands say `python`, #15 point 3).
    digest = _digest([suite, *sorted(packages), f"uid={AGENT_UID}", "v2"])
    if not force and (image_id := _cached(client, tag, digest)):
        logger.info("image %s is cached (%s)", tag, image_id[:19])
        return image_id
    started = time.monotonic()
    workdir = Path(rootfs_dir) if rootfs_dir is not None else Path(tempfile.mkdtemp(prefix="megaflow-rootfs-"))
    try:
        marker = workdir / ".megaflow-rootfs"
        if not (marker.exists() and marker.read_text() == digest):
            _prepare_rootfs_dir(workdir, marker)
            _debootstrap(workdir, suite, packages, mirror or debian_mirror())
            _add_agent(workdir)
            _link_python(workdir)
            marker.write_text(digest)
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            "WORKDIR /work",
            'CMD ["bash"]',
            f"LABEL {HASH_LABEL}={digest}",
        ]
        image_id = _import(client, workdir, tag, changes)
    finally:
        if rootfs_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    logger.info("built %s (%s) in %.1fs", tag, image_id[:19], time.monotonic() - started)
    return image_id


def build_image(
    client: docker.DockerClient,
    dockerfile_dir: str | os.PathLike[str],
    tag: str,
    *,
    force: bool = False,
    network_mode: str = "host",
) -> str:
    """Build the Dockerfile in `dockerfile_dir` as `tag`, unless it is cached.

    The cache key hashes every file of the directory and the ids of the local
    images its ``FROM`` lines name, so rebuilding ``megaflow/base`` invalidates the
    images built on it.

    Args:
        client: Docker client.
        dockerfile_dir: Directory holding ``Dockerfile`` and its build context.
        tag: Name to give the image.
        force: Rebuild even on a cache hit.
        network_mode: Network for ``RUN`` steps. ``host`` because the private
            daemon has no bridge and steps may need the Debian mirror; the sandboxes
            themselves never get this network.

    Returns:
        The image id.

    Raises:
        SandboxError: the build failed (the message ends with the build log's tail).
    """
    context = Path(dockerfile_dir)
    dockerfile = (context / "Dockerfile").read_text()
    parents = re.findall(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)", dockerfile, flags=re.MULTILINE | re.IGNORECASE)
    digest = _digest([_tree_digest(context), *(f"{p}@{_image_id(client, p)}" for p in parents)])
    if not force and (image_id := _cached(client, tag, digest)):
        logger.info("image %s is cached (%s)", tag, image_id[:19])
        return image_id
    started = time.monotonic()
    try:
        image, _ = client.images.build(
            path=str(context),
            tag=tag,
            labels={HASH_LABEL: digest},
            network_mode=network_mode,
            pull=False,
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as exc:
        lines = [str(item.get("stream") or item.get("error") or "").rstrip() for item in exc.build_log]
        tail = "\n".join(line for line in lines if line)[-3000:]
        raise SandboxError(f"building {tag} from {context} failed: {exc.msg}\n{tail}") from exc
    except docker.errors.APIError as exc:
        raise SandboxError(f"building {tag} from {context} failed: {exc}") from exc
    logger.info("built %s (%s) in %.1fs", tag, image.id[:19], time.monotonic() - started)
    return image.id


def debian_mirror(apt_dir: Path = _APT_SOURCES) -> str:
    """Return the Debian mirror this host's apt uses (``Settings.debian_mirror`` wins).

    Reads one-line ``sources.list`` files and deb822 ``*.sources`` files and returns
    the first ``deb`` url serving a release suite (not ``-security``/``-updates``).

    Raises:
        SandboxError: no usable entry was found.
    """
    from megaflow.config import Settings

    if configured := Settings().debian_mirror:
        return configured
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for url, suites in _source_entries(path.name, text):
            if any("-" not in suite for suite in suites):
                return url
    raise SandboxError(f"no Debian mirror found in {apt_dir}; set MEGAFLOW_DEBIAN_MIRROR")


def _source_entries(name: str, text: str) -> Iterator[tuple[str, list[str]]]:
    if name.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, flags=re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                for url in fields.get("URIs", "").split():
                    yield url, fields.get("Suites", "").split()
    elif name == "sources.list" or name.endswith(".list"):
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                yield words[1], [words[2]]


def _prepare_rootfs_dir(rootfs: Path, marker: Path) -> None:
    """Empty a stale build of ours; refuse to touch a directory we did not make."""
    if rootfs.exists() and any(rootfs.iterdir()):
        if not marker.exists():
            raise SandboxError(f"{rootfs} is not empty and holds no megaflow rootfs; pass an empty directory")
        inside = str(rootfs.resolve()) + "/"
        if any(line.split()[1].startswith(inside) for line in Path("/proc/mounts").read_text().splitlines()):
            raise SandboxError(f"{rootfs} has file systems mounted inside (a crashed debootstrap?); unmount them")
        shutil.rmtree(rootfs)
    rootfs.mkdir(parents=True, exist_ok=True)
    # Written first so that a half-finished build is recognised as ours next time.
    marker.write_text("building")


def _debootstrap(rootfs: Path, suite: str, packages: Sequence[str], mirror: str) -> None:
    if shutil.which("debootstrap") is None:
        raise SandboxError("debootstrap is not installed (apt-get install debootstrap)")
    cmd = ["debootstrap", "--variant=minbase"]
    if packages:
        cmd.append("--include=" + ",".join(packages))
    cmd += [suite, str(rootfs), mirror]
    logger.info("debootstrap %s from %s into %s", suite, mirror, rootfs)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SandboxError(f"debootstrap failed ({proc.returncode}):\n{tail}")
    # Package caches and indexes are 100+ MB nobody in a sandbox needs; `apt-get
    # update` in a Dockerfile brings the indexes back.
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
        for path in rootfs.glob(pattern):
            path.unlink()


def _add_agent(rootfs: Path) -> None:
    cmd = ["chroot", str(rootfs), "useradd", "--uid", str(AGENT_UID), "--user-group"]
    cmd += ["--create-home", "--shell", "/bin/bash", AGENT_USER]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SandboxError(f"adding user {AGENT_USER} failed: {proc.stderr.strip()}")
    work = rootfs / "work"
    work.mkdir(exist_ok=True)
    os.chown(work, AGENT_UID, AGENT_UID)


def _link_python(rootfs: Path) -> None:
    """Make ``python`` resolve to ``python3``, as Debian's python-is-python3 does."""
    link = rootfs / "usr" / "bin" / "python"
    if (rootfs / "usr" / "bin" / "python3").exists() and not os.path.lexists(link):
        link.symlink_to("python3")


def _import(client: docker.DockerClient, rootfs: Path, tag: str, changes: list[str]) -> str:
    repository, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None

    def chunks() -> Iterator[bytes]:
        while block := tar.stdout.read(1 << 20):
            yield block

    try:
        # A generator makes requests stream the tar (chunked) instead of buffering GBs.
        client.api.import_image_from_data(chunks(), repository=repository, tag=version, changes=changes)
    except docker.errors.APIError as exc:
        raise SandboxError(f"docker import of {rootfs} failed: {exc}") from exc
    finally:
        tar.stdout.close()
        tar.wait()
    if tar.returncode != 0:
        raise SandboxError(f"tar of {rootfs} failed ({tar.returncode})")
    return client.images.get(tag).id


def _cached(client: docker.DockerClient, tag: str, digest: str) -> str | None:
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    return image.id if image.labels.get(HASH_LABEL) == digest else None


def _image_id(client: docker.DockerClient, name: str) -> str:
    try:
        return client.images.get(name).id
    except docker.errors.ImageNotFound:
        return "absent"


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(oct(path.stat().st_mode & 0o777).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
