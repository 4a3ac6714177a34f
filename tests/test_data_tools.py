"""Tool-calling data: the shapes on load, rendering (built-in Hermes format and a template's own), the loss mask,
the curation checks, parse_tool_calls, and preview / stats."""

from __future__ import annotations

import copy
import json

import pytest

from tuneforge.data.curation.clean import clean_files
from tuneforge.data.curation.config import CHECKS, CurationConfig
from tuneforge.data.curation.stats import compute_stats
from tuneforge.data.curation.validation import check_record
from tuneforge.data.dataset import TRAINING_CHECKS, load_examples
from tuneforge.data.formats import RecordError, detect_format, to_example
from tuneforge.data.loaders import RawRecord
from tuneforge.data.preview import preview
from tuneforge.data.rendering import render_chat, tokenize_example
from tuneforge.data.settings import DataConfig
from tuneforge.data.tools import TOOL_CHECKS, TOOLS_AFTER, TOOLS_PREAMBLE, parse_tool_calls, render_call, to_builtin

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]


def call(name, args, call_id=None, as_string=True):
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


def openai_record(**over):
    rec = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"}, "c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C sunny"},
        {"role": "assistant", "content": "It is 18C and sunny."}]}
    rec.update(over)
    return rec


def sharegpt_record():
    return {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18C sunny"},
        {"from": "gpt", "value": "It is 18C and sunny."}]}


def example_of(rec):
    return to_example(rec, detect_format(rec))


# --- shapes ---------------------------------------------------------------------------------------------------------

def test_openai_and_sharegpt_load_to_the_same_record():
    a, b = example_of(openai_record()), example_of(sharegpt_record())
    assert detect_format(sharegpt_record()) == "sharegpt"
    expected = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "18C sunny", "tool_call_id": "c1"},
                {"role": "assistant", "content": "It is 18C and sunny."}]
    assert a.messages == expected
    assert a.tools == b.tools == TOOLS
    # ShareGPT has no ids: the same record but for them (the observation answers the call before it)
    strip = copy.deepcopy(expected)
    strip[1]["tool_calls"][0]["id"] = None
    strip[2]["tool_call_id"] = None
    assert b.messages == strip
    # arguments as an object and as a JSON string are one shape; bare {name, parameters} tools too
    obj = openai_record(tools=[t["function"] for t in TOOLS])
    obj["messages"][1]["tool_calls"] = [call("get_weather", {"city": "Paris"}, "c1", as_string=False)]
    assert example_of(obj).messages == expected and example_of(obj).tools == TOOLS


def test_dataset_level_tools_file(tmp_path):
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(TOOLS))
    rec = openai_record()
    del rec["tools"]
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(rec) + "\n" + json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    loaded = load_examples(str(data), DataConfig(train=str(data), tools=str(tools_file)))
    assert not loaded.rejects and [e.tools for e in loaded.examples] == [TOOLS, TOOLS]
    without = load_examples(str(data), DataConfig(train=str(data)))      # no tools anywhere: the call is unknown
    assert [r.reasons[0].check for r in without.rejects] == ["unknown_tool"]


def test_bad_tools_file_is_one_line_naming_the_key(tmp_path):
    from tuneforge.errors import ConfigError

    bad = tmp_path / "tools.json"
    bad.write_text(json.dumps([{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(openai_record()) + "\n")
    with pytest.raises(ConfigError, match=r"^data\.tools .*f\): parameters are not a valid JSON Schema") as e:
        load_examples(str(data), DataConfig(train=str(data), tools=str(bad)))
    assert "\n" not in str(e.value)


# --- rendering ------------------------------------------------------------------------------------------------------

def test_builtin_format_exact_text(tokenizer):
    """SmolLM2's ChatML template knows no tools: the built-in Hermes-style format, to the character."""
    ex = example_of(openai_record(tools=[WEATHER]))
    tools_line = json.dumps(WEATHER)
    expected = (
        f"<|im_start|>system\n{TOOLS_PREAMBLE}\n<tools>\n{tools_line}\n</tools>\n\n{TOOLS_AFTER}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 18C and sunny.<|im_end|>\n")
    assert render_chat(tokenizer, ex.messages, False, tools=ex.tools) == expected


def test_builtin_format_merges_parallel_results_and_keeps_a_system_prompt():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3 and 4+5?"},
            {"role": "assistant", "content": "Adding.", "tool_calls": [call("add", {"a": 2, "b": 3}, "x"),
                                                                         call("add", {"a": 4, "b": 5}, "y")]},
            {"role": "tool", "tool_call_id": "x", "content": "5"},
            {"role": "tool", "tool_call_id": "y", "content": "9"},
            {"role": "assistant", "content": "5 and 9."}]
    out = to_builtin(msgs, [ADD])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant"]
    assert out[0]["content"].startswith("Be brief.\n\n" + TOOLS_PREAMBLE)
    assert out[2]["content"] == ('Adding.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": 5}}\n</tool_call>')
    assert out[3]["content"] == "<tool_response>\n5\n</tool_response>\n<tool_response>\n9\n</tool_response>"


# a template with its own tool syntax (not the built-in one): the tools in a header, calls as [CALL ...]
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}[CALL {{ c.function.name }} {{ c.function.arguments | tojson }}]"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# Qwen2.5's layout: an empty content is not rendered, the call's name sits inside its JSON
QWEN_LIKE_TEMPLATE = (                  # (HF renders with trim_blocks: newlines are written as '\n' expressions)
    "{%- if tools %}{{ '<|im_start|>system\\n<tools>' }}{% for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}"
    "{{ '\\n</tools><|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}{%- if m.role == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role }}{% if m.content %}{{ '\\n' + m.content }}{% endif %}"
    "{%- for c in m.tool_calls or [] %}{{ '\\n<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' }}"
    "{{ c.function.arguments | tojson }}{{ '}\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.fixture()
def tool_tokenizer(tokenizer):
    return with_template(tokenizer, TOOL_TEMPLATE)


def test_template_with_tool_support_renders_itself(tool_tokenizer):
    ex = example_of(openai_record())
    text = render_chat(tool_tokenizer, ex.messages, False, tools=ex.tools)
    assert text == ("<|im_start|>system\nTOOLS: get_weather add<|im_end|>\n"
                    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                    '<|im_start|>assistant\n[CALL get_weather {"city": "Paris"}]<|im_end|>\n'
                    "<|im_start|>tool\n18C sunny<|im_end|>\n"
                    "<|im_start|>assistant\nIt is 18C and sunny.<|im_end|>\n")


def trained_chars(tok, tokenizer):
    return tokenizer.decode([i for i, t in zip(tok.input_ids, tok.trained, strict=True) if t])


def untrained_chars(tok, tokenizer):
    return tokenizer.decode([i for i, t in zip(tok.input_ids, tok.trained, strict=True) if not t])


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("template,call_text", [(None, HERMES_CALL),
                                                (TOOL_TEMPLATE, '[CALL get_weather {"city": "Paris"}]'),
                                                (QWEN_LIKE_TEMPLATE, HERMES_CALL)],
                         ids=["builtin", "template", "qwen-like-template"])
def test_loss_mask_trains_calls_and_answers_never_results(tokenizer, template, call_text):
    tok_ = with_template(tokenizer, template) if template else tokenizer
    ex = example_of(openai_record())
    tok = tokenize_example(ex, tok_)
    expected = call_text + "<|im_end|>" + "It is 18C and sunny.<|im_end|>"
    assert trained_chars(tok, tok_) == expected
    # counted analytically: the trained tokens are exactly the tokens of the call turn and the answer turn
    n = len(tok_(call_text + "<|im_end|>", add_special_tokens=False)["input_ids"]) + \
        len(tok_("It is 18C and sunny.<|im_end|>", add_special_tokens=False)["input_ids"])
    assert tok.num_trained == n
    assert "18C sunny" in untrained_chars(tok, tok_) and "18C sunny" not in trained_chars(tok, tok_).replace(
        "18C and sunny", "")


def test_a_final_call_with_no_result_is_a_training_target(tokenizer):
    rec = openai_record()
    rec["messages"] = rec["messages"][:2]
    tok = tokenize_example(example_of(rec), tokenizer)
    assert trained_chars(tok, tokenizer) == \
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


# --- rejections: each reason with a record that triggers only it ---------------------------------------------------

def _bad_records():
    m = openai_record()["messages"]
    yield "invalid_tool_schema", openai_record(tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "strin"}}}}}])
    bad = copy.deepcopy(m)
    bad[1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris}"
    yield "tool_arguments_not_json", openai_record(messages=bad)
    bad = copy.deepcopy(m)
    bad[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": 7})
    yield "tool_arguments_schema", openai_record(messages=bad)
    bad = copy.deepcopy(m)
    bad[1]["tool_calls"][0]["function"]["name"] = "get_time"
    yield "unknown_tool", openai_record(messages=bad)
    yield "unanswered_call", openai_record(messages=m[:2] + [{"role": "assistant", "content": "Sunny."}])
    bad = copy.deepcopy(m)
    bad[1]["tool_calls"].append(call("add", {"a": 1, "b": 2}, "c1"))
    yield "duplicate_call_id", openai_record(messages=bad)
    yield "orphan_tool_result", openai_record(messages=[
        m[0], {"role": "tool", "tool_call_id": "c9", "content": "x"}, m[3]])
    bad = copy.deepcopy(m)
    bad[2]["tool_call_id"] = "c2"
    yield "orphan_tool_result", openai_record(messages=bad)


@pytest.mark.parametrize("check,record", list(_bad_records()), ids=[c for c, _ in _bad_records()])
def test_each_tool_check_rejects_with_its_reason(check, record, tmp_path):
    assert check in TOOL_CHECKS and check in CHECKS and check in TRAINING_CHECKS and CHECKS[check].fixed
    with pytest.raises(RecordError) as e:
        example_of(record)
    assert e.value.check == check
    # curation: that one issue, and the record goes to rejects.jsonl with that reason
    checked = check_record(RawRecord("f.jsonl", 1, record), CurationConfig())
    assert [i.check for i in checked.issues] == [check] and checked.clean is None
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(record) + "\n" + json.dumps(openai_record()) + "\n")
    report = clean_files([str(data)], tmp_path / "out", CurationConfig(min_examples=0, max_length=None))
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [[r["check"] for r in rej["reasons"]] for rej in rejects] == [[check]]
    assert report.checks[check]["found"] == 1
    # training: the same reason in its rejects
    loaded = load_examples(str(data), DataConfig(train=str(data)))
    assert [[r.check for r in rej.reasons] for rej in loaded.rejects] == [[check]] and len(loaded.examples) == 1


def test_valid_tool_record_is_clean_and_round_trips(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(openai_record()) + "\n" + json.dumps(sharegpt_record()) + "\n")
    clean_files([str(data)], tmp_path / "out", CurationConfig(min_examples=0, max_length=None, near_dup=False,
                                                             actions={"exact_duplicate": "off"}))
    rows = [json.loads(line) for line in (tmp_path / "out" / "clean.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert [example_of(r).messages for r in rows] == [example_of(openai_record()).messages,
                                                     example_of(sharegpt_record()).messages]


# --- parse_tool_calls -------------------------------------------------------------------------------------------

CALL_SETS = [
    [("get_weather", {"city": "Paris"})],
    [("add", {"a": 2, "b": 3}), ("add", {"a": 4.5, "b": -1})],                         # parallel calls
    [("get_weather", {"city": "Zürich 東京 🌧"})],                                      # unicode
    [("search", {"q": "x", "filters": {"tags": ["a", {"b": [1, None, True]}], "n": 0}})],  # nested
    [("noargs", {})],
]


@pytest.mark.parametrize("content", ["", "Let me check.", "Two lines\nof text."])
@pytest.mark.parametrize("calls", CALL_SETS)
def test_parse_tool_calls_round_trips_the_renderer(calls, content):
    from tuneforge.data.tools import assistant_text

    text = assistant_text(content, [call(n, a, as_string=False) for n, a in calls])
    parsed_content, parsed = parse_tool_calls(text)
    assert parsed_content == content
    assert parsed == [{"name": n, "arguments": a} for n, a in calls]


@pytest.mark.parametrize("junk", [
    "plain answer", "<tool_call>\nnot json\n</tool_call>", "<tool_call>\n{\"name\": \"f\"",
    "<tool_call>\n[1, 2]\n</tool_call>", "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": \"nope\"}\n</tool_call>", "[" * 100000,
    "<tool_call>" + "[" * 100000 + "</tool_call>"])
def test_parse_tool_calls_returns_junk_as_content(junk):
    assert parse_tool_calls(junk) == (junk.strip(), [])


def test_parse_keeps_a_good_call_beside_a_broken_one():
    good = render_call(call("add", {"a": 1, "b": 2}, as_string=False))
    content, calls = parse_tool_calls("<tool_call>\n{oops}\n</tool_call>\n" + good)
    assert calls == [{"name": "add", "arguments": {"a": 1, "b": 2}}]
    assert content == "<tool_call>\n{oops}\n</tool_call>"


# --- preview / stats --------------------------------------------------------------------------------------------

def test_preview_shows_tools_calls_and_results_with_trained_marks(tmp_path, tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(openai_record()) + "\n")
    out = preview(str(data), tokenizer, DataConfig(train=str(data)), n=1, color=False)
    assert "[tools: get_weather, add; calls: get_weather x1; tool results: 1 (never trained)]" in out
    assert '[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>]]' in out
    assert "<tool_response>\n18C sunny\n</tool_response><|im_end|>" in out
    assert "[[It is 18C and sunny.<|im_end|>]]" in out
    assert "[[<tool_response>" not in out and "18C sunny\n</tool_response><|im_end|>]]" not in out


def test_stats_count_calls_per_tool(tmp_path):
    rec2 = openai_record()
    rec2["messages"] = [{"role": "user", "content": "2+3 and 4+5?"},
                        {"role": "assistant", "content": "", "tool_calls": [call("add", {"a": 2, "b": 3}, "x"),
                                                                             call("add", {"a": 4, "b": 5}, "y")]},
                        {"role": "tool", "tool_call_id": "x", "content": "5"},
                        {"role": "tool", "tool_call_id": "y", "content": "9"},
                        {"role": "assistant", "content": "5 and 9."}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (openai_record(), rec2, sharegpt_record())) + "\n")
    stats = compute_stats(data, model=None)
    assert stats.valid == 3 and stats.tool_calls == {"add": 2, "get_weather": 2}
    assert "tool calls: add 2, get_weather 2" in stats.summary()


def test_cli_bad_tools_file_exits_2(tmp_path, capsys):
    from tuneforge.data.curation.commands import main as data_main

    bad = tmp_path / "tools.json"
    bad.write_text("{not json")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(openai_record()) + "\n")
    assert data_main(["check", str(data), "--tools", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tools: ") and "is not JSON" in err and "\n" not in err


def test_train_on_tool_data_with_a_tools_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`tuneforge train` end to end: data.tools from the config, a bad record in the run's rejects.jsonl."""
    from tuneforge.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))     # tokenized here, never from an older run
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    good = openai_record()
    del good["tools"]
    bad = copy.deepcopy(good)
    bad["messages"][1]["tool_calls"][0]["function"]["name"] = "get_time"
    rows = [good] * 6 + [sharegpt_record()] * 5 + [bad]
    (tmp_path / "tool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["train", "--data", "tool.jsonl", "--set", f"model={tiny_model_dir}", "--set", "max_steps=1",
               "--set", "progress=false", "--set", "lora.r=2", "--set", "data.tools=tools.json"])
    assert rc == 0, capsys.readouterr().err
    [reject] = [json.loads(x) for x in (tmp_path / "runs" / "tool" / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 12 and [r["check"] for r in reject["reasons"]] == ["unknown_tool"]
    record = json.loads((tmp_path / "runs" / "tool" / "run.json").read_text())
    assert record["examples"]["train"] + record["examples"]["validation"] == 11
    # a tools file that is not there: one line naming the key, exit 2
    rc = main(["train", "--data", "tool.jsonl", "--set", f"model={tiny_model_dir}", "--set", "data.tools=nope.json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "'data.tools': file 'nope.json' not found" in err[-1]
