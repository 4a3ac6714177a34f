"""The engine's text path: incremental detokenization equals decoding everything at once (multi-byte characters
split across tokens included), and stop strings cut the text before them without ever streaming their start."""

from __future__ import annotations

import pytest

from _serve_helpers import tiny_base
from tuneforge.serving.adapters import AdapterRegistry, AdapterSet
from tuneforge.serving.engine import Engine, Request, _Row


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(AdapterRegistry(AdapterSet(tiny_base())), tokenizer)


def feed(engine, tokens, stop=()):
    streamed = []
    row = _Row(Request([1], stop=list(stop), sink=lambda ev: streamed.append(ev[1]) if ev[0] == "token" else None),
               pos=1)
    reason = None
    for tok in tokens:
        row.tokens.append(tok)
        reason = engine._stream(row)
        row.stopped_by_string = reason == "stop"
        if reason:
            break
    engine._finish(row, reason or "length")
    return "".join(streamed), streamed, reason


TEXTS = ["héllo wörld, naïve café", "日本語のテキスト 👋🏽 emoji", "  leading spaces\nand\ttabs ",
         "<|im_end|> is special"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(engine, tokenizer, text):
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    full, pieces, _ = feed(engine, tokens)
    assert full == tokenizer.decode(tokens, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)          # never half a character on the wire
    assert len(pieces) > 1


def test_stop_string_cuts_before_it_and_is_never_streamed(engine, tokenizer):
    tokens = tokenizer("the answer is billing. STOP and then more text", add_special_tokens=False)["input_ids"]
    full, pieces, reason = feed(engine, tokens, stop=["STOP"])
    assert reason == "stop" and full == "the answer is billing. "
    assert not any("ST" in p for p in pieces)
    full, _, reason = feed(engine, tokens, stop=["nowhere"])
    assert reason is None and full == tokenizer.decode(tokens)
