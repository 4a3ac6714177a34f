"""Render examples with the chat template and mark the tokens that are trained.

The loss mask comes from **character offsets**, not from searching for the response text. The conversation is
rendered once, whole, and each assistant turn is located in that rendering by rendering it again with the
answers replaced by sentinels (:mod:`tuneforge.data.turn_spans`): any template works, also one that does not
render a conversation as a prefix of its longer self (Qwen3 drops the reasoning of earlier turns, Mistral
moves the system message). A turn's trained span is its answer as rendered and the template's end-of-turn
marker after it (``<|im_end|>`` for ChatML); with ``train_reasoning`` also its reasoning, from the ``<think>``
tag on, where the template renders it. Tokens whose offsets overlap such a span are trained (a token like
`` hello`` that starts with the template's separator space counts). Every assistant turn of a multi-turn
conversation is trained. If the template closes the last turn without an EOS/end-of-turn marker, the
tokenizer's EOS is appended and trained, so the tuned model learns to stop. Nothing is ever masked by token
id, so pad == eos (as SmolLM2 ships) is harmless.

Tools (:mod:`tuneforge.data.tools`): a conversation with ``tools``, ``tool_calls`` or ``tool`` messages is
rendered by the template itself where its Jinja source reads ``tools`` and ``tool_calls`` (``tools=`` passed to
it), else in the built-in Hermes-style format (:func:`tuneforge.data.tools.to_builtin`), the same at training,
evaluation and serving. The assistant's calls are trained like its answers; tool results never are.

Template arguments (the run's ``template_kwargs:``, e.g. Qwen3's ``{enable_thinking: false}``) travel with the
tokenizer (:func:`set_template_kwargs`, saved in its ``tokenizer_config.json``): every rendering here passes
them to the template, so training, validation, generation, eval and serve render alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from tuneforge.data.formats import Example
from tuneforge.data.tools import template_supports_tools, to_builtin
from tuneforge.data.turn_spans import END_MARKERS, turn_spans


@dataclass
class TokenizedExample:
    input_ids: list[int]
    trained: list[bool]  # trained[j]: token j is a target (the model learns to predict it)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(self.trained)


# the key of tokenizer_config.json (the tokenizer's init_kwargs) that carries the run's template_kwargs
TEMPLATE_KWARGS_KEY = "tuneforge_template_kwargs"


def set_template_kwargs(tokenizer: PreTrainedTokenizerBase, kwargs: dict[str, Any] | None) -> None:
    """Make ``kwargs`` the arguments every rendering passes to ``tokenizer``'s chat template (saved with it)."""
    if kwargs:
        tokenizer.init_kwargs[TEMPLATE_KWARGS_KEY] = dict(kwargs)
    else:
        tokenizer.init_kwargs.pop(TEMPLATE_KWARGS_KEY, None)


def template_kwargs(tokenizer: Any) -> dict[str, Any]:
    """The chat template arguments ``tokenizer`` carries (empty: none)."""
    value = getattr(tokenizer, "init_kwargs", {}).get(TEMPLATE_KWARGS_KEY)
    return dict(value) if isinstance(value, dict) else {}


def native_tools(tokenizer: Any) -> bool:
    """Whether ``tokenizer``'s chat template renders tools and calls itself."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return any(template_supports_tools(t) for t in template.values())
    return template_supports_tools(template)


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool,
                extra: dict[str, Any] | None = None, tools: list[dict] | None = None) -> str:
    """``messages`` rendered with the chat template and its arguments (``extra`` over the tokenizer's); ``tools``:
    the conversation's tool definitions (see the module docstring)."""
    kwargs = {**template_kwargs(tokenizer), **(extra or {})}
    if uses_tools(messages, tools):
        if native_tools(tokenizer):
            if tools:
                kwargs["tools"] = tools
        else:
            messages = to_builtin(messages, tools)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def assistant_header(tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None = None) -> str | None:
    """The text the template opens an assistant turn with (its generation prompt), or None when it adds none."""
    probe = [{"role": "user", "content": "x"}]
    try:
        closed, opened = (render_chat(tokenizer, probe, g, tools=tools) for g in (False, True))
    except Exception:  # noqa: BLE001 - a template that refuses the probe: locate calls without the header
        return None
    return opened[len(closed):] if opened.startswith(closed) and len(opened) > len(closed) else None



def end_markers(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The texts that close an answer: the tokenizer's EOS and the usual templates' end-of-turn markers."""
    return ((tokenizer.eos_token,) if tokenizer.eos_token else ()) + END_MARKERS


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict], train_reasoning: bool = True,
                    tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Return the rendered conversation and the ``[start, end)`` character spans of every assistant answer (with
    its calls and end-of-turn marker; with ``train_reasoning``, from its rendered reasoning on)."""
    header = None
    if uses_tools(messages, tools):
        if native_tools(tokenizer):
            header = assistant_header(tokenizer, tools)
        else:
            messages, tools = to_builtin(messages, tools), None
    text, turns = turn_spans(lambda m: render_chat(tokenizer, m, False, tools=tools), messages,
                             end_markers(tokenizer), header)
    return text, [turn.trained(train_reasoning) for turn in turns]


def tokenize_example(example: Example, tokenizer: PreTrainedTokenizerBase,
                     train_on: str = "assistant", train_reasoning: bool = True) -> TokenizedExample:
    """Tokenize one example; see the module docstring for which tokens are trained."""
    eos = tokenizer.eos_token or ""
    if example.text is not None:
        text = example.text + eos
        enc = tokenizer(text, add_special_tokens=False)
        ids = enc["input_ids"]
        return TokenizedExample(ids, [True] * len(ids))

    text, spans = assistant_spans(tokenizer, example.messages, train_reasoning, example.tools)
    last_start, last_end = spans[-1]
    if not text[last_start:last_end].endswith(end_markers(tokenizer)):
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


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
               extra_kwargs: dict[str, Any] | None = None, tools: list[dict] | None = None) -> list[int]:
    """Token ids of ``messages`` followed by the generation prompt: the input used at inference (``extra_kwargs``:
    template arguments over the tokenizer's, e.g. a serve request's ``chat_template_kwargs``; ``tools``: the
    request's tool definitions, rendered as at training)."""
    text = render_chat(tokenizer, messages, True, extra_kwargs, tools)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
