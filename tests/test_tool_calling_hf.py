"""Tool calling on a real tokenizer: SmolLM2's chat template renders the tools and calls, and
the loss masks of a 2-turn tool-calling episode cover the calls (mask 1) and not the results.

SmolLM2's template is plain ChatML that knows nothing of tools, so this is the fallback
path (`megaflow.model.toolcalls.chat_for_template`): the tools in the system prompt, calls
and results in the Hermes format the parser reads back.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from megaflow.agent.tools import TOOLS
from megaflow.export import HFChatTokenizer, trainer_row
from megaflow.model.base import Message
from megaflow.model.toolcalls import hermes_text, parse_tool_calls, render_prompt, template_knows_tools

pytestmark = pytest.mark.integration


@pytest.fixture
def tok(smollm2_tokenizer):
    return smollm2_tokenizer  # loaded once per test process (tests/conftest.py)


def _call(name: str, **args) -> list[dict]:
    return parse_tool_calls(f'<tool_call>{json.dumps({"name": name, "arguments": args})}</tool_call>').calls


def test_the_prompt_holds_the_tool_schema_and_the_calls_and_results(tok):
    assert not template_knows_tools(tok.chat_template)
    ls = _call("bash", command="ls")
    messages = [Message(role="system", content="sys"), Message(role="user", content="list files"),
                Message(role="assistant", content="", tool_calls=ls),
                Message(role="tool", content="a.txt", tool_call_id=ls[0]["id"])]
    prompt = render_prompt(tok, messages, TOOLS)
    assert prompt.startswith("<|im_start|>system\nsys\n\n# Tools\n")
    for tool in TOOLS:
        assert json.dumps(tool) in prompt  # each schema whole, as the model reads it
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\na.txt\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "# Tools" not in render_prompt(tok, messages[:2], None)  # no tools offered, none shown


#: A template that knows tools, cut down from Qwen2.5's: the tools from `tools=`, calls from `tool_calls`.
NATIVE_TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0]['content'] }}
<tools>{% for t in tools %}
{{ t | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}{%- for m in messages %}{% if not (tools and loop.first) %}<|im_start|>{{ m.role }}
{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_knows_tools_gets_them_and_the_calls_natively(tok):
    ls = _call("bash", command="ls")
    messages = [Message(role="system", content="sys"), Message(role="user", content="list files"),
                Message(role="assistant", content="", tool_calls=ls),
                Message(role="tool", content="a.txt", tool_call_id=ls[0]["id"])]
    saved, tok.chat_template = tok.chat_template, NATIVE_TEMPLATE
    try:
        assert template_knows_tools(tok.chat_template)
        prompt = render_prompt(tok, messages, TOOLS)
    finally:
        tok.chat_template = saved
    assert "# Tools" not in prompt  # the template's own rendering, not the fallback
    assert prompt.count('"name": "str_replace_based_edit_tool"') == 1
    # Arguments go in decoded, so the template writes an object, not a JSON string in a string.
    assert '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call>' in prompt
    assert "<|im_start|>tool\na.txt<|im_end|>" in prompt


def test_loss_masks_of_a_two_turn_tool_calling_episode(tok):
    ls, submit = _call("bash", command="ls -la"), _call("submit")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # Turn 1 as the transformers backend records it: the raw ids, markup and end token included;
    # turn 2 as an OpenAI server without ids records it: the ids come from the tokenizer.
    raw = tok(hermes_text("", ls), add_special_tokens=False)["input_ids"] + [end]
    common = {"finish_reason": "stop", "model": "smollm2", "model_version": "v", "prompt_token_ids": None}
    steps = [
        SimpleNamespace(index=0, messages_in=[{"role": "system", "content": "sys"},
                                              {"role": "user", "content": "list the files"}],
                        completion="", tool_calls=ls, token_ids=raw, logprobs=[0.0] * len(raw), **common),
        SimpleNamespace(index=1, messages_in=[{"role": "tool", "content": "RESULT a.txt b.txt",
                                               "tool_call_id": ls[0]["id"]}],
                        completion="", tool_calls=submit, token_ids=None, logprobs=None, **common),
    ]
    ep = SimpleNamespace(id="e", run_id="r", group_id="g", sample_index=0, state="succeeded",
                         exit_status="submitted", reward=1.0, advantage=0.0, grading=None)
    row = trainer_row(ep, SimpleNamespace(instance_id="i"), steps, tokenizer=HFChatTokenizer(tok), tools=TOOLS)
    ids, mask = row["input_ids"], row["loss_mask"]
    assert len(ids) == len(mask) and set(mask) == {0, 1}

    spans, current = [], None  # runs of equal mask, decoded
    for i, m in zip(ids, mask):
        if current is None or current[0] != m:
            current = (m, [])
            spans.append(current)
        current[1].append(i)
    decoded = [(m, tok.decode(span)) for m, span in spans]
    assert [m for m, _ in decoded] == [0, 1, 0, 1]
    assert decoded[1][1] == '<tool_call>\n{"name": "bash", "arguments": {"command": "ls -la"}}\n</tool_call><|im_end|>'
    assert decoded[3][1] == '<tool_call>\n{"name": "submit", "arguments": {}}\n</tool_call>'
    # The schema and the tool's result are prompt tokens, never trained on.
    assert '"name": "str_replace_based_edit_tool"' in decoded[0][1]
    assert decoded[2][1] == ("<|im_start|>user\n<tool_response>\nRESULT a.txt b.txt\n</tool_response><|im_end|>\n"
                             "<|im_start|>assistant\n")
    assert row["messages"][3] == {"role": "tool", "content": "RESULT a.txt b.txt", "tool_call_id": ls[0]["id"]}
