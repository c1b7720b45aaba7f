"""The docs' worked examples really work, and every relative link in the docs resolves.

`docs/extending.md` shows how to add a sandbox backend, a model backend, an agent
scaffold and a task family; each example lives in `docs/examples/` as a real module.
Here each one meets the contract the platform holds it to: the sandbox conformance
suite, the model conformance checks, a scripted episode, MegaFlow's own grading.
Fast and service-free: the example sandbox needs bubblewrap, the embedded default's
own prerequisite, and skips on a host without it.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import need

from megaflow.agent.base import Command, FormatError, Submit
from megaflow.envs.grading import evaluate_task
from megaflow.envs.prepare import setup
from megaflow.errors import ContextLengthError, ModelUnavailableError
from megaflow.model.base import Message, ModelRequest, SamplingParams
from megaflow.model.config import ScriptedModelConfig
from megaflow.model.conformance import CHECKS as MODEL_CHECKS
from megaflow.model.scripted import ScriptedModel
from megaflow.sandbox.base import SandboxConfig
from megaflow.sandbox.conformance import CHECKS as SANDBOX_CHECKS
from megaflow.sandbox.memory import MemoryBackend
from megaflow.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def load(name: str):
    """Import `docs/examples/<name>.py` as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pydantic look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_backend(tmp_path):
    # Bubblewrap runs real processes: integration, as every other bubblewrap test (skip on a
    # laptop without it, fail under CI=true).
    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    return load("tiny_sandbox").TinyBackend(tmp_path / "sandboxes")


@pytest.mark.integration
@pytest.mark.parametrize("check", SANDBOX_CHECKS, ids=lambda c: c.__name__)
def test_example_sandbox_backend_passes_conformance(tiny_backend, check):
    check(tiny_backend, SandboxConfig(workdir="/work"))


@pytest.mark.parametrize("check", MODEL_CHECKS, ids=lambda c: c.__name__)
def test_example_model_backend_passes_conformance(check):
    example = load("function_model")
    check(example.FunctionModel(example.polite_echo))


def test_example_model_backend_reports_its_errors_as_the_taxonomy_says():
    example = load("function_model")

    def broken(messages):
        raise RuntimeError("server down")

    request = ModelRequest(messages=[Message(role="user", content="hi")])
    with pytest.raises(ModelUnavailableError):
        example.FunctionModel(broken).generate(request)
    small = example.FunctionModel(example.polite_echo, example.FunctionModelConfig(context_words=16))
    with pytest.raises(ContextLengthError):
        small.generate(ModelRequest(messages=[Message(role="user", content="word " * 17)]))
    answer = small.generate(ModelRequest(messages=[Message(role="user", content="ping")],
                                         sampling=SamplingParams(max_tokens=64)))
    assert answer.text == "Hello! You said: ping" and answer.finish_reason == "stop"


def test_example_scaffold_drives_a_scripted_episode():
    agent = load("tag_agent").TagAgent()
    task = RunSpec.parse({"tasks": [{"instance_id": "t", "instruction": "Make hi.txt.", "check": "true"}]}).tasks[0]
    model = ScriptedModel(ScriptedModelConfig(replies=[
        "First the file. <cmd>echo hi > hi.txt</cmd>", "two <cmd>a</cmd><cmd>b</cmd>", "<cmd>cat hi.txt</cmd>",
        "Done. <submit/>"]))
    sandbox = MemoryBackend().create(SandboxConfig(type="memory"), {})
    messages, actions = agent.start(task), []
    assert [m.role for m in messages] == ["system", "user"] and "hi.txt" in messages[1].content
    for _ in range(10):  # the Driver's loop, in miniature: model -> parse -> exec -> observe
        completion = model.generate(ModelRequest(messages=messages)).text
        messages.append(Message(role="assistant", content=completion))
        action = agent.parse(completion)
        actions.append(action)
        if isinstance(action, Submit):
            break
        if isinstance(action, FormatError):
            messages.append(Message(role="user", content=action.feedback))
            continue
        result = sandbox.exec(action.cmd, timeout=10)
        assert agent.finished(result) is None
        messages.extend(agent.observe(result, action.cmd))
    assert actions[0] == Command("echo hi > hi.txt") and isinstance(actions[1], FormatError)
    assert actions[2] == Command("cat hi.txt") and actions[3] == Submit()
    assert messages[-2].content == "<exit 0>\nhi\n"  # what `cat` printed, observed
    assert sandbox.read_file("hi.txt") == b"hi\n"


@pytest.mark.integration
def test_example_task_family_yields_tasks_that_grade_right(tiny_backend):
    tasks = list(load("sum_tasks").sum_tasks(3, seed=7))
    assert [t.instance_id for t in tasks] == ["sum-7-0", "sum-7-1", "sum-7-2"]
    assert [t.files for t in load("sum_tasks").sum_tasks(3, seed=7)] == [t.files for t in tasks]  # reproducible
    spec = RunSpec.parse({"tasks": [t.model_dump() for t in tasks], "agent": {"type": "oracle"}})
    assert spec.n_episodes == 3
    for task in spec.tasks:
        for solve, reward in ((True, 1.0), (False, 0.0)):
            sandbox = tiny_backend.create(SandboxConfig(), {"task": task.instance_id})
            try:
                setup(sandbox, task, timeout=10)  # as the provision hop prepares it
                for cmd in task.solution if solve else []:
                    assert sandbox.exec(cmd, timeout=10).exit_code == 0
                assert evaluate_task(sandbox, task, timeout=10).reward == reward, (task.instance_id, solve)
            finally:
                sandbox.close()


@pytest.mark.integration
def test_example_task_family_runs_through_the_platform_in_process(tmp_path):
    """The generated tasks as a run: every hop's real task body, the Driver, SQLite; no broker."""
    need("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    from megaflow.config import Settings
    from megaflow.inprocess import InProcessRunner

    tasks = [t.model_dump() for t in load("sum_tasks").sum_tasks(2, seed=3)]
    runner = InProcessRunner(Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'state.sqlite'}"))
    solved = runner.run({"tasks": tasks, "agent": {"type": "oracle"}, "sandbox": {"type": "local"}})
    assert [(s.state, s.reward) for s in solved] == [("succeeded", 1.0)] * 2
    untouched = runner.run({"tasks": tasks, "model": {"type": "scripted", "replies": ["```bash\nsubmit\n```"]},
                            "sandbox": {"type": "local"}})
    assert [(s.state, s.reward) for s in untouched] == [("succeeded", 0.0)] * 2

#: A markdown link's target: `](target)`, without an optional title.
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def broken_links(doc: Path) -> list[str]:
    """Relative link targets in `doc` that name no existing file (anchors and URLs are not followed)."""
    broken = []
    for target in LINK.findall(doc.read_text()):
        path = target.split("#", 1)[0]
        if not path or re.match(r"^[a-z][a-z0-9+.-]*:", path):
            continue
        if not (doc.parent / path).exists():
            broken.append(target)
    return broken


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert broken_links(doc) == []


#: A repository path named in backticks, e.g. `megaflow/sandbox/base.py`.
REPO_PATH = re.compile(r"`((?:megaflow|tests|docs|examples|docker|queues|migrations|workers)/[A-Za-z0-9_./-]*)`")
#: Such names that are not files of the repository: an image tag, a file the user makes.
NOT_FILES = {"megaflow/base", "docker/.env"}


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_source_path_the_docs_name_exists(doc):
    """Modules and tests move; the docs must follow (a renamed test file is the usual miss)."""
    named = set(REPO_PATH.findall(doc.read_text())) - NOT_FILES
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


def test_link_check_catches_a_broken_link(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("[ok](x.md) [web](https://example.org/a) [anchor](#top) [gone](nowhere.md#part)")
    assert broken_links(doc) == ["nowhere.md#part"]


def test_configuration_page_names_every_setting():
    from megaflow.config import Settings

    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f"MEGAFLOW_{name.upper()}" for name in Settings.model_fields if f"`MEGAFLOW_{name.upper()}`" not in page]
    assert missing == [], "docs/configuration.md lacks these settings"
