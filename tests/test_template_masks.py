"""Masks for any chat template: each assistant turn is found in the one full rendering (sentinels), not by
rendering prefixes. ChatML stays token for token what the incremental renderer gave; the public templates of
Llama 3.x, Qwen 2.5, Qwen3, Gemma 3, Mistral and Phi-3 (tests/fixtures/chat_templates/, sources in each file's
first line) train exactly each answer and its end-of-turn marker; reasoning is trained or not as asked."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tuneforge.data.dataset import load_examples, tokenize_examples
from tuneforge.data.formats import Example, RecordError
from tuneforge.data.rendering import TokenizedExample, tokenize_example
from tuneforge.data.settings import DataConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
RECIPES = ROOT / "src" / "tuneforge" / "recipes" / "data"

# each public template: its special tokens (added to SmolLM2's vocabulary, so masks are exact token by token) and
# the marker that closes an answer ("EOS": the tokenizer's EOS, <|im_end|> for SmolLM2's)
PUBLIC = {
    "llama3": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "qwen2_5": ([], "<|im_end|>"),
    "qwen3": (["<think>", "</think>"], "<|im_end|>"),
    "gemma3": (["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "mistral": (["[INST]", "[/INST]"], "EOS"),
    "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
}
TWO_TURNS = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
             {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, since 1871."}]


def with_template(tokenizer, template: str, tokens: list[str] = ()):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    if tokens:
        tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    return tok


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")


def trained_text(tok: TokenizedExample, tokenizer) -> str:
    """The trained tokens decoded in a row, ``|`` where a run of trained tokens ends."""
    out, previous = [], False
    for token_id, trained in zip(tok.input_ids, tok.trained, strict=True):
        if trained:
            out.append(tokenizer.decode([token_id]))
        elif previous:
            out.append("|")
        previous = trained
    return "".join(out) + ("|" if previous else "")


# ------------------------------------------------------------------------------------ ChatML: unchanged


def old_tokenize_example(example: Example, tokenizer, train_on: str = "assistant") -> TokenizedExample:
    """The renderer before issue #24 (incremental prefix renders), kept verbatim as the reference for ChatML."""
    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    eos = tokenizer.eos_token or ""
    if example.text is not None:
        ids = tokenizer(example.text + eos, add_special_tokens=False)["input_ids"]
        return TokenizedExample(ids, [True] * len(ids))
    messages = example.messages
    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        upto = render(messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise RecordError("not incremental", "chat_template")
        start, end = len(before), len(upto)
        while end > start and upto[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    markers = [tokenizer.eos_token] if tokenizer.eos_token else []
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            markers.append(token)
    last_start, last_end = spans[-1]
    if not text[last_start:last_end].endswith(tuple(markers)):
        text = text[:last_end] + eos + text[last_end:]
        spans[-1] = (last_start, last_end + len(eos))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on == "all":
        return TokenizedExample(ids, [True] * len(ids))
    trained = [False] * len(ids)
    span_index = 0
    for j, (start, end) in enumerate(enc["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        if end > start and end > spans[span_index][0]:
            trained[j] = True
    return TokenizedExample(ids, trained)


EDGE_CASES = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello there \n"}],
    [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA1"},
     {"role": "user", "content": "\n q2 \n"}, {"role": "assistant", "content": "\n\nA2\n\n"}],
    [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "```py\nprint(1)\n```\n<|im_end|>x"}],
]


def test_chatml_masks_are_token_for_token_those_of_the_incremental_renderer(tokenizer):
    """Every record of the quickstart's files (train, validation, test, handwritten) and edge cases (whitespace
    around answers, an answer that also appears in the prompt, multi-turn, <think> blocks, an end token inside an
    answer): the same ids and the same mask as before, with SmolLM2's own ChatML template."""
    examples = [Example(messages=m) for m in EDGE_CASES]
    for name in ("tickets_train", "tickets_validation", "tickets_test", "tickets_handwritten"):
        examples += load_examples(str(RECIPES / f"{name}.jsonl"), DataConfig(train="x")).examples
    assert len(examples) > 1000
    for example in examples:
        for train_on in ("assistant", "all"):
            new = tokenize_example(example, tokenizer, train_on)
            old = old_tokenize_example(example, tokenizer, train_on)
            assert new.input_ids == old.input_ids and new.trained == old.trained, example.messages


# ------------------------------------------------------------------------------------ public templates


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_templates_train_each_answer_and_its_end_marker(tokenizer, name):
    tokens, marker = PUBLIC[name]
    tok = with_template(tokenizer, fixture(name), tokens)
    end = tok.eos_token if marker == "EOS" else marker
    result = tokenize_example(Example(messages=TWO_TURNS), tok)
    assert trained_text(result, tok) == f"Paris{end}|Rome, since 1871.{end}|"


def test_the_mistral_template_moves_the_system_message_and_still_trains_both_answers(tokenizer):
    """Mistral's template writes the system message into the conversation's *last* message when that is a user
    turn: the prompt before an answer is no prefix of the whole conversation, which the incremental renderer
    refused."""
    tok = with_template(tokenizer, fixture("mistral"), PUBLIC["mistral"][0])
    with pytest.raises(RecordError):
        old_tokenize_example(Example(messages=TWO_TURNS), tok)
    prompt = tok.apply_chat_template(TWO_TURNS[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.index("Be brief.") > prompt.index("Paris")
    assert "Be brief." not in tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert trained_text(tokenize_example(Example(messages=TWO_TURNS), tok), tok) == \
        f"Paris{tok.eos_token}|Rome, since 1871.{tok.eos_token}|"


def test_gemma_and_llama_trim_answers_and_the_whitespace_is_not_trained(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n  Hello  \n"}]
    for name in ("gemma3", "llama3"):
        tokens, marker = PUBLIC[name]
        tok = with_template(tokenizer, fixture(name), tokens)
        assert trained_text(tokenize_example(Example(messages=messages), tok), tok) == f"Hello{marker}|"


# ------------------------------------------------------------------------------------ Qwen3 and reasoning


QWEN3_CHAT = [{"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
              {"role": "user", "content": "Times 3?"},
              {"role": "assistant", "content": "12", "reasoning_content": "4 times 3 is 12."}]


def qwen3(tokenizer):
    return with_template(tokenizer, fixture("qwen3"), PUBLIC["qwen3"][0])


def test_qwen3_drops_earlier_reasoning_and_every_answer_is_still_trained(tokenizer):
    tok = qwen3(tokenizer)
    text = tok.apply_chat_template(QWEN3_CHAT, tokenize=False)
    assert "Two and two" not in text and "4 times 3 is 12." in text      # the template drops turn 1's reasoning
    with pytest.raises(RecordError):                                     # which the prefix renderer refused
        old_tokenize_example(Example(messages=QWEN3_CHAT), tok)
    result = tokenize_example(Example(messages=QWEN3_CHAT), tok)
    assert trained_text(result, tok) == "4<|im_end|>|<think>\n4 times 3 is 12.\n</think>\n\n12<|im_end|>|"


def test_reasoning_is_context_when_train_reasoning_is_off(tokenizer):
    tok = qwen3(tokenizer)
    result = tokenize_example(Example(messages=QWEN3_CHAT), tok, train_reasoning=False)
    assert trained_text(result, tok) == "4<|im_end|>|12<|im_end|>|"
    assert "4 times 3 is 12." in tok.decode(result.input_ids)            # still there, as context


def test_think_blocks_in_the_content_are_reasoning_too(tokenizer):
    """A ``<think>`` block opening the content (DeepSeek-R1 style records): Qwen3 takes it apart itself; a template
    that knows no reasoning (ChatML) prints it verbatim; either way train_reasoning decides whether it is trained."""
    inline = [{"role": m["role"], "content": (f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}"
                                              if m["role"] == "assistant" else m["content"])} for m in QWEN3_CHAT]
    tok = qwen3(tokenizer)
    assert tokenize_example(Example(messages=inline), tok).input_ids == \
        tokenize_example(Example(messages=QWEN3_CHAT), tok).input_ids
    chatml = with_template(tokenizer, tokenizer.chat_template)
    on = trained_text(tokenize_example(Example(messages=inline), chatml, train_reasoning=True), chatml)
    off = trained_text(tokenize_example(Example(messages=inline), chatml, train_reasoning=False), chatml)
    assert on == ("<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>|"
                  "<think>\n4 times 3 is 12.\n</think>\n\n12<|im_end|>|")
    assert off == "\n\n4<|im_end|>|\n\n12<|im_end|>|"


def test_qwen3_without_thinking_trains_the_answers_only(tokenizer):
    tok = qwen3(tokenizer)
    plain = [{"role": m["role"], "content": m["content"]} for m in QWEN3_CHAT]
    result = tokenize_example(Example(messages=plain), tok)
    assert "<think>\n\n</think>" in tok.decode(result.input_ids)          # the template's empty block: context
    assert trained_text(result, tok) == "4<|im_end|>|12<|im_end|>|"


def test_qwen2_5_adds_its_default_system_prompt_and_trains_only_the_answers(tokenizer):
    tok = with_template(tokenizer, fixture("qwen2_5"))
    result = tokenize_example(Example(messages=TWO_TURNS[1:]), tok)
    assert "You are Qwen" in tok.decode(result.input_ids)
    assert trained_text(result, tok) == "Paris<|im_end|>|Rome, since 1871.<|im_end|>|"


# ------------------------------------------------------------------------------------ refused records


DROPS_EARLIER_ANSWERS = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
CHANGES_ANSWERS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                   "{% endfor %}")


@pytest.mark.parametrize(("template", "message"), [
    (DROPS_EARLIER_ANSWERS, "drops assistant turn 1"),
    (CHANGES_ANSWERS, "changes the answers' text"),
    (fixture("gemma3"), "refused the conversation: Conversation roles must alternate"),
])
def test_a_template_that_loses_an_answer_sends_the_record_to_rejects(tokenizer, tmp_path, template, message):
    rows = [{"messages": TWO_TURNS}, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                   {"role": "assistant", "content": "c"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=str(path))
    rejects: list = []
    tok = with_template(tokenizer, template)
    kept, _ = tokenize_examples(load_examples(str(path), cfg), tok, cfg, rejects)
    assert rejects and all(r.reasons[0].check == "chat_template" for r in rejects)
    assert any(message in r.reasons[0].message for r in rejects), [r.reasons[0].message for r in rejects]
    assert len(kept) + len(rejects) == 2
