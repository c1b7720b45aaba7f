"""Keep credentials out of specs, events, exports and logs.

Two tools:

* `find_secrets` spots what looks like a credential in a structure (a spec): a key
  named like one (``api_key``, ``*_TOKEN``, ``password`` …) holding a value, a
  string in a known credential format (``sk-…``, ``ghp_…``, ``AKIA…``, a private
  key block, a bearer token), or a URL with a password in it. Specs holding any
  are refused: keys come from the environment (``model.api_key_env``).
* `redact` / `redact_text` replace such things with ``***``, and so do they for
  the values of this process's own secret environment variables
  (`register_env_secrets`). Events (`megaflow.events.emit`), error texts, exports
  and every log record (`install_log_redaction`) pass through them.

Trajectories keep what the model and the sandbox produced, token ids included;
sandboxes start with a cleared environment, so a worker's credentials never reach
them in the first place.
"""

from __future__ import annotations

import logging
import os
import re
import threading

MASK = "***"

#: Key names that hold credentials (whole name or its last ``_``/``-`` part).
_SECRET_KEY = re.compile(
    r"(?i)(?:^|[_.-])(?:api[_-]?key|apikey|secret|secret[_-]?key|token|access[_-]?token|auth[_-]?token|"
    r"password|passwd|credentials?|private[_-]?key|access[_-]?key|authorization|bearer|"
    r"basic[_-]?auth|client[_-]?secret)$"
)
#: Credential formats worth catching wherever they appear.
_VALUE_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)"),
    re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}"),
    re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
]
#: ``Bearer <token>`` / ``Basic <b64>``: the scheme is kept, the token masked.
_AUTH_HEADER = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}")
#: ``scheme://user:password@host``: the password is masked.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):([^@\s/]+)@")
#: ``password=...``, ``api_key: ...`` in free text (logs, error messages).
_ASSIGNMENT = re.compile(
    r"(?i)\b((?:api[_-]?key|apikey|secret|token|password|passwd|access[_-]?key|client[_-]?secret)"
    r"[\"']?\s*[=:]\s*[\"']?)([^\s\"',;&}]{6,})"
)
#: Environment variables whose values are secrets even though their names say nothing.
_SECRET_ENV_VARS = ("MEGAFLOW_FLOWER_BASIC_AUTH",)
#: Shortest environment value treated as a secret: shorter ones would mask ordinary words.
_MIN_SECRET_LEN = 8

_known: set[str] = set()
_known_lock = threading.Lock()


def is_secret_key(name: str) -> bool:
    """True when a key or variable name says its value is a credential."""
    return bool(_SECRET_KEY.search(name))


def register_secret(value: str | None) -> None:
    """Mask `value` wherever it appears from now on (in this process)."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _known_lock:
            _known.add(value)


def register_env_secrets(environ: dict[str, str] | None = None) -> int:
    """Register the values of secret-looking environment variables, and URL passwords in ours.

    Returns:
        How many values are now masked.
    """
    environ = os.environ if environ is None else environ
    for name, value in environ.items():
        if is_secret_key(name) or name in _SECRET_ENV_VARS:
            register_secret(value)
            if name in _SECRET_ENV_VARS:  # user:password[,user:password]: each password too
                for credential in value.split(","):
                    register_secret(credential.partition(":")[2])
        elif name.startswith("MEGAFLOW_") and "://" in value:
            match = _URL_PASSWORD.search(value)
            if match:
                register_secret(match.group(2))
    with _known_lock:
        return len(_known)


def redact_text(text: str, assignments: bool = True) -> str:
    """`text` with credentials masked.

    Args:
        assignments: also mask ``password=…``-style assignments. Right for logs and
            errors; exports of code and trajectories leave them (``password =
            get_password()`` is code, not a secret) and mask only credential formats.
    """
    if not text:
        return text
    with _known_lock:
        known = sorted(_known, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, MASK)
    for pattern in _VALUE_PATTERNS:
        text = pattern.sub(MASK, text)
    text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{MASK}@", text)
    if not assignments:
        return text
    return _ASSIGNMENT.sub(lambda m: f"{m.group(1)}{MASK}", text)


def redact(value, assignments: bool = True):
    """A copy of a JSON-like structure with secret-keyed values and credential-looking strings masked."""
    if isinstance(value, str):
        return redact_text(value, assignments)
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and is_secret_key(k) and isinstance(v, str) and v
                    else redact(v, assignments)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, assignments) for v in value]
    return value


def find_secrets(value, path: str = "") -> list[str]:
    """Paths (``sandbox.env.HF_TOKEN``) of what looks like a credential in `value`."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and is_secret_key(key) and isinstance(item, str) and item.strip():
                found.append(where)
            else:
                found.extend(find_secrets(item, where))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found.extend(find_secrets(item, f"{path}[{i}]"))
    elif isinstance(value, str) and _looks_secret(value):
        found.append(path or "(value)")
    return found


def find_nul(value, path: str = "") -> str | None:
    """Path of the first string (or key) holding a NUL character, if any."""
    if isinstance(value, str):
        return (path or "(value)") if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and "\x00" in key:
                return where
            hit = find_nul(item, where)
            if hit:
                return hit
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            hit = find_nul(item, f"{path}[{i}]")
            if hit:
                return hit
    return None


def _looks_secret(text: str) -> bool:
    if any(p.search(text) for p in _VALUE_PATTERNS):
        return True
    return bool(_URL_PASSWORD.search(text) or _AUTH_HEADER.search(text))


class _RedactingFactory:
    """A LogRecord factory that masks credentials in the message and any traceback."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as usual
            return record
        clean = redact_text(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record


def install_log_redaction(environ: dict[str, str] | None = None) -> None:
    """Mask credentials in every log record of this process from now on. Idempotent.

    A record factory rather than a handler filter: it covers handlers added later
    (Celery's, in worker processes) and loggers that propagate nowhere.
    """
    register_env_secrets(environ)
    current = logging.getLogRecordFactory()
    if not isinstance(current, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(current))
