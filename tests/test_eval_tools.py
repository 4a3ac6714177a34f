"""`tuneforge eval` on tool records: every column's prompt renders the record's tools and stops before the
reference call, the answers' calls are scored per column into report.json's ``tool_calls`` block (equal to
``summarise`` computed by hand), the HTML shows the table, and a set without tools has no such block.

The tiny random model's answers are junk, so the plumbing is tested with a generator that returns chosen texts
(one real-generation run checks that the block is there with the real generator)."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from test_data_tools import TOOLS, call
from tuneforge.data.rendering import render_chat
from tuneforge.data.tools import render_call, tools_block
from tuneforge.evaluation import generation
from tuneforge.evaluation.tool_calls import (
    BAD_ARGUMENTS,
    NO_CALL,
    UNWANTED_CALL,
    WRONG_TOOL,
    Call,
    score_calls,
    summarise,
    tool_validators,
)


def calling(name, args):
    return {"role": "assistant", "content": "", "tool_calls": [call(name, args, f"c-{name}")]}


def user(text):
    return {"role": "user", "content": text}


# the test records: three need a call; one answers in text after a tool result
RECORDS = [
    {"tools": TOOLS, "messages": [user("Weather in Paris?"), calling("get_weather", {"city": "Paris"})]},
    {"tools": TOOLS, "messages": [user("Weather in Oslo?"), calling("get_weather", {"city": "Oslo"}),
                                  {"role": "tool", "tool_call_id": "c-get_weather", "content": "2C snow"},
                                  {"role": "assistant", "content": "It is 2C and snowing."}]},
    {"tools": TOOLS, "messages": [user("What is 2 plus 3?"), calling("add", {"a": 2, "b": 3})]},
    {"tools": TOOLS, "messages": [user("Weather in Rome?"), calling("get_weather", {"city": "Rome"})]},
]
REFERENCE_CALLS = [[Call("get_weather", {"city": "Paris"})], [], [Call("add", {"a": 2, "b": 3})],
                   [Call("get_weather", {"city": "Rome"})]]
TRAIN = [{"tools": TOOLS, "messages": [user(f"Weather in town {i}?"), calling("get_weather", {"city": f"T{i}"}),
                                       {"role": "tool", "tool_call_id": "c-get_weather", "content": "mild"},
                                       {"role": "assistant", "content": "Mild."}]} for i in range(4)]


def hermes(name, args):
    return render_call({"function": {"name": name, "arguments": args}})


# chosen answers per column, and the calls they hold (written out, not parsed)
ANSWERS = {
    "base": ["Sure, let me see.", "It is 2C and snowing.", hermes("add", {"a": 2, "b": 4}),
             hermes("add", {"a": 1, "b": 1})],
    "tuned": [hermes("get_weather", {"city": "Paris"}), "Checking. " + hermes("get_weather", {"city": "Oslo"}),
              hermes("add", {"a": 2, "b": 3}), hermes("get_weather", {"city": 5})],
}
CALLS = {
    "base": [[], [], [Call("add", {"a": 2, "b": 4})], [Call("add", {"a": 1, "b": 1})]],
    "tuned": [[Call("get_weather", {"city": "Paris"})], [Call("get_weather", {"city": "Oslo"})],
              [Call("add", {"a": 2, "b": 3})], [Call("get_weather", {"city": 5})]],
}
CONTENT = {"base": ["Sure, let me see.", "It is 2C and snowing.", "", ""], "tuned": ["", "Checking.", "", ""]}


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory, tiny_model_dir):
    import tuneforge

    folder = tmp_path_factory.mktemp("eval-tools")
    train = write_jsonl(folder / "train.jsonl", TRAIN)
    write_jsonl(folder / "test.jsonl", RECORDS)
    write_jsonl(folder / "plain.jsonl", [{"messages": [user("Hi?"), {"role": "assistant", "content": "Hello."}]},
                                         {"messages": [user("Bye?"), {"role": "assistant", "content": "Bye."}]}])
    (folder / "config.yaml").write_text(json.dumps({
        "model": str(tiny_model_dir), "method": "lora", "output_dir": str(folder / "run"), "max_steps": 1,
        "batch_size": 2, "progress": False, "data": {"train": str(train), "max_length": 512},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}))
    return tuneforge.train(tuneforge.load_config(str(folder / "config.yaml"))).run_dir, folder


class Chosen:
    """A stand-in for ``generation.generate``: answers each column with :data:`ANSWERS` (columns in call order)
    and keeps every prompt as the chat template renders it with the tools it was given."""

    def __init__(self, columns, answers=ANSWERS):
        self.columns, self.answers, self.prompts = list(columns), answers, {}

    def __call__(self, model, tokenizer, conversations, method=None, max_new_tokens=32, batch_size=16,
                 progress=None, tools=None, **_):
        column = self.columns[len(self.prompts)]
        tools = tools or [None] * len(conversations)
        self.prompts[column] = [render_chat(tokenizer, c, True, tools=t)
                                for c, t in zip(conversations, tools, strict=True)]
        texts = self.answers.get(column, [""] * len(conversations))
        n = len(conversations)
        return generation.Generations(list(texts), [1] * n, [1] * n, [True] * n, 0.1)


def run_eval(tool_run, monkeypatch, data, columns, out, answers=ANSWERS):
    from tuneforge.evaluation.api import evaluate

    run_dir, folder = tool_run
    fake = Chosen(columns, answers)
    monkeypatch.setattr(generation, "generate", fake)
    result = evaluate(run_dir, data=str(folder / data), columns=columns, out=folder / out, progress=False)
    return result, fake


@pytest.fixture(scope="module")
def chosen(tool_run):
    with pytest.MonkeyPatch.context() as mp:      # undone before the module's other tests
        return run_eval(tool_run, mp, "test.jsonl", ["base", "fewshot", "tuned"], "eval-chosen")


def test_every_column_renders_the_tools_and_stops_before_the_reference_call(chosen, tokenizer):
    _, fake = chosen
    block = tools_block(TOOLS)
    assert set(fake.prompts) == {"base", "fewshot", "tuned"}
    for column, prompts in fake.prompts.items():
        for record, prompt in zip(RECORDS, prompts, strict=True):
            assert block in prompt, column                       # the record's tools, in every column
            assert prompt.endswith("<|im_start|>assistant\n")
            last = record["messages"][-1]
            expected = (hermes(c["function"]["name"], json.loads(c["function"]["arguments"]))
                        if (c := (last.get("tool_calls") or [None])[0]) else last["content"])
            full = render_chat(tokenizer, record["messages"], False, tools=record["tools"])
            closed = render_chat(tokenizer, record["messages"][:-1], False, tools=record["tools"])
            assert full.startswith(closed) and expected in full[len(closed):]
            assert expected not in prompt, column                # the prompt stops before the reference turn
            if column != "fewshot":
                assert prompt == render_chat(tokenizer, record["messages"][:-1], True, tools=record["tools"])
    # the shots keep their own calls and results, in the same format
    shots = fake.prompts["fewshot"][0]
    assert sum(hermes("get_weather", {"city": f"T{i}"}) in shots for i in range(4)) >= 1
    assert "<tool_response>\nmild\n</tool_response>" in shots


def test_report_tool_calls_block_equals_summarise_by_hand(chosen):
    result, _ = chosen
    entry = result.report["sets"]["test"]
    validators = tool_validators(TOOLS)
    by_hand = {}
    for column in ("base", "tuned"):
        scores = [score_calls(p, r, validators) for p, r in zip(CALLS[column], REFERENCE_CALLS, strict=True)]
        by_hand[column] = summarise(scores)
        assert entry["columns"][column]["tool_calls"] == by_hand[column]
    # and the hand-summarised figures are the ones expected from the answers
    base, tuned = by_hand["base"], by_hand["tuned"]
    assert base["failures"] == {NO_CALL: 1, UNWANTED_CALL: 0, WRONG_TOOL: 1, BAD_ARGUMENTS: 1}
    assert tuned["failures"] == {NO_CALL: 0, UNWANTED_CALL: 1, WRONG_TOOL: 0, BAD_ARGUMENTS: 1}
    assert [tuned[m]["value"] for m in ("tool_name", "args_exact", "args_valid")] == [1, 2 / 3, 3 / 4]
    assert base["call_rate"]["value"] == 0.5 and tuned["examples"] == 4 and tuned["needing_a_call"] == 3
    # text metrics compare the content part of each answer with the reference's content
    refs = [r["messages"][-1]["content"] for r in RECORDS]
    for column in ("base", "tuned"):
        expected = sum(c == r for c, r in zip(CONTENT[column], refs, strict=True)) / 4
        assert entry["columns"][column]["metrics"]["exact"]["value"] == expected
    paired = entry["paired_tool_calls"]["tuned - base"]
    assert paired["tool_name"]["value"] == pytest.approx(2 / 3) and paired["tool_name"]["n"] == 3
    assert paired["args_exact"]["value"] == pytest.approx(2 / 3)


def test_html_and_markdown_show_the_tool_table(chosen):
    result, _ = chosen
    page = (result.out_dir / "report.html").read_text()
    assert "<h3>Tool calls</h3>" in page and "<table class='tools'>" in page
    table = page.split("<table class='tools'>")[1].split("</table>")[0]
    assert "<th>tool name</th>" in table and f"<th>{WRONG_TOOL}</th>" in table
    assert "<td class=''>tuned</td><td class='num'>4</td><td class='num'>3</td>" in table
    assert "100.0% [100.0, 100.0]" in table         # tuned tool name
    md = (result.out_dir / "report.md").read_text()
    assert "| tuned | 4 | 3 | 100.0% [100.0, 100.0] | 100.0% [100.0, 100.0] | 66.7% [" in md


def test_a_set_without_tools_has_no_tool_block(tool_run, monkeypatch):
    result, fake = run_eval(tool_run, monkeypatch, "plain.jsonl", ["base", "tuned"], "eval-plain",
                            answers={"base": ["Hello.", "x"], "tuned": ["Hello.", "Bye."]})
    entry = result.report["sets"]["test"]
    assert all("tool_calls" not in col for col in entry["columns"].values())
    assert "paired_tool_calls" not in entry
    assert "Tool calls" not in (result.out_dir / "report.html").read_text()
    assert all("<tools>" not in p for p in fake.prompts["base"])
    assert entry["columns"]["tuned"]["metrics"]["exact"]["value"] == 1.0


def test_real_generation_gives_each_column_a_tool_block(tool_run):
    from tuneforge.evaluation.api import evaluate

    run_dir, folder = tool_run
    result = evaluate(run_dir, data=str(folder / "test.jsonl"), columns=["base", "tuned"], out=folder / "eval-real",
                      progress=False)
    entry = result.report["sets"]["test"]
    for col in entry["columns"].values():
        assert col["tool_calls"]["examples"] == 4 and col["tool_calls"]["needing_a_call"] == 3
    # room for the longest reference call (its tokens and a margin) rather than the 64-token default alone
    assert result.report["metadata"]["max_new_tokens"] >= 64


def test_call_markers_survive_decoding_where_the_tokenizer_marks_them_special(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    text = hermes("add", {"a": 1, "b": 2})
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    decode = generation._decoder(tok)
    assert decode(ids, True) == text
    assert decode(ids, False) == text.replace("<tool_call>", "").replace("</tool_call>", "").strip()

