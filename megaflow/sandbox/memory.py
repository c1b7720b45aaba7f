"""The in-memory sandbox fake, for unit tests and benchmarks: no processes at all.

Files live in a dict (bytes, so binary is fine). `exec` interprets a deliberately small
shell subset, enough for the conformance suite and for scripted agents:

* commands: ``true false echo printf cat pwd cd exit sleep seq head mkdir export``;
  anything else exits 127 with "command not found", as bash does;
* ``$VAR``, ``${VAR}`` and ``$?``; single and double quotes; backslash escapes;
* ``;``, ``&&``, ``||``, ``|`` and the redirections ``>``, ``>>``, ``2>``, ``>&2``,
  ``2>&1``; ``#`` comments.

Background jobs, subshells and command substitution exit 2 with "unsupported syntax"
rather than pretending. ``sleep`` past the deadline sleeps only until the deadline
and ends the command with exit 124 and ``timed_out=True``.

Sandboxes are found by id in the backend's ``store``: `attach` works for any backend
built on the same store (by default, its own).
"""

from __future__ import annotations

import errno
import posixpath
import re
import secrets
import time
from dataclasses import dataclass, field

from megaflow.errors import SandboxClosedError, SandboxNotFoundError
from megaflow.sandbox.base import ExecResult, SandboxConfig
from megaflow.sandbox.local import OutputCap, workdir_relpath

_OPS = ("&&", "||", ">>", ";", "|", ">", "&", "<", "(", ")", "`")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "0": "\0", "a": "\a", "r": "\r"}
_PRINTF_RE = re.compile(r"(%[sd%]|\\.)")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class MemoryState:
    """Everything one fake sandbox holds."""

    labels: dict[str, str]
    initial_dirs: frozenset[str]
    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)


class _Unsupported(Exception):
    """Syntax the fake does not interpret."""


class _Exit(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class _Timeout(Exception):
    """The deadline passed."""


class MemoryBackend:
    """Creates in-memory sandboxes.

    Args:
        store: Where sandboxes are kept by id; pass one dict to several backends so
            they can `attach` each other's sandboxes.
    """

    name = "memory"

    def __init__(self, store: dict[str, MemoryState] | None = None):
        self.store = store if store is not None else {}

    def create(self, config: SandboxConfig, labels: dict[str, str]) -> MemorySandbox:
        """Create an empty sandbox."""
        sandbox_id = f"mem-{secrets.token_hex(6)}"
        workdir = posixpath.normpath(config.workdir)
        dirs = {"/", "/tmp", workdir}
        while workdir != "/":
            workdir = posixpath.dirname(workdir)
            dirs.add(workdir)
        self.store[sandbox_id] = MemoryState(labels=dict(labels), initial_dirs=frozenset(dirs), dirs=set(dirs))
        return MemorySandbox(self, sandbox_id, config)

    def attach(self, sandbox_id: str, config: SandboxConfig) -> MemorySandbox:
        """Reopen a sandbox of this store.

        Raises:
            SandboxNotFoundError: no such sandbox.
        """
        if sandbox_id not in self.store:
            raise SandboxNotFoundError(f"no memory sandbox {sandbox_id!r}")
        return MemorySandbox(self, sandbox_id, config)

    def list_ids(self, labels: dict[str, str]) -> list[str]:
        """Ids of the sandboxes carrying all `labels`."""
        return sorted(
            sid for sid, state in self.store.items() if all(state.labels.get(k) == v for k, v in labels.items())
        )

    def destroy(self, sandbox_id: str) -> None:
        """Forget a sandbox. Idempotent."""
        self.store.pop(sandbox_id, None)


class MemorySandbox:
    """One in-memory sandbox."""

    def __init__(self, backend: MemoryBackend, sandbox_id: str, config: SandboxConfig):
        self.id = sandbox_id
        self.config = config
        self._backend = backend
        self._closed = False

    def exec(self, cmd: str, timeout: float = 60.0) -> ExecResult:
        """Interpret `cmd`; see the module docstring for what is understood."""
        state = self._state()
        started = time.monotonic()
        out, err = OutputCap(self.config.max_output_bytes), OutputCap(self.config.max_output_bytes)
        shell = _Shell(state, self.config, out, err, deadline=started + timeout)
        timed_out = False
        try:
            code = shell.run(cmd)
        except _Timeout:
            code, timed_out = 124, True
        return ExecResult(
            exit_code=code,
            stdout=out.text(),
            stderr=err.text(),
            timed_out=timed_out,
            truncated=out.truncated or err.truncated,
            duration_s=time.monotonic() - started,
        )

    def write_file(self, path: str, data: bytes) -> None:
        """Write bytes inside the work directory, creating parents.

        Raises:
            PermissionError: the path is outside the work directory.
        """
        state = self._state()
        rel = workdir_relpath(self.config.workdir, path)
        if rel is None:
            raise PermissionError(errno.EACCES, "only the work directory is writable", path)
        target = posixpath.normpath(posixpath.join(self.config.workdir, rel))
        if target in state.dirs:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        parent = posixpath.dirname(target)
        while parent not in state.dirs:
            if parent in state.files:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", parent)
            state.dirs.add(parent)
            parent = posixpath.dirname(parent)
        state.files[target] = bytes(data)

    def read_file(self, path: str) -> bytes:
        """Read bytes.

        Raises:
            FileNotFoundError: no such file.
            PermissionError: a relative path climbs out of the work directory.
        """
        state = self._state()
        rel = workdir_relpath(self.config.workdir, path)
        target = "/" + posixpath.normpath(path).lstrip("/") if rel is None else posixpath.join(self.config.workdir, rel)
        target = posixpath.normpath(target)
        if target in state.dirs:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if target not in state.files:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        return state.files[target]

    def reset(self) -> None:
        """Drop every file; keep the directories that existed at creation."""
        state = self._state()
        state.files.clear()
        state.dirs = set(state.initial_dirs)

    def close(self) -> None:
        """Forget the sandbox. Idempotent."""
        if not self._closed:
            self._closed = True
            self._backend.destroy(self.id)

    def _state(self) -> MemoryState:
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        state = self._backend.store.get(self.id)
        if state is None:
            raise SandboxNotFoundError(f"sandbox {self.id} no longer exists")
        return state


def _tokenize(script: str) -> list[tuple[str, object]]:
    """Split a script into ("word", parts), ("op", str), ("redir", (fd, op)) and ("dup", (fd, fd))."""
    tokens: list[tuple[str, object]] = []
    parts: list[tuple[bool, str]] = []  # (is_variable, text)
    in_word = quoted = False
    i = 0

    def end_word() -> None:
        nonlocal parts, in_word, quoted
        if in_word:
            tokens.append(("word", parts))
        parts, in_word, quoted = [], False, False

    while i < len(script):
        c = script[i]
        if c in " \t\n":
            end_word()
            i += 1
        elif c == "#" and not in_word:
            while i < len(script) and script[i] != "\n":
                i += 1
        elif c == "'":
            j = script.find("'", i + 1)
            if j < 0:
                raise _Unsupported("unterminated quote")
            parts.append((False, script[i + 1 : j]))
            in_word = quoted = True
            i = j + 1
        elif c == '"':
            i = _double_quoted(script, i + 1, parts)
            in_word = quoted = True
        elif c == "\\":
            parts.append((False, script[i + 1 : i + 2]))
            in_word = quoted = True
            i += 2
        elif c == "$":
            i = _variable(script, i + 1, parts)
            in_word = True
        elif c in ";&|<>()`":
            # "2>" and "1>" name a file descriptor only when the digit is bare and glued on.
            is_fd = c == ">" and not quoted and parts in ([(False, "1")], [(False, "2")])
            fd = int(parts[0][1]) if is_fd else 1
            if is_fd:
                parts, in_word = [], False
            end_word()
            op = next(o for o in _OPS if script.startswith(o, i))
            i += len(op)
            if op in (">", ">>") and script[i : i + 1] == "&" and script[i + 1 : i + 2] in ("1", "2"):
                tokens.append(("dup", (fd, int(script[i + 1]))))
                i += 2
            elif op in (">", ">>"):
                tokens.append(("redir", (fd, op)))
            elif op in ("&", "<", "(", ")", "`"):
                raise _Unsupported(op)
            else:
                tokens.append(("op", op))
        else:
            parts.append((False, c))
            in_word = True
            i += 1
    end_word()
    return tokens


def _double_quoted(script: str, i: int, parts: list[tuple[bool, str]]) -> int:
    while i < len(script):
        c = script[i]
        if c == '"':
            return i + 1
        if c == "\\" and script[i + 1 : i + 2] in ('"', "\\", "$", "`"):
            parts.append((False, script[i + 1]))
            i += 2
        elif c == "$":
            i = _variable(script, i + 1, parts)
        elif c == "`":
            raise _Unsupported("`")
        else:
            parts.append((False, c))
            i += 1
    raise _Unsupported("unterminated quote")


def _variable(script: str, i: int, parts: list[tuple[bool, str]]) -> int:
    """Read the name after a "$" at i - 1; return the index after it."""
    if script.startswith("{", i):
        j = script.find("}", i)
        if j < 0:
            raise _Unsupported("${")
        parts.append((True, script[i + 1 : j]))
        return j + 1
    if script.startswith("(", i):
        raise _Unsupported("$(")
    if script.startswith("?", i):
        parts.append((True, "?"))
        return i + 1
    match = _NAME_RE.match(script, i)
    if match is None:
        parts.append((False, "$"))
        return i
    parts.append((True, match.group()))
    return match.end()


def _parse(tokens: list[tuple[str, object]]) -> list[tuple[str, list]]:
    """Group tokens into [(connector, pipeline)], a pipeline being [(words, redirections)]."""
    chain: list[tuple[str, list]] = []
    connector, pipeline, words, redirs = ";", [], [], []
    stream = iter(tokens)
    for kind, value in stream:
        if kind == "word":
            words.append(value)
        elif kind == "redir":
            target = next(stream, None)
            if target is None or target[0] != "word":
                raise _Unsupported("redirection without a target")
            redirs.append((value[0], value[1], target[1]))
        elif kind == "dup":
            redirs.append((value[0], "dup", value[1]))
        else:
            pipeline.append((words, redirs))
            words, redirs = [], []
            if value != "|":
                chain.append((connector, pipeline))
                connector, pipeline = value, []
    if words or redirs or pipeline:
        pipeline.append((words, redirs))
        chain.append((connector, pipeline))
    return chain


class _Shell:
    """Runs one script against one sandbox's state."""

    def __init__(self, state: MemoryState, config: SandboxConfig, out: OutputCap, err: OutputCap, deadline: float):
        self.state = state
        self.cwd = posixpath.normpath(config.workdir)
        self.env = {"HOME": self.cwd, "PATH": "/usr/local/bin:/usr/bin:/bin", "USER": "agent", **config.env}
        self.out, self.err = out, err
        self.deadline = deadline
        self.status = 0

    def run(self, script: str) -> int:
        try:
            chain = _parse(_tokenize(script))
        except _Unsupported as exc:
            self.err.feed(f"memory sandbox: unsupported syntax: {exc}\n".encode())
            return 2
        try:
            for connector, pipeline in chain:
                if (connector == "&&" and self.status != 0) or (connector == "||" and self.status == 0):
                    continue
                self.status = self._pipeline(pipeline)
        except _Exit as exc:
            self.status = exc.code
        return self.status

    def _pipeline(self, pipeline: list) -> int:
        data, code = b"", 0
        for index, (words, redirs) in enumerate(pipeline):
            last = index == len(pipeline) - 1
            dest: dict[int, object] = {1: self.out if last else bytearray(), 2: self.err}
            piped = dest[1]
            for fd, kind, target in redirs:
                if kind == "dup":
                    dest[fd] = dest[target]
                    continue
                path = self._path(self._expand(target))
                if path == "/dev/null":
                    dest[fd] = path
                    continue
                if path in self.state.dirs or posixpath.dirname(path) not in self.state.dirs:
                    self.err.feed(f"bash: {self._expand(target)}: cannot create file\n".encode())
                    return 1
                if kind == ">" or path not in self.state.files:
                    self.state.files[path] = b""
                dest[fd] = path
            code, out, err = self._command([self._expand(w) for w in words], data)
            for fd, chunk in ((1, out), (2, err)):
                sink = dest[fd]
                if sink == "/dev/null" or not chunk:
                    continue
                if isinstance(sink, str):
                    self.state.files[sink] += chunk
                elif isinstance(sink, bytearray):
                    sink += chunk
                else:
                    sink.feed(chunk)
            data = bytes(piped) if isinstance(piped, bytearray) else b""
        return code

    def _expand(self, word: list[tuple[bool, str]]) -> str:
        return "".join((str(self.status) if text == "?" else self.env.get(text, "")) if var else text for var, text in word)

    def _path(self, path: str) -> str:
        return "/" + posixpath.normpath(posixpath.join(self.cwd, path)).lstrip("/")

    def _command(self, argv: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        if not argv:
            return 0, b"", b""
        handler = getattr(self, f"_cmd_{argv[0]}", None) if argv[0].isidentifier() else None
        if handler is None:
            return 127, b"", f"bash: {argv[0]}: command not found\n".encode()
        try:
            return handler(argv[1:], stdin)
        except (ValueError, IndexError) as exc:
            return 1, b"", f"{argv[0]}: invalid arguments: {exc}\n".encode()

    def _read(self, name: str, stdin: bytes) -> bytes:
        if name == "-":
            return stdin
        path = self._path(name)
        if path == "/dev/null":
            return b""
        if path in self.state.dirs:
            raise IsADirectoryError(name)
        if path not in self.state.files:
            raise FileNotFoundError(name)
        return self.state.files[path]

    def _cmd_true(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        return 0, b"", b""

    def _cmd_false(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        return 1, b"", b""

    def _cmd_echo(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        newline = not (args and args[0] == "-n")
        return 0, (" ".join(args[0 if newline else 1 :]) + ("\n" if newline else "")).encode(), b""

    def _cmd_printf(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        fmt, values, text = args[0], list(args[1:]), []
        while True:
            used = False
            for piece in _PRINTF_RE.split(fmt):
                if piece in ("%s", "%d"):
                    used = True
                    value = values.pop(0) if values else ""
                    text.append(str(int(value or 0)) if piece == "%d" else value)
                elif piece == "%%":
                    text.append("%")
                elif len(piece) == 2 and piece[0] == "\\":
                    text.append(_ESCAPES.get(piece[1], piece))
                else:
                    text.append(piece)
            if not values or not used:
                return 0, "".join(text).encode(), b""

    def _cmd_cat(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        out, err, code = bytearray(), bytearray(), 0
        for name in args or ["-"]:
            try:
                out += self._read(name, stdin)
            except FileNotFoundError:
                err += f"cat: {name}: No such file or directory\n".encode()
                code = 1
            except IsADirectoryError:
                err += f"cat: {name}: Is a directory\n".encode()
                code = 1
        return code, bytes(out), bytes(err)

    def _cmd_pwd(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        return 0, f"{self.cwd}\n".encode(), b""

    def _cmd_cd(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        path = self._path(args[0] if args else self.env.get("HOME", "/"))
        if path not in self.state.dirs:
            return 1, b"", f"bash: cd: {args[0]}: No such file or directory\n".encode()
        self.cwd = path
        return 0, b"", b""

    def _cmd_mkdir(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        parents = "-p" in args
        for name in (a for a in args if a != "-p"):
            missing, path = [], self._path(name)
            while path not in self.state.dirs and path not in self.state.files:
                missing.append(path)
                path = posixpath.dirname(path)
            if path in self.state.files or (not missing and not parents) or (len(missing) > 1 and not parents):
                return 1, b"", f"mkdir: cannot create directory '{name}'\n".encode()
            self.state.dirs.update(missing)
        return 0, b"", b""

    def _cmd_export(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        for arg in args:
            name, _, value = arg.partition("=")
            self.env[name] = value
        return 0, b"", b""

    def _cmd_exit(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        raise _Exit((int(args[0]) if args else self.status) & 0xFF)

    def _cmd_sleep(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        seconds = float(args[0])
        remaining = self.deadline - time.monotonic()
        if seconds > remaining:
            time.sleep(max(remaining, 0.0))
            raise _Timeout()
        time.sleep(seconds)
        return 0, b"", b""

    def _cmd_seq(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        numbers = [int(a) for a in args]
        first, step, last = {1: (1, 1, numbers[-1]), 2: (numbers[0], 1, numbers[-1])}.get(len(numbers), numbers[:3])
        return 0, "".join(f"{n}\n" for n in range(first, last + (1 if step > 0 else -1), step)).encode(), b""

    def _cmd_head(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        unit, count, files = "-n", 10, []
        while args:
            arg = args.pop(0)
            if arg in ("-c", "-n"):
                unit, count = arg, int(args.pop(0))
            else:
                files.append(arg)
        code, data, err = self._cmd_cat(files, stdin)
        if unit == "-c":
            return code, data[:count], err
        return code, b"".join(data.splitlines(keepends=True)[:count]), err
