"""Render examples with the model's own chat template and mark the tokens that are trained.

The loss mask comes from **character offsets**, not from searching for the response text: for each
assistant turn ``i`` the template is rendered for ``messages[:i]`` (with the generation prompt) and for
``messages[:i+1]``; the characters between the two renders are that turn's answer, including the
template's end-of-turn token (``<|im_end|>`` for ChatML). Tokens whose offsets overlap such a span
are trained (a token like `` hello`` that starts with the template's separator space counts).
Every assistant turn of a multi-turn conversation is trained. If the template closes the
last turn without an EOS/end-of-turn token, the tokenizer's EOS is appended and trained, so the tuned
model learns to stop. Nothing is ever masked by token id, so pad == eos (as SmolLM2 ships) is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tuneforge.data.formats import Example, RecordError


@dataclass
class TokenizedExample:
    input_ids: list[int]
    trained: list[bool]  # trained[j]: token j is a target (the model learns to predict it)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(self.trained)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Return the rendered conversation and the ``[start, end)`` character spans of every assistant answer."""
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise RecordError(
                "the chat template does not render conversations incrementally (a prefix of the conversation "
                "renders differently); use train_on: all for this template", "chat_template"
            )
        start, end = len(before), len(upto)
        while end > start and upto[end - 1].isspace():  # the newline after <|im_end|> is not the answer
            end -= 1
        spans.append((start, end))
    return text, spans


def _end_markers(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    markers = [tokenizer.eos_token] if tokenizer.eos_token else []
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)  # O(1); get_vocab() builds a 49k-entry dict
        if token_id is not None and token_id != tokenizer.unk_token_id:
            markers.append(token)
    return tuple(markers)


def tokenize_example(example: Example, tokenizer: PreTrainedTokenizerBase,
                     train_on: str = "assistant") -> TokenizedExample:
    """Tokenize one example; see the module docstring for which tokens are trained."""
    eos = tokenizer.eos_token or ""
    if example.text is not None:
        text = example.text + eos
        enc = tokenizer(text, add_special_tokens=False)
        ids = enc["input_ids"]
        return TokenizedExample(ids, [True] * len(ids))

    text, spans = assistant_spans(tokenizer, example.messages)
    last_start, last_end = spans[-1]
    if not text[last_start:last_end].endswith(_end_markers(tokenizer)):
        # The template does not close the final answer with an end token: append EOS so the model stops.
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
        if end > start and end > spans[span_index][0]:  # the token overlaps the answer span
            trained[j] = True
    return TokenizedExample(ids, trained)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` followed by the generation prompt: the input used at inference."""
    return tokenizer(_render(tokenizer, messages, generation_prompt=True), add_special_tokens=False)["input_ids"]
