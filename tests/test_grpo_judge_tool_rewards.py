"""GRPO's ``judge`` reward (an LLM through an OpenAI-compatible endpoint: a fake one started here, no network) and
``tool_call`` reward (completions' calls parsed in the run's format against the record's reference calls).

Judge: the filled template reaches the endpoint, number and [[YES]]/[[NO]] replies are normalised to [0, 1], at most
``concurrency`` requests are in flight, 5xx and timeouts are retried with growing backoff, and a call that still
fails or a reply without a score gets ``default_score`` and is counted (in ``metrics.jsonl`` of a run too), or stops
the run with ``fail_on_error``. Tool call: each part of the score against hand-computed values, every format's
parser, and a GRPO run that reads a reference from ``messages``' ``tool_calls``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.config.run import RewardSpec
from tuneforge.training.grpo_judge import JudgeReward, parse_score, prompt_text
from tuneforge.training.grpo_rewards import RewardError, build_rewards
from tuneforge.training.grpo_tool_calls import arguments_f1, reference_calls, score_calls
from tuneforge.training.trainer import train


class FakeJudge:
    """An OpenAI-compatible endpoint whose reply is ``reply(user_text)``; ``fail_first[text]`` calls of a text answer
    500 first; ``delay`` seconds per call; ``in_flight``/``peak``: concurrent requests."""

    def __init__(self, reply):
        self.reply, self.fail_first, self.delay = reply, {}, 0.0
        self.calls: list[dict] = []
        self.in_flight = self.peak = 0
        lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload, status=200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "judge", "object": "model", "created": 0,
                                                        "owned_by": "t"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = request["messages"][-1]["content"]
                with lock:
                    judge.calls.append(request)
                    judge.in_flight += 1
                    judge.peak = max(judge.peak, judge.in_flight)
                    failing = judge.fail_first.get(text, 0)
                    if failing:
                        judge.fail_first[text] = failing - 1
                time.sleep(judge.delay)
                # Out of flight before the reply is written: the client may send its next request as soon as it
                # has read this one, before a ``finally`` here would run (which made ``peak`` one too high).
                with lock:
                    judge.in_flight -= 1
                if failing:
                    self._send({"error": {"message": "overloaded"}}, status=500)
                    return
                self._send({"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": judge.reply(text)}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _rating(text: str) -> str:
    """Rates the response by how many times it says 'good' (0-10), as '[[N]]'; 'mumble' gets no number."""
    response = re.search(r"\[Response\]\n(.*?)\n\n", text, re.S).group(1)
    if "mumble" in response:
        return "I cannot decide."
    return f"Some reasoning about 3 things. Rating: [[{min(10, 2 * response.count('good'))}]]"


@pytest.fixture()
def fake():
    judge = FakeJudge(_rating)
    yield judge
    judge.server.shutdown()


def _judge(fake, **options):
    return build_rewards([RewardSpec(name="judge", options={"base_url": fake.url, "model": "judge", "backoff_s": 0,
                                                            **options})])[0]


PROMPTS = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How is it?"}]] * 4


def test_the_judge_scores_each_completion_with_the_filled_template(fake):
    reward = _judge(fake, template="Q: {prompt}\nRef: {reference}\n[Response]\n{completion}\n\nRate 0-10.")
    assert reward.needs == ("answer",)
    scores = reward(PROMPTS, ["good", "good good good", "bad", "good " * 9], {"answer": ["a", "b", "c", "d"]})
    assert scores == [0.2, 0.6, 0.0, 1.0]
    texts = sorted(c["messages"][-1]["content"] for c in fake.calls)
    assert texts[0] == "Q: How is it?\nRef: a\n[Response]\ngood\n\nRate 0-10."
    assert all(c["model"] == "judge" and c["temperature"] == 0.0 for c in fake.calls)
    assert _judge(fake).needs == ()                      # the default template reads no reference


def test_score_parsing_and_prompt_text():
    assert parse_score("I'd say 7 out of... final [[8]]") == 0.8          # the last number
    assert parse_score("Score: 15") == 1.0 and parse_score("-3") == 0.0     # clipped into [0, 1]
    assert parse_score("3", scale=(1, 5)) == 0.5
    assert parse_score("no digits") is None
    assert parse_score("[[no]] hmm, actually [[Yes]]", "yes_no") == 1.0
    assert parse_score("[[NO]]", "yes_no") == 0.0 and parse_score("YES", "yes_no") is None
    assert prompt_text([{"role": "user", "content": "hi"}]) == "hi"
    assert prompt_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}]) == "user: a\nassistant: b\nuser: c"


def test_yes_no_judge(tmp_path):
    judge = FakeJudge(lambda text: "[[YES]]" if "Paris" in text else "Hmm. [[NO]]")
    try:
        reward = build_rewards([RewardSpec(name="judge", options={"base_url": judge.url, "model": "judge",
                                                                  "parse": "yes_no"})])[0]
        assert reward(PROMPTS[:2], ["Paris", "Rome"], {}) == [1.0, 0.0]
    finally:
        judge.server.shutdown()


def test_concurrency_is_limited(fake):
    fake.delay = 0.05
    reward = _judge(fake, concurrency=3)
    reward(PROMPTS * 3, [f"good {i}" for i in range(12)], {})
    assert len(fake.calls) == 12 and fake.peak == 3


def test_server_errors_are_retried_with_growing_backoff(fake):
    waits: list[float] = []
    judge = JudgeReward({"base_url": fake.url, "model": "judge", "retries": 3, "backoff_s": 0.5}, sleep=waits.append)
    text = judge.template.format(prompt="How is it?", completion="good good", reference="")
    fake.fail_first[text] = 2
    assert judge(PROMPTS[:1], ["good good"]) == [0.4]
    assert waits == [0.5, 1.0] and judge.counts() == {"failed": 0, "unparseable": 0}


def test_failed_and_unparseable_calls_get_the_default_score_and_are_counted(fake, caplog):
    judge = JudgeReward({"base_url": fake.url, "model": "judge", "retries": 1, "backoff_s": 0,
                         "default_score": 0.5})
    text = judge.template.format(prompt="How is it?", completion="good", reference="")
    fake.fail_first[text] = 5                            # more than the retries
    with caplog.at_level("WARNING"):
        scores = judge(PROMPTS[:3], ["good", "mumble", "good good good good good"])
    assert scores == [0.5, 0.5, 1.0]
    assert judge.counts() == {"failed": 1, "unparseable": 1} and judge.counts() == {"failed": 0, "unparseable": 0}
    assert "2 of 3 judge calls gave no score (1 failed, 1 unparseable)" in caplog.text
    strict = _judge(fake, fail_on_error=True)
    with pytest.raises(RewardError, match=r"judge: 1 of 1 judge calls gave no score .*fail_on_error"):
        strict(PROMPTS[:1], ["mumble"], {})


def test_a_timeout_is_a_failed_call_not_a_stop(fake):
    fake.delay = 1.0
    judge = _judge(fake, timeout_s=0.2, retries=1, default_score=-1)
    assert judge(PROMPTS[:1], ["good"], {}) == [-1.0]
    assert judge.fn.counts() == {"failed": 1, "unparseable": 0}
    assert len(fake.calls) == 2                          # tried again once


@pytest.mark.parametrize("options, says", [
    ({"model": "judge"}, "judge needs options.base_url"),
    ({"template": "{prompt} only"}, "has no {completion}"),
    ({"template": "{completion} {answer}"}, "names {answer}"),
    ({"parse": "stars"}, "options.parse is 'stars'"),
    ({"scale": [10, 0]}, "options.scale is [10, 0]"),
    ({"api_key_env": "TUNEFORGE_NO_SUCH_KEY"}, "TUNEFORGE_NO_SUCH_KEY, which is not set"),
    ({"temprature": 0}, "unknown option 'temprature'"),
])
def test_bad_judge_settings_fail_in_one_line(fake, options, says):
    base = {"base_url": fake.url, "model": "judge"}
    merged = {**base, **options} if "model" not in options else options
    with pytest.raises(RewardError, match=re.escape(says)):
        build_rewards([RewardSpec(name="judge", options=merged)])


def test_a_second_judge_is_named_as_its_metrics_are(fake):
    """Two judges in one run log as ``judge`` and ``judge#2``; the second's messages say ``judge#2``."""
    with pytest.raises(RewardError, match=r"^grpo\.rewards: judge#2 options\.scale is \[10, 0\]"):
        build_rewards([RewardSpec(name="judge", options={"base_url": fake.url, "model": "judge"}),
                       RewardSpec(name="judge", options={"base_url": fake.url, "model": "judge", "scale": [10, 0]})])


def test_an_endpoint_that_is_not_there_fails_before_the_run():
    with pytest.raises(RewardError, match=r"judge: the endpoint http://127\.0\.0\.1:9/v1 does not answer"):
        build_rewards([RewardSpec(name="judge", options={"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                                         "timeout_s": 5})])


def test_a_grpo_run_with_the_judge_logs_its_failed_calls(fake, tiny_model_dir, tmp_path):
    """Every completion of the tiny random model is unparseable to a judge that only mumbles: the run goes on, with
    the default score, and metrics.jsonl counts them per step (2 prompts x 4 completions)."""
    fake.reply = lambda text: "mumble"
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something about item {i}."} for i in range(8)])
    config = load_config(data={
        "model": str(tiny_model_dir), "task": "grpo", "output_dir": str(tmp_path / "run"), "max_steps": 2,
        "data": {"train": str(data), "val_fraction": 0}, "batch_size": 2, "progress": False, "eval_share": None,
        "grpo": {"num_generations": 4, "max_completion_length": 4, "max_refill_rounds": 0,   # equal scores: no refill
                 "rewards": [{"name": "judge", "options": {"base_url": fake.url, "model": "judge",
                                                           "default_score": 0.25}}]}})
    result = train(config)
    assert [r["rewards/judge/unparseable"] for r in result.metrics] == [8.0, 8.0]
    assert [r["rewards/judge/failed"] for r in result.metrics] == [0.0, 0.0]
    assert [r["reward"] for r in result.metrics] == [0.25, 0.25]


# ------------------------------------------------------------------------------------------ tool_call


WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}}}}}]


def _hermes(*calls):
    return "".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)


def test_the_parts_of_the_tool_call_score():
    assert arguments_f1({"city": "Paris", "unit": "kelvin"}, WEATHER["arguments"]) == pytest.approx(0.5)
    assert arguments_f1({}, {}) == 1.0 and arguments_f1({"a": 1}, {}) == 0.0
    right = score_calls([WEATHER], [WEATHER], TOOLS)
    assert right == 1.0
    # name right (0.3), arguments F1 0.5 (x 0.5), schema invalid (unit not in the enum): 0.3 + 0.25
    wrong_unit = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}
    assert score_calls([wrong_unit], [WEATHER], TOOLS) == pytest.approx(0.55)
    assert score_calls([wrong_unit], [WEATHER], None) == pytest.approx(0.75)     # no tools: parsed is valid
    assert score_calls([wrong_unit], [WEATHER], TOOLS, arguments="exact") == pytest.approx(0.3)
    other = {"name": "get_time", "arguments": {"city": "Paris"}}
    assert score_calls([other], [WEATHER], TOOLS) == 0.0                  # unknown tool: no part
    # two calls for one: name F1 2/3, arguments 1/2, schema 1/2 -> 0.3*2/3 + 0.5*0.5 + 0.2*0.5
    assert score_calls([WEATHER, other], [WEATHER], TOOLS) == pytest.approx(0.2 + 0.25 + 0.1)
    assert score_calls([], [WEATHER]) == 0.0 and score_calls([], []) == 1.0 and score_calls([WEATHER], []) == 0.0
    assert score_calls([wrong_unit], [WEATHER], TOOLS, {"schema": 0, "arguments": 0}) == 1.0


def test_reference_calls_in_every_shape():
    openai_shape = [{"id": "1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": json.dumps(WEATHER["arguments"])}}]
    assert reference_calls(openai_shape) == [WEATHER]
    assert reference_calls(WEATHER) == [WEATHER] and reference_calls(json.dumps([WEATHER])) == [WEATHER]
    assert reference_calls([]) == [] and reference_calls("nope") is None and reference_calls([{"x": 1}]) is None


@pytest.mark.parametrize("fmt, text", [
    ("hermes", _hermes(WEATHER)),
    ("mistral", "[TOOL_CALLS]" + json.dumps([WEATHER])),
    ("llama3_json", json.dumps({"name": "get_weather", "parameters": WEATHER["arguments"]})),
    ("granite", "<|tool_call|>" + json.dumps([WEATHER])),
])
def test_completions_are_read_in_the_runs_format(fmt, text):
    from tuneforge.data.tool_formats import FORMATS

    reward = build_rewards([RewardSpec(name="tool_call")], FORMATS[fmt])[0]
    assert reward.needs == ("tool_calls",)
    fields = {"tool_calls": [[WEATHER]] * 2, "tools": [TOOLS] * 2}
    assert reward(PROMPTS[:2], [text, "It is sunny in Paris."], fields) == [1.0, 0.0]
    other = "hermes" if fmt != "hermes" else "mistral"
    by_option = build_rewards([RewardSpec(name="tool_call", options={"format": other})], FORMATS[fmt])[0]
    assert by_option(PROMPTS[:1], [text], {"tool_calls": [[WEATHER]]}) == [0.0]     # options.format wins


@pytest.mark.parametrize("options, says", [
    ({"format": "xml"}, "options.format is 'xml'"),
    ({"weights": {"names": 1}}, "options.weights"),
    ({"weights": {"name": 0, "arguments": 0, "schema": 0}}, "are all 0"),
    ({"arguments": "fuzzy"}, "options.arguments is 'fuzzy'"),
])
def test_bad_tool_call_settings_fail_in_one_line(options, says):
    with pytest.raises(RewardError, match=re.escape(says)):
        build_rewards([RewardSpec(name="tool_call", options=options)])


def test_a_bad_reference_is_named():
    reward = build_rewards([RewardSpec(name="tool_call")])[0]
    with pytest.raises(RewardError, match=r"tool_calls of completion 0 is not a list of calls"):
        reward(PROMPTS[:1], ["x"], {"tool_calls": ["not a call"]})


def test_a_grpo_run_reads_the_reference_from_messages_tool_calls(tiny_model_dir, tmp_path):
    """Records as conversations ending in an assistant tool call, with tools: the run starts, renders the tools,
    and scores (the tiny random model writes no call: 0); a record without a reference call goes to rejects."""
    call = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    rows = [{"messages": [{"role": "user", "content": f"Weather in city {i}?"},
                          {"role": "assistant", "content": "", "tool_calls": call}], "tools": TOOLS}
            for i in range(4)] + [{"prompt": "No reference here."}]
    data = write_jsonl(tmp_path / "calls.jsonl", rows)
    config = load_config(data={
        "model": str(tiny_model_dir), "task": "grpo", "output_dir": str(tmp_path / "run"), "max_steps": 1,
        "data": {"train": str(data), "val_fraction": 0}, "batch_size": 2, "progress": False, "eval_share": None,
        "grpo": {"num_generations": 2, "max_completion_length": 4, "rewards": [{"name": "tool_call"}]}})
    result = train(config)
    assert result.metrics[0]["rewards/tool_call/mean"] == 0.0
    rejects = (tmp_path / "run" / "rejects.jsonl").read_text()
    assert "missing field 'tool_calls', which reward tool_call reads" in rejects


def test_completion_texts_keep_the_formats_marker_tokens(tokenizer):
    """A vocabulary where ``[TOOL_CALLS]`` is a special token: completion texts keep it when the run's format names
    it (``keep``), so the Mistral parser finds the call, and drop the other special tokens as before."""
    import copy

    from tuneforge.data.tool_formats import FORMATS, special_marker_ids
    from tuneforge.training.grpo_rollout import decode

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    keep = frozenset(special_marker_ids(tok, FORMATS["mistral"]).values())
    assert len(keep) == 1
    ids = tok("[TOOL_CALLS]" + json.dumps([WEATHER]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert decode(tok, ids) == json.dumps([WEATHER])                        # without keep: the marker is gone
    text = decode(tok, ids, keep)
    assert text == "[TOOL_CALLS]" + json.dumps([WEATHER])                   # kept; the end token still dropped
    assert FORMATS["mistral"].parse(text)[1] == [WEATHER]
