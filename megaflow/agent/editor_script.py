"""The file editor tool, run INSIDE the sandbox: SWE-agent's / Anthropic's text-editor commands.

This file is sent to the sandbox as the program of a ``python3 -`` command
(`megaflow.agent.tools.editor_command`), so it runs the same on every backend that
has a ``python3``: standard library only, Python 3.6 syntax. Commands:

* ``view``: a file with line numbers (``view_range`` [start, end], end -1 = to the
  end), or a directory's files two levels deep (hidden ones left out);
* ``create``: a new file with ``file_text`` (an existing file is an error);
* ``str_replace``: ``old_str`` must occur exactly once; it becomes ``new_str``;
* ``insert``: ``new_str`` after line ``insert_line`` (0: at the top);
* ``undo_edit``: the file as it was before its last create/str_replace/insert.

Undo history lives under ``.megaflow/edits`` in the work directory, which carries a
``.gitignore`` of ``*`` (as the exec journal's), so it never shows in a SWE patch.
Exit code 0 on success, 1 with an ``Error:`` line otherwise (the agent's mistake).
"""

import hashlib
import json
import os
import sys

SNIPPET_LINES = 4
MAX_VIEW_CHARS = 16000


class ToolError(Exception):
    pass


def _history_dir(path):
    base = os.path.join(os.getcwd(), ".megaflow")
    os.makedirs(base, exist_ok=True)
    ignore = os.path.join(base, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w") as f:
            f.write("*\n")
    d = os.path.join(base, "edits", hashlib.sha1(path.encode()).hexdigest()[:16])
    os.makedirs(d, exist_ok=True)
    return d


def _push(path):
    """Save the file's current state (or its absence) before a change."""
    d = _history_dir(path)
    n = len(os.listdir(d))
    with open(os.path.join(d, f"{n:06d}"), "wb") as f:
        if os.path.exists(path):
            with open(path, "rb") as src:
                f.write(b"F" + src.read())
        else:
            f.write(b"N")


def _read(path):
    if not os.path.isfile(path):
        raise ToolError(f"The path {path} does not exist or is not a file.")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _write(path, text):
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _numbered(text, start=1):
    lines = text.split("\n")
    return "\n".join(f"{i + start:6d}\t{line}" for i, line in enumerate(lines))


def _snippet(text, first_line, n_lines):
    lines = text.split("\n")
    lo = max(0, first_line - 1 - SNIPPET_LINES)
    hi = min(len(lines), first_line - 1 + n_lines + SNIPPET_LINES)
    return _numbered("\n".join(lines[lo:hi]), lo + 1)


def view(path, view_range=None):
    if os.path.isdir(path):
        out = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if root != path:
                dirs[:] = []  # two levels: the directory's files and its subdirectories' files
            out.extend(os.path.join(root, name) for name in sorted(files) if not name.startswith("."))
        return "Files under {}, two levels deep:\n{}".format(path, "\n".join(out))
    text = _read(path)
    start = 1
    if view_range:
        if len(view_range) != 2 or not all(isinstance(x, int) for x in view_range):
            raise ToolError("view_range must be two integers [start, end].")
        lines = text.split("\n")
        lo, hi = view_range
        if lo < 1 or lo > len(lines) or (hi != -1 and hi < lo):
            raise ToolError(f"Invalid view_range {view_range}: the file has {len(lines)} lines.")
        text = "\n".join(lines[lo - 1:] if hi == -1 else lines[lo - 1:hi])
        start = lo
    out = _numbered(text, start)
    if len(out) > MAX_VIEW_CHARS:
        out = out[:MAX_VIEW_CHARS] + "\n[... cut: view a smaller view_range ...]"
    return f"Here is {path} with line numbers:\n{out}"


def create(path, file_text):
    if file_text is None:
        raise ToolError("create needs file_text.")
    if os.path.exists(path):
        raise ToolError(f"File already exists at {path}; use str_replace to change it.")
    _push(path)
    _write(path, file_text)
    return f"File created at {path}."


def str_replace(path, old_str, new_str):
    if not old_str:
        raise ToolError("str_replace needs a non-empty old_str.")
    text = _read(path)
    count = text.count(old_str)
    if count == 0:
        raise ToolError(f"No replacement was performed: old_str did not appear verbatim in {path}.")
    if count > 1:
        lines = [i + 1 for i, line in enumerate(text.split("\n")) if old_str.split("\n")[0] in line]
        raise ToolError(f"No replacement was performed: old_str occurs {count} times (lines {lines}); "
                        "make it unique.")
    new_str = new_str or ""
    _push(path)
    first = text[:text.index(old_str)].count("\n") + 1
    text = text.replace(old_str, new_str)
    _write(path, text)
    snippet = _snippet(text, first, new_str.count("\n") + 1)
    return f"The file {path} has been edited. A snippet of it:\n{snippet}"


def insert(path, insert_line, new_str):
    if new_str is None:
        raise ToolError("insert needs new_str.")
    text = _read(path)
    lines = text.split("\n")
    if not isinstance(insert_line, int) or insert_line < 0 or insert_line > len(lines):
        raise ToolError(f"insert_line must be between 0 and {len(lines)}.")
    _push(path)
    text = "\n".join(lines[:insert_line] + new_str.split("\n") + lines[insert_line:])
    _write(path, text)
    return "The file {} has been edited. A snippet of it:\n{}".format(
        path, _snippet(text, insert_line + 1, new_str.count("\n") + 1))


def undo_edit(path):
    d = _history_dir(path)
    saved = sorted(os.listdir(d))
    if not saved:
        raise ToolError(f"No edit of {path} to undo.")
    last = os.path.join(d, saved[-1])
    with open(last, "rb") as f:
        data = f.read()
    os.remove(last)
    if data[:1] == b"N":
        os.remove(path)
        return f"Undid the creation of {path}: it is removed."
    with open(path, "wb") as f:
        f.write(data[1:])
    return f"Last edit of {path} undone."


def run(args):
    """Carry out one command; its message, or raise ToolError."""
    command, path = args.get("command"), args.get("path")
    if not isinstance(path, str) or not path:
        raise ToolError("Every command needs a path.")
    path = os.path.normpath(os.path.join(os.getcwd(), path))
    if command == "view":
        return view(path, args.get("view_range"))
    if command == "create":
        return create(path, args.get("file_text"))
    if command == "str_replace":
        return str_replace(path, args.get("old_str"), args.get("new_str"))
    if command == "insert":
        return insert(path, args.get("insert_line"), args.get("new_str"))
    if command == "undo_edit":
        return undo_edit(path)
    raise ToolError(f"Unknown command {command!r}: use view, create, str_replace, insert or undo_edit.")


def main(args):
    try:
        print(run(args))
    except (ToolError, OSError) as exc:
        print(f"Error: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
