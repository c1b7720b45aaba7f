"""The small shell that the in-memory sandbox interprets (see `megaflow.sandbox.memory`).

Scripts are tokenised and parsed whole, then run against a dict of files and a set of
directories; nothing ever starts a process.
"""

from __future__ import annotations

import posixpath
import re
import time

from megaflow.sandbox.common import OutputCap

_OPS = ("&&", "||", ">>", ";", "|", ">", "&", "<", "(", ")", "`")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "0": "\0", "a": "\a", "r": "\r"}
_PRINTF_RE = re.compile(r"(%[sd%]|\\.)")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ShellTimeout(Exception):
    """The deadline passed while a script ran."""


class _Unsupported(Exception):
    """Syntax the fake does not interpret."""


class _Exit(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


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


class Shell:
    """Runs scripts against files kept in memory.

    Args:
        files: Absolute path to content; changed in place.
        dirs: Absolute paths of the directories that exist; changed in place.
        workdir: Where each script starts.
        env: Variables for ``$NAME``.
        out: Receives standard output.
        err: Receives standard error.
        deadline: `time.monotonic` value past which ``sleep`` raises `ShellTimeout`.
    """

    def __init__(
        self,
        files: dict[str, bytes],
        dirs: set[str],
        workdir: str,
        env: dict[str, str],
        out: OutputCap,
        err: OutputCap,
        deadline: float,
    ):
        self.files, self.dirs = files, dirs
        self.cwd = posixpath.normpath(workdir)
        self.env = dict(env)
        self.out, self.err = out, err
        self.deadline = deadline
        self.status = 0

    def run(self, script: str) -> int:
        """Run `script`; return its exit status.

        Raises:
            ShellTimeout: the deadline passed.
        """
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
                if path in self.dirs or posixpath.dirname(path) not in self.dirs:
                    self.err.feed(f"bash: {self._expand(target)}: cannot create file\n".encode())
                    return 1
                if kind == ">" or path not in self.files:
                    self.files[path] = b""
                dest[fd] = path
            code, out, err = self._command([self._expand(w) for w in words], data)
            for fd, chunk in ((1, out), (2, err)):
                sink = dest[fd]
                if sink == "/dev/null" or not chunk:
                    continue
                if isinstance(sink, str):
                    self.files[sink] += chunk
                elif isinstance(sink, bytearray):
                    sink += chunk
                else:
                    sink.feed(chunk)
            data = bytes(piped) if isinstance(piped, bytearray) else b""
        return code

    def _expand(self, word: list[tuple[bool, str]]) -> str:
        values = {**self.env, "?": str(self.status)}
        return "".join(values.get(text, "") if var else text for var, text in word)

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
        if path in self.dirs:
            raise IsADirectoryError(name)
        if path not in self.files:
            raise FileNotFoundError(name)
        return self.files[path]

    def _cmd_true(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        return 0, b"", b""

    def _cmd_bash(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        """``bash FILE`` or ``bash -c SCRIPT``: a child shell on the same files (how checks are run)."""
        script = args[1] if args[:1] == ["-c"] else self._read(args[0], stdin).decode()
        out, err = OutputCap(1 << 20), OutputCap(1 << 20)
        child = Shell(self.files, self.dirs, self.cwd, self.env, out, err, self.deadline)
        return child.run(script), out.data(), err.data()

    _cmd_sh = _cmd_bash

    def _cmd_test(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        """``test -f|-d|-e|-s PATH``, ``test A = B`` / ``!=``, ``test -n|-z S``, each optionally after ``!``."""
        negate = args[:1] == ["!"]
        args = args[1:] if negate else args
        if len(args) == 2 and args[0] in ("-f", "-d", "-e", "-s", "-n", "-z"):
            op, arg = args
            path = self._path(arg)
            ok = {"-f": path in self.files, "-d": path in self.dirs, "-e": path in self.files or path in self.dirs,
                  "-s": bool(self.files.get(path)), "-n": arg != "", "-z": arg == ""}[op]
        elif len(args) == 3 and args[1] in ("=", "==", "!="):
            ok = (args[0] == args[2]) != (args[1] == "!=")
        else:
            raise ValueError(f"unsupported test expression {' '.join(args)!r}")
        return (1 if ok == negate else 0), b"", b""

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
        if path not in self.dirs:
            return 1, b"", f"bash: cd: {args[0]}: No such file or directory\n".encode()
        self.cwd = path
        return 0, b"", b""

    def _cmd_mkdir(self, args: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
        parents = "-p" in args
        for name in (a for a in args if a != "-p"):
            missing, path = [], self._path(name)
            while path not in self.dirs and path not in self.files:
                missing.append(path)
                path = posixpath.dirname(path)
            if path in self.files or (not missing and not parents) or (len(missing) > 1 and not parents):
                return 1, b"", f"mkdir: cannot create directory '{name}'\n".encode()
            self.dirs.update(missing)
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
            raise ShellTimeout()
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
