"""The import contracts in pyproject.toml hold: layers only point down, no circles in a package.

`lint-imports` checks them as written; these tests also prove the contracts would catch
a break: every module at the top of ``megaflow/`` has a layer, and an upward import
added to the real import graph breaks the layers contract.
"""

from __future__ import annotations

import copy
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest
from importlinter.contracts.layers import LayersContract  # the `test` extra installs import-linter

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _contract(contract_id: str) -> dict:
    return next(c for c in CONFIG["contracts"] if c["id"] == contract_id)


def _layer_modules() -> list[str]:
    """Every module named in the layers, siblings split out (``a | b`` and ``a : b``)."""
    return [m.strip() for layer in _contract("layers")["layers"]
            for m in layer.replace(":", "|").split("|")]


def test_the_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[out.stdout.find("Broken contracts"):] + out.stderr


def test_every_top_level_module_has_a_layer():
    """A new module in megaflow/ (or a new root package) must be placed, or nothing checks it."""
    modules = _layer_modules()
    assert len(modules) == len(set(modules)), "a module is in two layers"
    found = {f"megaflow.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "megaflow")])}
    missing = sorted(found - set(modules))
    assert not missing, f"place these in a layer of [tool.importlinter] in pyproject.toml: {missing}"
    roots = {m.split(".")[0] for m in modules}
    assert roots == set(CONFIG["root_packages"])


def _graph():
    return grimp.build_graph(*CONFIG["root_packages"], cache_dir=None)


def _check_layers(graph):
    spec = _contract("layers")
    options = {k: v for k, v in spec.items() if k not in ("id", "name", "type")}
    contract = LayersContract(name=spec["name"], session_options={"root_packages": CONFIG["root_packages"]},
                              contract_options=options)
    # A check removes the ignored imports from the graph it is given: give it a copy.
    return contract.check(copy.deepcopy(graph), verbose=False)


@pytest.mark.parametrize("importer, imported", [
    ("megaflow.db.models", "megaflow.hops.episode"),         # state -> services
    ("megaflow.sandbox.base", "megaflow.scheduler.admission"),  # domain -> services
    ("megaflow.hops.base", "megaflow.bench.tasks"),           # the library -> the benchmarks
    ("megaflow.scheduler.scale", "workers.common"),           # the library -> an entry point
    ("megaflow.envs.swe", "megaflow.agent.oracle"),           # independent siblings
])
def test_an_upward_import_breaks_the_layers(importer, imported):
    graph = _graph()
    assert _check_layers(graph).kept
    graph.add_import(importer=importer, imported=imported, line_number=1, line_contents="import it")
    assert not _check_layers(graph).kept
