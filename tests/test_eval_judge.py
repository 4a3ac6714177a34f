"""LLM-as-judge through the official openai client against a tiny fake OpenAI-compatible endpoint started here."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneforge.config.eval import JudgeSettings
from tuneforge.evaluation import judge


def _answers(prompt: str) -> tuple[str, str]:
    a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End of Assistant A", prompt, re.S).group(1)
    b = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End of Assistant B", prompt, re.S).group(1)
    return a, b


JUDGES = {
    # prefers the answer that names the queue "billing"; a tie when both or neither do: position-independent
    "fair": lambda a, b: "[[C]]" if ("billing" in a) == ("billing" in b) else ("[[A]]" if "billing" in a else "[[B]]"),
    "first": lambda a, b: "Assistant A is better. [[A]]",        # pure position bias
    "mumble": lambda a, b: "Both have merits.",                   # never a verdict
}


@pytest.fixture()
def endpoint():
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, payload):
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "t"}
                                                   for m in JUDGES]})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(request)
            verdict = JUDGES.get(request["model"], JUDGES["fair"])(*_answers(request["messages"][-1]["content"]))
            self._send({"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": verdict}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", calls
    server.shutdown()


PROMPTS = ["charged twice", "parcel late", "double charge", "app crash"]
TUNED = ["billing", "shipping", "billing", "bug"]
BASE = ["I'm sorry to hear that", "shipping", "billing", "Please restart"]


def _run(url, model):
    settings = JudgeSettings(url=url, model=model)
    return judge.judge_pairwise(judge.connect(settings), settings, PROMPTS, TUNED, BASE)


def test_a_fair_judge_counts_wins_ties_and_losses_in_both_orders(endpoint):
    url, calls = endpoint
    out = _run(url, "fair")
    assert len(calls) == 8                                        # every prompt judged twice, answers swapped
    first, second = _answers(calls[0]["messages"][-1]["content"]), _answers(calls[1]["messages"][-1]["content"])
    assert first == (TUNED[0], BASE[0]) and second == (BASE[0], TUNED[0])
    assert out["win"]["value"] == 0.25 and out["tie"]["value"] == 0.75 and out["loss"]["value"] == 0.0
    assert out["consistency"] == 1.0 and out["unparseable"] == 0.0
    assert "ranking signal, not a score" in out["note"]


def test_a_position_biased_judge_gives_only_ties_and_zero_consistency(endpoint):
    out = _run(endpoint[0], "first")
    assert out["tie"]["value"] == 1.0 and out["consistency"] == 0.0


def test_unparseable_verdicts_are_counted(endpoint):
    out = _run(endpoint[0], "mumble")
    assert out["unparseable"] == 1.0 and out["tie"]["value"] == 1.0


def test_combine_rules():
    assert judge.combine("A", "B") == ("win", True)
    assert judge.combine("B", "A") == ("loss", True)
    assert judge.combine("A", "A") == ("tie", False)           # flip: a tie
    assert judge.combine("C", "C") == ("tie", True)
    assert judge.combine(None, "B") == ("win", False)
    assert judge.parse_verdict("thinking [[B]] ... final: [[A]]") == "A"


def test_an_unreachable_judge_is_one_clear_error():
    with pytest.raises(judge.JudgeError, match="127.0.0.1:9"):
        judge.connect(JudgeSettings(url="http://127.0.0.1:9/v1", timeout_s=5))
