"""The shipped tool-use example (recipes/tools.yaml, recipes/data/tools_*, examples/tool_agent.py): the generator
reproduces the shipped files, every record passes the data checks with tools.json, the splits have the stated
sizes, shares and held-out phrasings, the recipe loads, and the agent script runs its loop (forced call, local
tool, result sent back, answer) with the official ``openai`` client against an in-process server."""

from __future__ import annotations

import importlib.util
import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from _serve_helpers import tiny_base
from tuneforge.config.run import load_config
from tuneforge.data import synthetic_tools as gen
from tuneforge.data.dataset import data_tools, load_examples

RECIPES = Path(str(resources.files("tuneforge.recipes")))
DATA = RECIPES / "data"
SPLITS = ("train", "validation", "test")
FILES = [f"tools_{s}.jsonl" for s in SPLITS] + ["tools.json"]
# (records, no-tool records, records with two calls in one turn), as docs/guides/tools.md states them
COUNTS = {"train": (600, 90, 60), "validation": (100, 15, 10), "test": (150, 22, 15)}
AGENT = Path(__file__).resolve().parents[1] / "examples" / "tool_agent.py"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def _calls(record: dict) -> list[list[dict]]:
    """The tool calls of each assistant turn that makes some."""
    return [m["tool_calls"] for m in record["messages"] if m["role"] == "assistant" and m.get("tool_calls")]


def test_the_generator_reproduces_the_shipped_files(tmp_path):
    gen.write_splits(tmp_path)
    again = tmp_path / "again"
    gen.write_splits(again)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (again / name).read_bytes(), name      # deterministic
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"{name} differs from the generator's; run python -m tuneforge.data.synthetic_tools "
            "src/tuneforge/recipes/data")
    assert json.loads((DATA / "tools.json").read_text()) == gen.TOOLS


@pytest.mark.parametrize("name", [f"tools_{s}.jsonl" for s in SPLITS] + ["tools_handwritten.jsonl"])
def test_every_shipped_record_passes_the_data_checks(name):
    config = load_config(RECIPES / "tools.yaml")
    loaded = load_examples(str(DATA / name), config.data, "sft")
    assert [r.reason for r in loaded.rejects] == []
    rows = _rows(name)
    assert len(loaded.examples) == len(rows)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in gen.TOOLS}
    for row in rows:       # and the arguments, read back from their JSON strings, validate on their own
        for turn in _calls(row):
            for call in turn:
                jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_the_test_records_end_at_the_decision_and_the_others_are_whole():
    for name in ("tools_test.jsonl", "tools_handwritten.jsonl"):
        for row in _rows(name):
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["system", "user", "assistant"], (name, roles)
    for split in ("train", "validation"):
        for row in _rows(f"tools_{split}.jsonl"):
            last = row["messages"][-1]
            assert last["role"] == "assistant" and last["content"] and not last.get("tool_calls")
            for turn in _calls(row):         # each call answered by the fake tool's result for its arguments
                results = {m["tool_call_id"]: m["content"] for m in row["messages"] if m["role"] == "tool"}
                for call in turn:
                    expected = gen.run_tool(call["function"]["name"], json.loads(call["function"]["arguments"]))
                    assert json.loads(results[call["id"]]) == expected


@pytest.mark.parametrize("split", SPLITS)
def test_split_sizes_and_shares(split):
    rows = _rows(f"tools_{split}.jsonl")
    no_tool = sum(not _calls(r) for r in rows)
    parallel = sum(any(len(turn) == 2 for turn in _calls(r)) for r in rows)
    assert (len(rows), no_tool, parallel) == COUNTS[split]
    names = {c["function"]["name"] for r in rows for turn in _calls(r) for c in turn}
    assert names == {t["function"]["name"] for t in gen.TOOLS}


def _held_out_patterns() -> list[re.Pattern]:
    lists = [gen.WEATHER, gen.WEATHER_UNIT, gen.CONVERT, gen.CALENDAR, gen.SEARCH, *gen.OP_WORDS.values(),
             *gen.PARALLEL.values(), *([q for q, _ in pairs] for pairs in gen.NO_TOOL)]
    return [re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(templates[-1]))) for templates in lists]


def test_held_out_phrasings_are_in_test_only_and_no_request_is_shared():
    requests = {s: [r["messages"][1]["content"] for r in _rows(f"tools_{s}.jsonl")] for s in SPLITS}
    patterns = _held_out_patterns()
    for split in ("train", "validation"):
        leaked = [t for t in requests[split] if any(p.fullmatch(t) for p in patterns)]
        assert leaked == [], split
    in_test = sum(any(p.fullmatch(t) for p in patterns) for t in requests["test"])
    assert in_test >= 40            # each list's held-out phrasing is drawn for half its test requests (65 of 150)
    seen = [t.lower() for s in SPLITS for t in requests[s]]
    assert len(seen) == len(set(seen))


# What each slot can hold, in a template turned into a pattern (loose enough for any hand-written filling)
SLOT_PATTERNS = {"city": r"[A-Z][\w ]*", "city2": r"[A-Z][\w ]*", "unit": "[a-z]+", "from_unit": "[a-z]+",
                 "to_unit": "[a-z]+", "value": r"\d+(?:\.\d+)?", "a": r"\d+", "b": r"\d+", "c": r"\d+", "d": r"\d+",
                 "n": r"\d+", "date": r"[\w ,-]+", "time": r"[\w: ]+", "title": ".+", "query": ".+",
                 "word": r"[\w ]+", "adjective": r"\w+", "language": r"[A-Z]\w+"}


def _template_pattern(template: str) -> re.Pattern:
    """``template`` as a pattern: its literal text case-insensitive, each slot as :data:`SLOT_PATTERNS` says."""
    parts = re.split(r"\{(\w+)\}", template)     # literal, slot, literal, ...
    return re.compile("".join(f"(?:{SLOT_PATTERNS[part]})" if i % 2 else f"(?i:{re.escape(part)})"
                              for i, part in enumerate(parts)))


def test_no_training_phrasing_matches_a_hand_written_request():
    """The hand-written requests measure generalisation too: no trained template may produce one of them."""
    lists = [gen.WEATHER, gen.WEATHER_UNIT, gen.CONVERT, gen.CALENDAR, gen.SEARCH, *gen.OP_WORDS.values(),
             *gen.PARALLEL.values(), *([q for q, _ in pairs] for pairs in gen.NO_TOOL)]
    written = [r["messages"][1]["content"] for r in _rows("tools_handwritten.jsonl")]
    trained = [t for templates in lists for t in templates[:-1]]
    assert [(t, w) for t in trained for w in written if _template_pattern(t).fullmatch(w)] == []
    assert _template_pattern("Set up '{title}' on {date} at {time}").fullmatch(written[11])   # the check can fail


def test_the_recipe_loads_with_its_tools_and_test_split():
    config = load_config(RECIPES / "tools.yaml")
    assert Path(config.data.tools) == (DATA / "tools.json").resolve()
    assert Path(config.eval.data) == (DATA / "tools_test.jsonl").resolve()
    assert [t["function"]["name"] for t in data_tools(config.data)] == [t["function"]["name"] for t in gen.TOOLS]
    assert config.model == "smollm2-135m-instruct" and config.method == "lora"
    assert "fewshot" in config.eval.columns and "tuned" in config.eval.columns
    assert (Path(__file__).resolve().parents[1] / "examples" / "tools.yaml").resolve() == \
        (RECIPES / "tools.yaml").resolve()


def test_the_run_tool_fakes_compute_what_they_can():
    assert gen.run_tool("calculator", {"a": 12, "op": "multiply", "b": 7}) == {"result": 84}
    assert gen.run_tool("calculator", {"a": 7, "op": "divide", "b": 0}) == {"error": "division by zero"}
    assert gen.run_tool("convert_units", {"value": 10, "from_unit": "miles", "to_unit": "kilometers"}) == {
        "value": 16.09, "unit": "kilometers"}
    weather = gen.run_tool("get_weather", {"city": "Oslo", "unit": "fahrenheit"})
    celsius = gen.run_tool("get_weather", {"city": "Oslo"})["temperature"]
    assert weather["temperature"] == round(celsius * 9 / 5 + 32)


@pytest.fixture(scope="module")
def agent():
    spec = importlib.util.spec_from_file_location("tool_agent", AGENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server_url(tiny_model_dir, tokenizer):
    from tuneforge.serving.server import ServeConfig, Server, ServerThread

    server = Server(ServeConfig(base=str(tiny_model_dir), base_name="tiny"), model=tiny_base(), tokenizer=tokenizer)
    with ServerThread(server.app) as thread:
        yield thread.url + "/v1"


# The example's get_weather with its arguments bounded (enums), so that the random model's forced call ends within
# max_tokens (a free string or number can run on); run_tool executes it as the example's get_weather.
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city"], "additionalProperties": False}}}


def test_the_agent_script_runs_its_loop_against_a_server(agent, server_url, capsys, tmp_path):
    """Forced call (tool_choice required), the local tool's result sent back, then a second request's answer."""
    import openai

    client = openai.OpenAI(base_url=server_url, api_key="none", max_retries=0, timeout=120)
    lines: list[str] = []
    messages = agent.run_agent(client, "tiny", "What's the weather in Oslo?", tool_choice="required", max_rounds=2,
                               max_tokens=80, tools=[WEATHER], out=lines.append)
    assert [m["role"] for m in messages[:3]] == ["system", "user", "assistant"]
    calls = messages[2]["tool_calls"]
    assert calls
    schemas = {"get_weather": WEATHER["function"]["parameters"]}
    results = messages[3:3 + len(calls)]
    for call, result in zip(calls, results, strict=True):
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, schemas[call["function"]["name"]])
        assert result == {"role": "tool", "tool_call_id": call["id"],
                          "content": json.dumps(gen.run_tool(call["function"]["name"], arguments))}
    assert messages[3 + len(calls)]["role"] == "assistant"        # the second request answered after the results
    assert lines[0] == "user: What's the weather in Oslo?" and lines[-1].startswith("answer: ")
    assert f"result: {results[0]['content']}" in lines

    # the command line: the same loop, rc 0; no server: one line, rc 2
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    assert agent.main(["--base-url", server_url, "--model", "tiny", "--tool-choice", "required", "--max-rounds", "1",
                       "--max-tokens", "80", "--request", "Weather in Lima?", "--tools", str(tmp_path / "tools.json")
                       ]) == 0
    out = capsys.readouterr().out
    assert "call:   " in out and "result: " in out
    assert agent.main(["--base-url", "http://127.0.0.1:9/v1", "--max-rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no server at http://127.0.0.1:9/v1" in err
