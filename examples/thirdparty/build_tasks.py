"""Build a SWE task set from real third-party packages and their own test suites (issue #15, point 6).

For each package below (small, pure Python, pinned, none of them a MegaFlow
dependency) the script fetches the sdist with pip, injects one bug (a fixed text
replacement), runs the package's own test suite on the original and on the buggy
tree, and writes a task whose FAIL_TO_PASS are the tests the bug breaks and whose
PASS_TO_PASS are the tests that pass either way. The gold patch is the diff that
undoes the bug, checked to restore the original tree. The tests ship in the
repository (empty ``test_patch``), as they do in the wild.

    python examples/thirdparty/build_tasks.py OUT_DIR [--only NAME ...]
    megaflow env build OUT_DIR/tasks.yaml            # docker images (environment: pytest)
    megaflow env validate OUT_DIR/tasks.yaml --sandbox docker
    megaflow run OUT_DIR/run-oracle.yaml             # reward 1; run-noop, run-neuter... earn 0

Sources are fetched at build time, never committed. Run specs for the scripted
agents of `AGENTS` (oracle, no-op and three tamper agents) are written beside the tasks.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

TEST_COMMAND = "python -m pytest -rA -p no:cacheprovider"


@dataclass(frozen=True)
class Package:
    """A pinned package, where its tests are, and the bug injected into it."""

    name: str
    version: str
    file: str  # relative to the sdist root
    old: str
    new: str
    problem: str
    tests: str = "tests"
    pythonpath: str = "."
    after: str = ""  # the replacement happens at the first `old` after this text


PACKAGES = [
    Package("inflection", "0.5.1", "inflection/__init__.py", "if number % 100 in (11, 12, 13):",
            "if number % 100 in (11, 12):", "`inflection.ordinal(13)` returns 'rd' (and `ordinalize(113)` "
            "'113rd'): the teens ending in 3 must take 'th'.", tests="test_inflection.py"),
    Package("cachetools", "5.3.3", "src/cachetools/__init__.py",
            "        if key in self:  # __missing__ may not store item\n            self.__update(key)\n", "",
            "`LRUCache` evicts an item that was just read: reading a key must count as a use, so the least "
            "recently *used* item goes first.", pythonpath="src", after="class LRUCache"),
    Package("toolz", "0.12.1", "toolz/itertoolz.py", "        d[item] += 1\n", "        d[item] = 1\n",
            "`toolz.frequencies(['cat', 'cat', 'pig'])` gives {'cat': 1, 'pig': 1}: each item must be counted "
            "as often as it occurs.", tests="toolz/tests", after="def frequencies("),
    Package("more-itertools", "10.2.0", "more_itertools/more.py",
            "    iterator = iter(partial(take, n, iter(iterable)), [])\n",
            "    iterator = iter(partial(take, n + 1, iter(iterable)), [])\n",
            "`more_itertools.chunked([1, 2, 3, 4], 2)` yields chunks of 3: every chunk but the last must have "
            "exactly n items.", after="def chunked("),
    Package("parse", "1.20.1", "parse.py", "        return name in self.named\n",
            "        return name in self.fixed\n", "`'name' in parse('{name}', 'x')` is False: a Result must "
            "contain its named fields.", tests="tests"),
    Package("xmltodict", "0.13.0", "xmltodict.py", "attrs[ik[len(attr_prefix):]] = iv",
            "attrs[ik[len(attr_prefix) + 1:]] = iv", "`xmltodict.unparse({'a': {'@href': 'x'}})` writes the "
            "attribute as `ref`: attribute names lose their first letter."),
]

#: Scripted agents, the same commands for every task: what each runs before submitting.
AGENTS = {
    "noop": [],
    # (a) neuter the failing tests: every assert of every test file made true.
    "neuter": ["find . -name 'test*.py' -not -path './.git/*' | xargs sed -i -E "
               "'s/^([[:space:]]*)assert /\\1assert True or /'"],
    # (b) a conftest.py that turns every failed test into a pass.
    "conftest": ["printf 'import pytest\\n\\n@pytest.hookimpl(hookwrapper=True)\\ndef pytest_runtest_makereport("
                 "item, call):\\n    outcome = yield\\n    outcome.get_result().outcome = \"passed\"\\n' > conftest.py"],
    # (c) the test config: a plugin loaded through pytest.ini that does the same.
    "ini": ["printf 'import pytest\\n\\n@pytest.hookimpl(hookwrapper=True)\\ndef pytest_runtest_makereport("
            "item, call):\\n    outcome = yield\\n    outcome.get_result().outcome = \"passed\"\\n' > mf_plugin.py",
            "printf '[pytest]\\naddopts = -p mf_plugin\\n' > pytest.ini"],
}


def fetch(pkg: Package, into: Path) -> Path:
    """The package's sdist, unpacked (pip download, no dependencies)."""
    dl = into / "dl"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d",
                    str(dl), f"{pkg.name}=={pkg.version}"], check=True, capture_output=True, timeout=600)
    [archive] = list(dl.iterdir())
    shutil.unpack_archive(str(archive), into / "src")
    [root] = list((into / "src").iterdir())
    return root


def inject(pkg: Package, root: Path) -> None:
    path = root / pkg.file
    text = path.read_text()
    start = text.index(pkg.after) if pkg.after else 0
    at = text.index(pkg.old, start)
    path.write_text(text[:at] + pkg.new + text[at + len(pkg.old):])


def gold_patch(buggy: Path, fixed: Path, rel: str) -> str:
    """The diff that turns the buggy file back into the original, paths as ``a/REL`` / ``b/REL``."""
    proc = subprocess.run(["git", "diff", "--no-index", "--no-prefix", str(buggy / rel), str(fixed / rel)],
                          capture_output=True, text=True)
    lines = proc.stdout.splitlines(keepends=True)
    out = [f"diff --git a/{rel} b/{rel}\n"]
    for line in lines[1:]:
        if line.startswith("--- "):
            line = f"--- a/{rel}\n"
        elif line.startswith("+++ "):
            line = f"+++ b/{rel}\n"
        elif line.startswith("index "):
            continue
        out.append(line)
    return "".join(out)


def run_suite(pkg: Package, root: Path) -> dict[str, str]:
    """Status per test id of the package's own suite in `root` (pytest, parsed by swebench's parser)."""
    from swebench.harness.log_parsers.python import parse_log_pytest

    env = {**os.environ, "PYTHONPATH": str(root / pkg.pythonpath), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", pkg.tests], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    return parse_log_pytest(proc.stdout, None)


def build_one(pkg: Package, out: Path, work: Path) -> dict:
    original = fetch(pkg, work / pkg.name)
    buggy = out / "repos" / f"{pkg.name}-{pkg.version}"
    shutil.rmtree(buggy, ignore_errors=True)
    shutil.copytree(original, buggy)
    inject(pkg, buggy)
    patch = gold_patch(buggy, original, pkg.file)
    check = work / pkg.name / "check"
    shutil.copytree(buggy, check)
    subprocess.run(["git", "apply", "-"], input=patch, text=True, cwd=check, check=True)
    if not filecmp.cmp(check / pkg.file, original / pkg.file, shallow=False):
        raise RuntimeError(f"{pkg.name}: the gold patch does not restore the original")
    before, after = run_suite(pkg, original), run_suite(pkg, buggy)
    # pytest's summary line cuts an id at its first space: such ids cannot be run by name.
    before = {t: s for t, s in before.items() if t.count("[") == t.count("]")}
    f2p = sorted(t for t, s in before.items() if s == "PASSED" and after.get(t) != "PASSED")
    p2p = sorted(t for t, s in before.items() if s == "PASSED" and after.get(t) == "PASSED")
    if not f2p or not p2p:
        raise RuntimeError(f"{pkg.name}: the bug breaks {len(f2p)} tests, leaves {len(p2p)} passing")
    prefix = "" if pkg.pythonpath == "." else f"PYTHONPATH={pkg.pythonpath} "
    return {"kind": "swe", "instance_id": f"{pkg.name}-{pkg.version}-bug1", "problem_statement": pkg.problem,
            "repo": os.path.relpath(buggy, out), "test_command": prefix + TEST_COMMAND,
            "FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p, "patch": patch}


def run_spec(agent: str, sandbox: str) -> dict:
    """A run of the task set with a scripted agent (the oracle replays each gold patch)."""
    spec = {"name": f"thirdparty-{agent}", "tasks_file": "tasks.yaml", "sandbox": {"type": sandbox}}
    if agent == "oracle":
        return {**spec, "agent": {"type": "oracle"}}
    replies = [f"```bash\n{cmd}\n```" for cmd in AGENTS[agent]] + ["```bash\nsubmit\n```"]
    return {**spec, "model": {"type": "scripted", "replies": replies}}


def build(out: Path, only: list[str] | None = None, sandbox: str = "docker") -> list[dict]:
    """Build the task set into `out` (``tasks.yaml``, ``repos/``, ``run-<agent>.yaml``); returns the tasks."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    with tempfile.TemporaryDirectory(prefix="megaflow-thirdparty-") as tmp:
        for pkg in PACKAGES:
            if only and pkg.name not in only:
                continue
            tasks.append(build_one(pkg, out, Path(tmp)))
            print(f"{tasks[-1]['instance_id']}: {len(tasks[-1]['FAIL_TO_PASS'])} FAIL_TO_PASS, "
                  f"{len(tasks[-1]['PASS_TO_PASS'])} PASS_TO_PASS", file=sys.stderr)
    defaults = {"kind": "swe", "environment": {"pip": ["pytest"]}}
    body = {"defaults": defaults, "tasks": [{k: v for k, v in t.items() if k != "kind"} for t in tasks]}
    (out / "tasks.yaml").write_text(yaml.safe_dump(body, sort_keys=False, width=120))
    for agent in ["oracle", *AGENTS]:
        (out / f"run-{agent}.yaml").write_text(yaml.safe_dump(run_spec(agent, sandbox), sort_keys=False))
    (out / "manifest.json").write_text(json.dumps({p.name: p.version for p in PACKAGES
                                                   if not only or p.name in only}, indent=2))
    return tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="*", help="Package names to build (default: all).")
    parser.add_argument("--sandbox", default="docker", choices=["docker", "local"], help="Backend of the run specs.")
    args = parser.parse_args(argv)
    build(args.out, args.only, args.sandbox)
    return 0


if __name__ == "__main__":
    sys.exit(main())
