"""Tool call formats (data/tool_formats.py): each format's parser on content before calls, parallel calls, arguments
as an object or a JSON string, and malformed blocks (content, never an error); calls rendered by the real chat
templates (tests/fixtures/chat_templates/: Mistral Nemo, Llama 3.2, Qwen 2.5 / 3) parsed back to what was rendered;
the stream, one character at a time and in two pieces at every cut, equal to the whole answer and never showing a
marker's start as content; each forced-call grammar accepting a valid call and refusing invalid ones (llguidance
over SmolLM2's vocabulary, a special marker token matched as that token); detection from real templates and from
snippets (Granite, Llama 3.1's <|python_tag|>, Mistral v0.3: written here, no copy of those templates is stored);
the config keys; the eval's call scores and decoding in a non-Hermes format."""

from __future__ import annotations

import copy
import json
import typing
from pathlib import Path

import pytest

from tuneforge.data.tool_formats import (
    DETECTION_ORDER,
    FORMATS,
    HERMES,
    TOOL_CALL_FORMATS,
    detect,
    resolve,
    special_marker_ids,
)
from tuneforge.serving.tool_calls import OutputSplitter, split_answer, tool_call_grammar

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
OSLO = {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}
SUM = {"name": "add", "arguments": {"a": 1, "b": 2}}


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")


def dumps(value) -> str:
    return json.dumps(value)


# (format, text, content, calls): every format's answers, read whole
CASES = [
    ("hermes", f"Let me look.\n<tool_call>\n{dumps(OSLO)}\n</tool_call>", "Let me look.", [OSLO]),
    ("hermes", f"<tool_call>\n{dumps(SUM)}\n</tool_call>\n<tool_call>\n"
               f"{dumps({**OSLO, 'arguments': dumps(OSLO['arguments'])})}\n</tool_call>", "", [SUM, OSLO]),
    ("hermes", "a <tool_ and <tool_call>not json</tool_call>", "a <tool_ and <tool_call>not json</tool_call>", []),
    # mistral v0.3 / Nemo: a JSON list (with Nemo's ids), arguments as an object or a JSON string
    ("mistral", f"Sure. [TOOL_CALLS][{dumps({**OSLO, 'id': 'a1b2c3d4e'})}, "
                f"{dumps({**SUM, 'arguments': dumps(SUM['arguments'])})}]", "Sure.", [OSLO, SUM]),
    ("mistral", f"[TOOL_CALLS] [{dumps(SUM)}]", "", [SUM]),                         # v0.3's space
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]" + dumps(OSLO["arguments"]) + "[TOOL_CALLS]add[CALL_ID]x12345678[ARGS]"
                + dumps(SUM["arguments"]), "", [OSLO, SUM]),                          # newer templates, per call
    ("mistral", "[TOOL_CALLS] not json, [TOOL_CALLS]", "[TOOL_CALLS] not json, [TOOL_CALLS]", []),
    ("mistral", f"[TOOL_CALLS][{dumps({'name': 'add', 'arguments': [1, 2]})}]",
     f"[TOOL_CALLS][{dumps({'name': 'add', 'arguments': [1, 2]})}]", []),           # arguments not an object
    ("mistral", f"[TOOL_CALLS][{dumps(SUM)}] and then some", "and then some", [SUM]),
    # llama3_json: the answer is the calls ("parameters"; "arguments" read too), ";" or newlines between
    ("llama3_json", dumps({"name": "add", "parameters": SUM["arguments"]}), "", [SUM]),
    ("llama3_json", "  " + dumps({"name": "get_weather", "parameters": OSLO["arguments"]}) + "; "
                    + dumps({"name": "add", "parameters": dumps(SUM["arguments"])}), "", [OSLO, SUM]),
    ("llama3_json", "<|python_tag|>" + dumps({"name": "add", "parameters": SUM["arguments"]}) + "\n"
                    + dumps({"name": "get_weather", "arguments": OSLO["arguments"]}), "", [SUM, OSLO]),
    ("llama3_json", "Checking. <|python_tag|>" + dumps({"name": "add", "parameters": SUM["arguments"]}),
     "Checking.", [SUM]),
    ("llama3_json", "The JSON is " + dumps({"name": "add", "parameters": {}}),
     "The JSON is " + dumps({"name": "add", "parameters": {}}), []),                # not at the start: text
    ("llama3_json", '{"name": "add", "parameters": {"a": 1', '{"name": "add", "parameters": {"a": 1', []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),                          # JSON, not a call
    ("granite", f"<|tool_call|>[{dumps(SUM)}, {dumps(OSLO)}]", "", [SUM, OSLO]),
    ("granite", "<|tool_call|>oops", "<|tool_call|>oops", []),
]


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_each_format_parses_its_answers(name, text, content, calls):
    assert FORMATS[name].parse(text) == (content, calls)
    assert split_answer(text, True, FORMATS[name]) == (None, content, calls)


@pytest.mark.parametrize("name,text", [(c[0], c[1]) for c in CASES] + [
    ("mistral", "<think>plan</think>\nSure. [TOOL_CALLS][" + dumps(SUM) + "]"),
    ("llama3_json", "<think>plan</think>\n" + dumps({"name": "add", "parameters": SUM["arguments"]})),
    ("llama3_json", "\n\n  plain text answer, no call"),
    ("mistral", "a [TOOL_ that is not a call"),
])
def test_the_stream_is_the_whole_answer_at_every_chunking(name, text):
    fmt = FORMATS[name]
    whole = split_answer(text, True, fmt)
    for cut in range(1, len(text)):
        for step in (cut, 1):                   # two pieces at every cut; and one character at a time
            splitter = OutputSplitter(True, fmt)
            deltas = [d for i in range(0, len(text), step) for d in splitter.feed(text[i:i + step])]
            sent = "".join(d.get("content", "") for d in deltas)
            rest, calls = splitter.finish()
            reasoning = "".join(d.get("reasoning_content", "") for d in deltas + rest) or None
            content = "".join(d.get("content", "") for d in deltas + rest)
            assert (reasoning, content.strip() if calls else content, calls) == whole, (cut, step)
            if calls:            # what was sent before the end holds no marker, whole or begun
                assert not any(m[:2] in sent for m in fmt.markers), (cut, step, sent)
                assert not (fmt.leading_json and "{" in sent), (cut, step, sent)
            if step == 1:
                break


def test_a_marker_s_start_is_held_until_it_is_known():
    fmt = FORMATS["mistral"]
    splitter = OutputSplitter(True, fmt)
    assert splitter.feed("Sure. [TOOL") == [{"content": "Sure. "}]
    assert splitter.feed("S] x") == [{"content": "[TOOLS] x"}]      # not the marker after all: sent
    llama = OutputSplitter(True, FORMATS["llama3_json"])
    assert llama.feed("  ") == []                                   # blank: a call may still open the answer
    assert llama.feed("{") == []                                    # blanks before a call are not content
    assert llama.finish() == ([{"content": "{"}], [])


# --- calls rendered by the real templates are read back -------------------------------------------------------

def rendered_answer(tokenizer, template: str, calls: list[dict], eot: str) -> str:
    """The assistant turn ``template`` renders for ``calls`` (OpenAI-shaped), without its end-of-turn marker."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    ask = [{"role": "user", "content": "Weather in Oslo, and 1 + 2?"}]
    prompt = tok.apply_chat_template(ask, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(ask + [{"role": "assistant", "content": "", "tool_calls": calls}], tools=TOOLS,
                                   tokenize=False)
    assert full.startswith(prompt.rstrip()), (prompt, full)
    answer = full[len(prompt.rstrip()):]
    return answer[:answer.rindex(eot)] if eot else answer


def openai_call(call: dict, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


@pytest.mark.parametrize("name,calls,eot", [
    ("mistral", [OSLO, SUM], "</s>"),           # Mistral Nemo (its EOS: the template writes eos_token)
    ("llama3", [SUM], "<|eot_id|>"),            # Llama 3.2 (one call a turn: the template refuses more)
    ("qwen2_5", [OSLO, SUM], "<|im_end|>"),
    ("qwen3", [OSLO, SUM], "<|im_end|>"),
])
def test_calls_the_real_templates_render_parse_back(tokenizer, name, calls, eot):
    template = fixture(name)
    fmt = detect(template)
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "</s>" if name == "mistral" else tok.eos_token
    text = rendered_answer(tok, template, [openai_call(c, f"abc12345{i}") for i, c in enumerate(calls)], eot)
    assert fmt.parse(text)[1] == calls, text
    assert split_answer(text, True, fmt)[2] == calls


# --- forced-call grammars -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def matcher_for(tokenizer):
    """``matcher_for(grammar, tok=None)``: an llguidance matcher of ``grammar`` over SmolLM2's vocabulary (or
    ``tok``'s)."""
    import llguidance.hf
    from llguidance import LLMatcher

    from tuneforge.serving.guided import lark_grammar

    cache = {}

    def make(grammar: str, tok=None):
        tok = tok or tokenizer
        if id(tok) not in cache:
            cache[id(tok)] = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
        matcher = LLMatcher(cache[id(tok)], lark_grammar(grammar), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher
    return make


def accepts(matcher, ids: list[int]) -> bool:
    """Whether the grammar takes ``ids`` whole and may end there."""
    if matcher.validate_tokens(ids) != len(ids):
        return False
    assert matcher.consume_tokens(ids)
    return bool(matcher.is_accepting())


def forced_text(name: str, calls: list[dict]) -> str:
    """``calls`` written as a forced call in format ``name`` (compact JSON as the grammar writes it)."""
    if name == "hermes":
        return "\n".join(f"<tool_call>\n{dumps(c)}\n</tool_call>" for c in calls)
    if name == "llama3_json":
        return "; ".join(dumps({"name": c["name"], "parameters": c["arguments"]}) for c in calls)
    marker = "[TOOL_CALLS]" if name == "mistral" else "<|tool_call|>"
    return marker + "[" + ", ".join(dumps(c) for c in calls) + "]"


@pytest.mark.parametrize("name", TOOL_CALL_FORMATS)
def test_each_forced_grammar_takes_a_valid_call_and_refuses_invalid_ones(name, tokenizer, matcher_for):
    fmt = FORMATS[name]

    def ok(text: str, forced: str = "*", parallel: bool = False) -> bool:
        grammar = tool_call_grammar(TOOLS, forced, parallel, fmt)
        return accepts(matcher_for(grammar), tokenizer(text, add_special_tokens=False)["input_ids"])

    assert ok(forced_text(name, [OSLO]))
    assert ok(forced_text(name, [SUM]), forced="add")
    assert ok(forced_text(name, [SUM, OSLO]), parallel=True)
    assert fmt.parse(forced_text(name, [SUM, OSLO]))[1] == [SUM, OSLO]      # what it forces, the parser reads
    assert not ok(forced_text(name, [SUM, OSLO]))                           # two calls, parallel off
    assert not ok(forced_text(name, [OSLO]), forced="add")                  # not the named tool
    assert not ok(forced_text(name, [{"name": "add", "arguments": {"a": 1, "b": 200}}]))   # over the maximum
    assert not ok(forced_text(name, [{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}]))
    assert not ok(forced_text(name, [{"name": "delete_all", "arguments": {}}]))
    assert not ok("Sure! " + forced_text(name, [SUM]))                      # nothing before the call


def test_a_special_marker_token_is_forced_as_that_token(tokenizer, matcher_for):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    fmt = FORMATS["mistral"]
    special = special_marker_ids(tok, fmt)
    marker = tok.convert_tokens_to_ids("[TOOL_CALLS]")
    assert special == {"[TOOL_CALLS]": marker}
    grammar = tool_call_grammar(TOOLS, "*", False, fmt, special)
    body = tok("[" + dumps(SUM) + "]", add_special_tokens=False)["input_ids"]
    assert accepts(matcher_for(grammar, tok), [marker] + body)
    spelled = tok.encode("[TOOL_CALLS]", add_special_tokens=False, split_special_tokens=True)
    assert marker not in spelled
    assert not accepts(matcher_for(grammar, tok), spelled + body)           # the marker spelled out as text
    assert special_marker_ids(tokenizer, fmt) == {}                          # SmolLM2's: no such token


def test_the_engine_keeps_a_special_marker_only_where_asked(tokenizer):
    from _serve_helpers import tiny_base
    from tuneforge.serving.adapters import AdapterRegistry, AdapterSet
    from tuneforge.serving.engine import Engine

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    engine = Engine(AdapterRegistry(AdapterSet(tiny_base())), tok)
    marker = tok.convert_tokens_to_ids("[TOOL_CALLS]")
    ids = tok("Sure.", add_special_tokens=False)["input_ids"] + [marker] + tok(
        "[" + dumps(SUM) + "]", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    kept = engine._text(ids, frozenset({marker}))
    assert kept == "Sure.[TOOL_CALLS][" + dumps(SUM) + "]"                  # EOS still dropped
    assert engine._text(ids, frozenset()) == "Sure.[" + dumps(SUM) + "]"
    assert FORMATS["mistral"].parse(kept) == ("Sure.", [SUM])


# --- detection and the config keys ----------------------------------------------------------------------------

# snippets written for these tests (no copy of these templates is stored): the lines that carry each marker
GRANITE_SNIPPET = ("{%- if tools %}{{- '<|start_of_role|>available_tools<|end_of_role|>' + tools | tojson }}"
                   "{%- endif %}{%- for message in messages %}{%- if message.tool_calls %}"
                   "{{- '<|tool_call|>' + message.tool_calls | tojson }}{%- endif %}{%- endfor %}")
LLAMA31_SNIPPET = ("{%- if tools is not none %}{{- 'Environment: ipython' }}{%- endif %}"
                   "{%- for message in messages %}{%- if message.tool_calls %}"
                   "{{- '<|python_tag|>' + message.tool_calls[0].function.name }}{%- endif %}{%- endfor %}")
MISTRAL03_SNIPPET = ("{%- if tools is not none %}{{- '[AVAILABLE_TOOLS] ' + tools | tojson }}{%- endif %}"
                     "{%- for message in messages %}{%- if message.tool_calls %}{{- '[TOOL_CALLS] [' }}"
                     "{%- endif %}{%- endfor %}")
UNKNOWN_SNIPPET = ("{%- if tools %}{{ tools | tojson }}{% endif %}{%- for m in messages %}"
                   "{%- if m.tool_calls %}>>>{{ m.tool_calls[0].function.name }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("source,expected", [
    (fixture("qwen2_5"), "hermes"), (fixture("qwen3"), "hermes"), (fixture("mistral"), "mistral"),
    (fixture("llama3"), "llama3_json"),
    (fixture("gemma3"), "hermes"), (fixture("phi3"), "hermes"),          # no tools: the built-in rendering
    (GRANITE_SNIPPET, "granite"), (LLAMA31_SNIPPET, "llama3_json"), (MISTRAL03_SNIPPET, "mistral"),
    (UNKNOWN_SNIPPET, "hermes"), (None, "hermes"), ("", "hermes"),
    ({"default": fixture("phi3"), "tool_use": fixture("mistral")}, "mistral"),   # named templates: all read
])
def test_detection_from_the_template_source(source, expected):
    assert detect(source).name == expected


def test_detection_of_the_test_tokenizer_and_the_builtin_templates(tokenizer):
    from tuneforge.data.templates import BUILTINS, builtin_text

    assert detect(tokenizer.chat_template) is HERMES                        # SmolLM2's: no tools
    for name in BUILTINS:
        assert detect(builtin_text(name)) is HERMES, name


def test_resolve_names_the_key_for_a_wrong_format():
    assert resolve("auto", fixture("mistral")).name == "mistral"
    assert resolve("llama3_json", fixture("mistral")).name == "llama3_json"  # an explicit choice wins
    with pytest.raises(ValueError, match=r"^data.tool_call_format: mistral needs a chat template that renders tools"):
        resolve("mistral", fixture("phi3"))
    with pytest.raises(ValueError, match=r"^tool_call_format: unknown tool call format 'json'; write auto, hermes"):
        resolve("json", None, key="tool_call_format")


def test_the_keys_list_every_format():
    from tuneforge.data.settings import DataConfig
    from tuneforge.serving.server import ServeConfig

    assert tuple(FORMATS) == TOOL_CALL_FORMATS and set(DETECTION_ORDER) == set(FORMATS)
    for model in (DataConfig, ServeConfig):
        assert typing.get_args(model.model_fields["tool_call_format"].annotation) == ("auto", *TOOL_CALL_FORMATS)


# --- tuneforge eval reads a non-Hermes format -------------------------------------------------------------------

def test_eval_scores_calls_in_the_run_s_format(tokenizer):
    from tuneforge.data.formats import Example
    from tuneforge.evaluation import generation, tool_eval

    fmt = FORMATS["mistral"]
    ask = {"role": "user", "content": "1 + 2?"}
    example = Example(messages=[ask, {"role": "assistant", "content": "", "tool_calls": [
        {"id": None, "type": "function", "function": SUM}]}], tools=TOOLS)
    texts = ["Sure. [TOOL_CALLS][" + dumps(SUM) + "]"]
    [score] = tool_eval.score_answers([example], texts, fmt)
    assert score.tool_name == 1.0 and score.args_exact == 1.0
    [hermes_reading] = tool_eval.score_answers([example], texts)             # read as Hermes: no call
    assert hermes_reading.tool_name == 0.0
    assert tool_eval.content_texts([example], texts, fmt) == ["Sure."]

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    ids = tok(texts[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert generation._decoder(tok, fmt)(ids, True) == texts[0]
    assert generation._decoder(tok)(ids, True) == texts[0].replace("[TOOL_CALLS]", "")   # Hermes drops it


def test_training_refuses_a_format_its_template_does_not_render(tmp_path, tiny_model_dir):
    import tuneforge
    from conftest import write_jsonl
    from tuneforge.errors import ConfigError

    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                                 {"role": "assistant", "content": "Hello"}]}] * 4)
    (tmp_path / "config.yaml").write_text(json.dumps({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False,
        "data": {"train": str(train), "tool_call_format": "mistral"}}))
    with pytest.raises(ConfigError, match=r"^data.tool_call_format: mistral needs a chat template that renders"):
        tuneforge.train(tuneforge.load_config(str(tmp_path / "config.yaml")))
