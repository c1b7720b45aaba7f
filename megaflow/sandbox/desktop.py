"""Desktop sandboxes: a Docker sandbox running an X session, driven by computer-use actions (issue #20).

A desktop sandbox is a Docker sandbox (`megaflow.sandbox.docker`: the same
hardening — no network, capabilities dropped, read-only root, limits) of the
``megaflow/desktop`` image, with Xvfb, openbox and a session bus started by the
image's ``megaflow-desktop start`` when it is created and again after every
`reset` (which kills every process and empties the home and ``/tmp``: a clean
desktop in well under a second, so warm pools work as for any sandbox).

An action is a plain command, ``megaflow-desktop click 10 20``
(`megaflow.sandbox.desktop_actions`), so everything that runs commands (the exec
hop and its journal, validation, the oracle) runs actions. `DesktopSandbox.exec`
recognises one, alone or inside the exec journal's wrapper, and runs it with its
output uncapped and split: the helper writes the PNG screenshot to stdout and the
text view (window list, accessibility tree) to stderr; the PNG goes to the
artifact store (`megaflow.sandbox.desktop_artifacts`) and the command's result is
the text view with the screenshot's reference — never the bytes.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
import uuid
from dataclasses import dataclass, field

from megaflow.errors import SandboxError
from megaflow.sandbox.base import ExecResult, SandboxConfig
from megaflow.sandbox.desktop_actions import ACTIONS, HELPER, parse_command
from megaflow.sandbox.desktop_artifacts import ArtifactStore, default_store, png_size
from megaflow.sandbox.docker import DockerBackend, DockerSandbox, _translated
from megaflow.sandbox.images import AGENT_UID

log = logging.getLogger(__name__)

#: The image a desktop sandbox runs unless its config names another (built FROM it).
DESKTOP_IMAGE = "megaflow/desktop"
#: Label on every desktop sandbox, beside the docker backend's own.
DESKTOP_LABEL = "megaflow.desktop"
#: The image's observation script (screenshot to stdout, text view to stderr), which the helper also runs.
OBSERVE = "megaflow-observe"
_BASE_IMAGE = "megaflow/base"  # SandboxConfig's default image: means "the desktop image" here
_USER = f"{AGENT_UID}:{AGENT_UID}"
_WRAPPED = "( " + HELPER + " "
_WINDOW = re.compile(r"^(0x[0-9a-f]+)\s+(-?\d+)\s+(-?\d+)\s+(-?\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s?(.*)$")
_ACTIVE = re.compile(r"^(?:active (0x[0-9a-f]+)|([0-9]+))$")  # the helper prints `xdotool getactivewindow`
_A11Y_MARK = "--- accessibility tree ---"
#: Seconds the session may take to start (Xvfb and openbox: about a second, far more on a loaded host).
START_TIMEOUT_S = 150.0


@dataclass
class Window:
    id: str
    title: str
    x: int
    y: int
    width: int
    height: int
    active: bool = False


@dataclass
class TextView:
    """What a text-only model sees of the screen; parsed from the helper's stderr."""

    windows: list[Window] = field(default_factory=list)
    accessibility: str | None = None
    messages: list[str] = field(default_factory=list)  # the action's own errors, other lines

    def render(self) -> str:
        lines = [f"windows ({len(self.windows)}):"] if self.windows else ["windows: none"]
        for w in self.windows:
            mark = " [active]" if w.active else ""
            lines.append(f"  {w.title!r} at x={w.x} y={w.y} size {w.width}x{w.height}{mark}")
        if self.accessibility is not None:
            lines += ["accessibility tree:", self.accessibility.rstrip() or "  (empty)"]
        return "\n".join(lines)


def parse_text_view(stderr: str) -> TextView:
    """Split the helper's stderr: `wmctrl -lG` lines, the active window's id, the tree, anything else."""
    view = TextView()
    text, _, tree = stderr.partition(_A11Y_MARK + "\n")
    if _A11Y_MARK in stderr:
        view.accessibility = tree
    active = None
    for line in text.splitlines():
        if m := _WINDOW.match(line):
            wid, _desk, x, y, w, h, _host, title = m.groups()
            view.windows.append(Window(wid, title, int(x), int(y), int(w), int(h)))
        elif m := _ACTIVE.match(line.strip()):
            active = int(m.group(1), 16) if m.group(1) else int(m.group(2))
        elif line.strip():
            view.messages.append(line.strip())
    for w in view.windows:
        w.active = active is not None and int(w.id, 16) == active
    return view


@dataclass
class Observation:
    """One action's outcome: the screenshot's reference and the text view."""

    action: list[str]
    exit_code: int
    screenshot: str | None
    size: tuple[int, int] | None
    view: TextView
    timed_out: bool = False
    duration_s: float = 0.0

    def render(self) -> str:
        """The observation as the agent (and the trajectory) sees it: text and a reference."""
        status = "timed out" if self.timed_out else ("ok" if self.exit_code == 0 else f"failed ({self.exit_code})")
        lines = [f"action: {' '.join(self.action)[:200]} ({status})"]
        lines += [f"error: {m}" for m in self.view.messages[:10]]
        if self.screenshot:
            size = f" {self.size[0]}x{self.size[1]}" if self.size else ""
            lines.append(f"screenshot: {self.screenshot}{size}")
        else:
            lines.append("screenshot: none (the capture failed)")
        lines.append(self.view.render())
        return "\n".join(lines)


def action_in(cmd: str) -> list[str] | None:
    """The helper argv of the action `cmd` performs (plain, or inside the journal's wrapper), or None."""
    argv = parse_command(cmd)
    if argv is None:
        # The exec journal runs a command as `<prologue>( CMD\n); <epilogue>`.
        start, end = cmd.find(_WRAPPED), cmd.rfind("\n)")
        if start >= 0 and end > start:
            argv = parse_command(cmd[start + 2:end])
    return argv if argv is not None and argv[0] in ACTIONS else None


class DesktopBackend:
    """Creates desktop sandboxes: Docker containers of the desktop image with the session started.

    Args:
        client: Docker client (default: ``docker.from_env()``).
        artifacts: Where screenshots go (default: ``<data_dir>/artifacts``).
        artifacts_root: The same as a directory (what the runtime passes).
    """

    name = "desktop"

    def __init__(self, client=None, *, artifacts: ArtifactStore | None = None, artifacts_root=None,
                 seed_dir=None):
        self.docker = DockerBackend(client, seed_dir=seed_dir)
        if artifacts is None:
            artifacts = ArtifactStore(artifacts_root) if artifacts_root is not None else default_store()
        self.artifacts = artifacts

    def create(self, config: SandboxConfig, labels: dict[str, str]) -> DesktopSandbox:
        """Create the container and start its session.

        Raises:
            SandboxError: no desktop image (``megaflow env build-base --desktop``), the
                engine failed, or the session did not start.
        """
        inner = self.docker.create(docker_config(config), {**labels, DESKTOP_LABEL: "1"})
        sb = DesktopSandbox(inner, self.artifacts)
        try:
            sb.start_session()
        except BaseException:
            sb.close()
            raise
        return sb

    def attach(self, sandbox_id: str, config: SandboxConfig) -> DesktopSandbox:
        return DesktopSandbox(self.docker.attach(sandbox_id, docker_config(config)), self.artifacts)

    def list_ids(self, labels: dict[str, str]) -> list[str]:
        return self.docker.list_ids({**labels, DESKTOP_LABEL: "1"})

    def destroy(self, sandbox_id: str) -> None:
        self.docker.destroy(sandbox_id)


def docker_config(config: SandboxConfig) -> SandboxConfig:
    """The docker backend's config for a desktop sandbox: the desktop image unless another is named."""
    image = DESKTOP_IMAGE if config.image == _BASE_IMAGE else config.image
    return config.model_copy(update={"type": "docker", "image": image})


class DesktopSandbox:
    """A running desktop; see `megaflow.sandbox.base.Sandbox` for the contract."""

    def __init__(self, inner: DockerSandbox, artifacts: ArtifactStore):
        self.inner = inner
        self.id = inner.id
        self.artifacts = artifacts

    def exec(self, cmd: str, timeout: float = 60.0) -> ExecResult:
        """Run `cmd`; an action command (`action_in`) returns its observation (see the module docstring)."""
        argv = action_in(cmd)
        if argv is None:
            return self.inner.exec(cmd, timeout)
        obs, replay = self._run_action(cmd, argv, timeout)
        if replay is not None:  # the exec journal's answer on a redelivery: hand it back as is
            return replay
        return ExecResult(exit_code=obs.exit_code, stdout=_cap(obs.render(), self.inner._config.max_output_bytes),
                          timed_out=obs.timed_out, duration_s=obs.duration_s)

    def act(self, name: str, *args: str, timeout: float = 60.0) -> Observation:
        """Perform one action (helper argv) and observe; for benches and direct use."""
        argv = [name, *args]
        obs, _ = self._run_action(shlex.join([HELPER, *argv]), argv, timeout)
        return obs

    def _run_action(self, cmd: str, argv: list[str], timeout: float) -> tuple[Observation, ExecResult | None]:
        started = time.monotonic()
        # `timeout` inside the container: the engine's exec has no deadline of its own. A plain
        # action runs the helper directly (no shell: one process less on every observation).
        run = [HELPER, *argv] if parse_command(cmd) == argv else ["bash", "-c", cmd]
        if run == [HELPER, "screenshot"]:
            run = [OBSERVE]  # nothing to do but look: the helper's POSIX-sh observation alone
        code, out, err = self._raw(["timeout", "-s", "KILL", f"{max(1, int(timeout))}", *run])
        elapsed = time.monotonic() - started
        timed_out = code == 137
        if out[:8] != b"\x89PNG\r\n\x1a\n" and out.strip():
            text = out.decode("utf-8", "replace")
            return Observation(argv, code, None, None, TextView()), ExecResult(
                exit_code=code, stdout=text, stderr=err.decode("utf-8", "replace"), duration_s=elapsed)
        ref = self.artifacts.put(out) if out else None
        view = parse_text_view(err.decode("utf-8", "replace"))
        return Observation(argv, 124 if timed_out else code, ref, png_size(out) if out else None, view,
                           timed_out=timed_out, duration_s=time.monotonic() - started), None

    def start_session(self) -> None:
        """Start Xvfb, the session bus and the window manager (idempotent).

        Raises:
            SandboxError: the session did not start.
        """
        code, out, err = self._raw(["timeout", "-s", "KILL", str(int(START_TIMEOUT_S)), HELPER, "start"])
        if code != 0:
            raise SandboxError(f"desktop session of {self.id[:12]} did not start ({code}): "
                               f"{(err or out).decode(errors='replace')[-500:]}")

    def raw_screenshot(self) -> bytes:
        """A screenshot taken directly (scrot, one exec, nothing stored): the bench's floor."""
        code, out, err = self._raw(["sh", "-c", "scrot -o /tmp/megaflow-raw.png && cat /tmp/megaflow-raw.png"])
        if code != 0:
            raise SandboxError(f"scrot failed ({code}): {err.decode(errors='replace')[-300:]}")
        return out

    def _raw(self, argv: list[str]) -> tuple[int, bytes, bytes]:
        """One exec with its output whole (a screenshot is binary and larger than the text cap)."""
        self.inner._check_open()
        api = self.inner._api
        with _translated(self.id):
            exec_id = api.exec_create(self.id, argv, user=_USER, workdir=self.inner._config.workdir,
                                      environment={"MEGAFLOW_EXEC_ID": uuid.uuid4().hex})["Id"]
            out, err = api.exec_start(exec_id, demux=True)
            code = self.inner._exit_code(exec_id)
        return code, out or b"", err or b""

    def write_file(self, path: str, data: bytes) -> None:
        self.inner.write_file(path, data)

    def read_file(self, path: str) -> bytes:
        return self.inner.read_file(path)

    def reset(self) -> None:
        """Kill every application and the session, empty home and ``/tmp``, start a fresh session."""
        self.inner.reset()
        self.start_session()

    def alive(self) -> bool:
        return self.inner.alive()

    def close(self) -> None:
        self.inner.close()


def _cap(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 64].decode("utf-8", "ignore") + "\n[... text view truncated by megaflow ...]\n"
