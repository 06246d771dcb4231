"""Chat data as current datasets hold it (issue 30): tool calls, tool turns, a `tools` column, content as a list
of parts. Rendered by the tokenizer's chat template with the loss on assistant turns only (tool results are
context), for SFT, DPO and on-policy prompts; golden strings for a ChatML and a Llama-3 template; refused in one
line (file:line, cause) where the template cannot show the tool use.

The two templates are written here in the layouts of those families (ChatML with Hermes-style <tool_call> /
<tool_response> blocks; Llama 3.1's ipython turns and JSON calls); the tokenizers are small BPEs built in
tests/tiny.py, so nothing comes from the Hub.
"""

import copy
import json

import numpy as np
import pytest

from jaxft.config import DataConfig, DpoConfig
from jaxft.data.encode import load_examples
from jaxft.data.pairs import load_pairs
from jaxft.data.prepare import prepare
from jaxft.data.prompts import load_prompts
from jaxft.errors import JaxftError
from tiny import chat_tokenizer

CHATML = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- if system or tools %}{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}{{- ('\\n\\n' if system else '') + '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}{{- '\\n</tools>' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}{{- '<|im_start|>assistant\\n' + m.content }}"
    "{%- for call in m.tool_calls %}{{- '<tool_call>\\n' + ({'name': call.function.name, "
    "'arguments': call.function.arguments} | tojson) + '\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

LLAMA3 = (
    "{{- '<|begin_of_text|>' }}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- if system or tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\nCall a function by answering with JSON: "
    "{\"name\": function name, \"parameters\": its arguments}.\\n\\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson) + '\\n\\n' }}{%- endfor %}{%- endif %}"
    "{{- system + '<|eot_id|>' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + (m.content | trim) + '<|eot_id|>' }}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}"
    "{%- if m.tool_calls | length != 1 %}{{- raise_exception('one tool call per turn') }}{%- endif %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' + ({'name': m.tool_calls[0].function.name, "
    "'parameters': m.tool_calls[0].function.arguments} | tojson) + '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + (m.content | trim) + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

PLAIN_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
NO_TOOL_TURNS = CHATML.replace("{%- if m.role == 'tool' %}", "{%- if m.role == 'tool' %}{%- elif false %}")
NO_CALLS = CHATML.replace("m.role == 'assistant' and m.tool_calls", "false")  # shows the tools, drops the calls
STRICT_ROLES = ("{% for m in messages %}{% if m.role not in ('system', 'user', 'assistant') %}"
                "{{ raise_exception('Conversation roles must be system, user or assistant') }}{% endif %}"
                "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", '
             '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}')
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
MESSAGES = [  # OpenAI's layout: content None beside tool_calls, arguments as a JSON string, content parts
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C, sunny"},
    {"role": "assistant", "content": [{"type": "text", "text": "It is 18 C"}, {"type": "text", "text": "and sunny."}]},
]
SNOW = {"role": "assistant", "content": "It is snowing."}

GOLDEN = {  # template → (rendered text of MESSAGES + TOOLS, the trained text: one string per assistant turn)
    "chatml": (
        "<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\n" + TOOL_JSON + "\n</tools><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>tool\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 18 C\nand sunny.<|im_end|>\n",
        ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
         "It is 18 C\nand sunny.<|im_end|>"]),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        'Call a function by answering with JSON: {"name": function name, "parameters": its arguments}.\n\n'
        + TOOL_JSON + "\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\n18 C, sunny<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 18 C\nand sunny.<|eot_id|>",
        ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 18 C\nand sunny.<|eot_id|>"]),
}


@pytest.fixture(scope="module")
def toks():
    return {"chatml": chat_tokenizer(CHATML, CHATML_SPECIALS, "<|im_end|>"),
            "llama3": chat_tokenizer(LLAMA3, LLAMA3_SPECIALS, "<|eot_id|>", bos="<|begin_of_text|>"),
            "plain": chat_tokenizer(PLAIN_CHATML, CHATML_SPECIALS, "<|im_end|>"),
            "no tool turns": chat_tokenizer(NO_TOOL_TURNS, CHATML_SPECIALS, "<|im_end|>"),
            "no calls": chat_tokenizer(NO_CALLS, CHATML_SPECIALS, "<|im_end|>"),
            "strict roles": chat_tokenizer(STRICT_ROLES, CHATML_SPECIALS, "<|im_end|>")}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(tok, ex):
    """The decoded runs of trained tokens, in order."""
    m = np.concatenate([[False], ex.loss_mask, [False]]).astype(int)
    d = np.diff(m)
    return [tok.decode(ex.tokens[a:b]) for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1))]


def assert_golden(tok, ex, text, trained):
    assert tok.decode(ex.tokens) == text
    np.testing.assert_array_equal(ex.tokens, tok(text, add_special_tokens=False)["input_ids"])
    assert trained_text(tok, ex) == trained


# ---------------------------------------------------------------- SFT


@pytest.mark.parametrize("template", GOLDEN)
@pytest.mark.parametrize("tools_as", ["list", "json string"])
def test_sft_golden(tmp_path, toks, template, tools_as):
    tok, (text, trained) = toks[template], GOLDEN[template]
    row = {"messages": MESSAGES, "tools": TOOLS if tools_as == "list" else json.dumps(TOOLS)}
    (ex,), report = load_examples(DataConfig(train=str(write_rows(tmp_path / "t.jsonl", [row]))), tok)
    assert report.skipped == 0, report.summary()
    assert_golden(tok, ex, text, trained)
    assert "18 C, sunny" not in "".join(trained)  # the tool result is context, never a target


@pytest.mark.parametrize("template", GOLDEN)
def test_sft_formats_with_tools_render_alike(tmp_path, toks, template):
    """The same conversation as a prompt/completion row (TRL's conversational layout) and with the bare
    {"name", "arguments"} call layout (arguments an object): the same tokens; only the completion trained."""
    tok, (text, trained) = toks[template], GOLDEN[template]
    bare = copy.deepcopy(MESSAGES)
    bare[2] = {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    rows = [{"messages": bare, "tools": TOOLS}, {"prompt": MESSAGES[:4], "completion": MESSAGES[4:], "tools": TOOLS}]
    (a, b), report = load_examples(DataConfig(train=str(write_rows(tmp_path / "t.jsonl", rows))), tok)
    assert report.skipped == 0, report.summary()
    assert_golden(tok, a, text, trained)
    assert_golden(tok, b, text, trained[1:])


def test_tool_rows_from_parquet(tmp_path, toks):
    """As a datasets Parquet file holds them: every message has every key (None where absent), content strings."""
    import datasets

    messages = copy.deepcopy(MESSAGES)
    messages[1]["content"], messages[4]["content"] = "Weather in Paris?", "It is 18 C\nand sunny."
    rows = [{"messages": messages, "tools": json.dumps(TOOLS)}, {"messages": MESSAGES[1:2] + [SNOW], "tools": None}]
    rows[1]["messages"][0] = {"role": "user", "content": "Weather in Paris?"}
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    (ex, plain), report = load_examples(DataConfig(train=str(tmp_path / "t.parquet")), toks["chatml"])
    assert report.skipped == 0, report.summary()
    assert_golden(toks["chatml"], ex, *GOLDEN["chatml"])
    assert toks["chatml"].decode(plain.tokens) == ("<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                                                   "<|im_start|>assistant\nIt is snowing.<|im_end|>\n")


def test_prepare_keeps_tool_rows(tmp_path, capsys):
    src = write_rows(tmp_path / "raw.jsonl", [{"messages": MESSAGES, "tools": TOOLS}])
    counts = prepare([str(src)], str(tmp_path / "o"), validation_fraction=0, seed=0)
    assert (counts["read"], counts["bad"], counts["train"]) == (1, 0, 1)


# ---------------------------------------------------------------- DPO


@pytest.mark.parametrize("template", GOLDEN)
def test_dpo_golden_prompt_with_tool_turns(tmp_path, toks, template):
    """Preference pairs whose prompt holds a tool call and its result: explicit and implicit prompt alike; only
    each side's completion is trained. And a pair whose chosen completion is itself a tool call."""
    tok, (text, trained) = toks[template], GOLDEN[template]
    header, eot, after = {"chatml": ("<|im_start|>assistant\n", "<|im_end|>", "\n"),
                          "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "")}[template]
    prompt_text = text[:text.rindex(header)]  # through the tool turn
    rows = [{"prompt": MESSAGES[:4], "chosen": MESSAGES[4:], "rejected": [SNOW], "tools": TOOLS},
            {"chosen": MESSAGES, "rejected": MESSAGES[:4] + [SNOW], "tools": json.dumps(TOOLS)},
            {"prompt": MESSAGES[:2], "chosen": [MESSAGES[2]], "rejected": [SNOW], "tools": TOOLS}]
    pairs, report = load_pairs(DataConfig(train=str(write_rows(tmp_path / "p.jsonl", rows))), DpoConfig(), tok)
    assert len(pairs) == 3 and report.skipped == 0, report.summary()
    for p in pairs[:2]:
        assert_golden(tok, p.chosen, text, trained[1:])
        assert_golden(tok, p.rejected, prompt_text + header + "It is snowing." + eot + after, ["It is snowing." + eot])
    call_end = text.index(trained[0]) + len(trained[0]) + len(after)
    assert_golden(tok, pairs[2].chosen, text[:call_end], trained[:1])
    assert_golden(tok, pairs[2].rejected, text[:text.index(header)] + header + "It is snowing." + eot + after,
                  ["It is snowing." + eot])


# ---------------------------------------------------------------- on-policy prompts


def test_prompts_carry_tools_to_the_template(tmp_path, toks):
    tok, (text, _) = toks["chatml"], GOLDEN["chatml"]
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": MESSAGES[:4], "tools": TOOLS, "solution": "18 C"}])
    (p,), _ = load_prompts(DataConfig(train=str(path)), tok)
    head = text[:text.index("<|im_start|>assistant\nIt is")]
    assert tok.decode(p.ids) == head + "<|im_start|>assistant\n" and p.columns["solution"] == "18 C"
    _, report = load_prompts(DataConfig(train=str(write_rows(tmp_path / "q.jsonl", [
        {"prompt": MESSAGES[:4], "tools": TOOLS}, {"prompt": "Hi"}]))), toks["plain"])
    assert report.skipped_by_reason == {"template without tool support": 1}


# ---------------------------------------------------------------- what is refused, in one line


def test_templates_that_cannot_show_tool_use_are_refused_per_row(tmp_path, toks):
    plain_tool_turn = [{"role": "user", "content": "Look it up."}, {"role": "tool", "content": "found it"},
                       {"role": "assistant", "content": "Found."}]
    rows = [{"messages": MESSAGES[1:2] + [SNOW]},  # no tool use: fine with any template
            {"messages": MESSAGES, "tools": TOOLS},
            {"messages": MESSAGES},
            {"messages": plain_tool_turn}]
    path = write_rows(tmp_path / "t.jsonl", rows)
    examples, r = load_examples(DataConfig(train=str(path)), toks["plain"])
    # a template without tool support ignores `tools` and drops the call (the turn renders empty) silently
    assert len(examples) == 2 and r.skipped_by_reason == {"template without tool support": 2}
    assert r.first_errors == [
        f"{path}:2: the chat template leaves out the tools column's tools[0] ('get_weather'): it cannot render tool "
        "use (set a chat template that does)",
        f"{path}:3: the chat template leaves out message 2's call of 'get_weather': it cannot render tool use (set a "
        "chat template that does)"]
    _, r = load_examples(DataConfig(train=str(path)), toks["no tool turns"])  # renders calls, skips results
    assert r.first_errors == [f"{path}:{n}: the chat template leaves out message {k} (a tool turn): it cannot "
                              "render tool use (set a chat template that does)" for n, k in ((2, 3), (3, 3), (4, 1))]
    _, r = load_examples(DataConfig(train=str(path)), toks["no calls"])  # shows the tools (and their names)
    assert r.first_errors == [f"{path}:{n}: the chat template leaves out message 2's call of 'get_weather': it cannot "
                              "render tool use (set a chat template that does)" for n in (2, 3)]
    _, r = load_examples(DataConfig(train=str(path)), toks["strict roles"])  # raises on the tool role
    assert r.skipped_by_reason == {"chat template error": 3} and r.first_errors[0] == (
        f"{path}:2: chat template error: Conversation roles must be system, user or assistant")
    with pytest.raises(JaxftError, match=rf"^{path}:2: the chat template leaves out the tools column's tools\[0\]"):
        load_examples(DataConfig(train=str(path), strict=True), toks["plain"])
    two_calls = copy.deepcopy(MESSAGES)
    two_calls[2]["tool_calls"] = [CALL, CALL]
    _, r = load_examples(DataConfig(train=str(write_rows(tmp_path / "two.jsonl", [{"messages": [two_calls[1], SNOW]},
                                                                                  {"messages": two_calls}]))),
                         toks["llama3"])
    assert r.first_errors == [f"{tmp_path / 'two.jsonl'}:2: chat template error: one tool call per turn"]


BAD = {  # a row → (reason, the message after file:line)
    "image part": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}, SNOW]},
        "non-text content", "'messages[0].content[1]' is a content part of type 'image_url'; jaxft trains text-only "
                            "models (text parts are joined; image, audio and other parts are refused)"),
    "audio part": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, SNOW]},
                   "non-text content", "'messages[0].content[0]' is a content part of type 'input_audio'"),
    "text part without text": ({"messages": [{"role": "user", "content": [{"type": "text"}]}, SNOW]},
                               "missing field", "'messages[0].content[0].text' is missing, expected a string"),
    "content a number": ({"messages": [{"role": "user", "content": 3}, SNOW]},
                         "wrong type", "'messages[0].content' is a number, expected a string or a list of text parts"),
    "arguments not JSON": ({"messages": [MESSAGES[1], {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": '}}]}]},
        "bad tool call", "'messages[1].tool_calls[0]' arguments: a string that is not valid JSON (Expecting value"),
    "arguments a list": ({"messages": [MESSAGES[1], {"role": "assistant", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": "[1]"}}]}]},
        "bad tool call", "'messages[1].tool_calls[0]' arguments are a list, expected an object"),
    "call without name": ({"messages": [MESSAGES[1], {"role": "assistant", "tool_calls": [{"function": {}}]}]},
                          "bad tool call", "'messages[1].tool_calls[0]' has no function name"),
    "calls on a user turn": ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}, SNOW]},
                             "bad tool call", "'messages[0].tool_calls' on a user turn (only assistant turns call"),
    "tools not a list": ({"messages": MESSAGES, "tools": {"name": "get_weather"}},
                         "bad tools", "'tools' is a object, expected a list of tool definitions"),
    "tools bad JSON": ({"messages": MESSAGES, "tools": "[{"}, "bad tools", "'tools': a string that is not valid JSON"),
    "tool without name": ({"messages": MESSAGES, "tools": [{"type": "function", "function": {}}]},
                          "bad tools", "'tools[0]' is not a tool definition with a function name"),
    "no content, no calls": ({"messages": [MESSAGES[1], {"role": "assistant", "content": None}]},
                             "missing field", "missing field 'messages[1].content'"),
}


def test_bad_tool_rows_are_skipped_with_file_line_and_cause(tmp_path, toks):
    path = write_rows(tmp_path / "t.jsonl", [{"messages": MESSAGES, "tools": TOOLS}] + [r for r, _, _ in BAD.values()])
    examples, r = load_examples(DataConfig(train=str(path)), toks["chatml"])
    assert len(examples) == 1 and r.skipped == len(BAD)
    errors = [f"{path}:{n}" for n in range(2, len(BAD) + 2)]
    for n, (name, (_, _, text)) in enumerate(BAD.items(), 2):
        with pytest.raises(JaxftError) as e:
            load_examples(DataConfig(train=str(write_rows(tmp_path / f"{n}.jsonl", [BAD[name][0]])), strict=True),
                          toks["chatml"])
        assert str(e.value).startswith(f"{tmp_path / f'{n}.jsonl'}:1: {text}"), (name, str(e.value))
        assert "\n" not in str(e.value)
    reasons = {}
    for _, reason, _ in BAD.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    assert r.skipped_by_reason == reasons and r.first_errors[0].startswith(errors[0])
