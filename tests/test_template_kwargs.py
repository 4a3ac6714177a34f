"""``template_kwargs:`` (Qwen3's ``enable_thinking``) in every rendering, the held-out loss under ``train_reasoning``,
and ``tuneforge data stats --template`` counting what training tokenizes."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from conftest import write_jsonl
from test_template_masks import PUBLIC, QWEN3_CHAT, fixture, trained_text, with_template
from tuneforge.data.formats import Example
from tuneforge.data.rendering import prompt_ids, set_template_kwargs, template_kwargs, tokenize_example
from tuneforge.errors import ConfigError

PLAIN = [{"role": m["role"], "content": m["content"]} for m in QWEN3_CHAT]


def qwen3(tokenizer, **kwargs):
    tok = with_template(tokenizer, fixture("qwen3"), PUBLIC["qwen3"][0])
    set_template_kwargs(tok, kwargs)
    return tok


# ------------------------------------------------------------------------------------ template_kwargs


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_masks_are_right_with_and_without_thinking(tokenizer, thinking):
    """Both ways every answer (and, with reasoning records, the last turn's reasoning) is trained and nothing else;
    without thinking the inference prompt is exactly the training text before the last answer (the template's
    empty think block included), with thinking it stops before the block the model writes itself."""
    tok = qwen3(tokenizer, enable_thinking=thinking)
    reasoning = tokenize_example(Example(messages=QWEN3_CHAT), tok)
    assert trained_text(reasoning, tok) == "4<|im_end|>|<think>\n4 times 3 is 12.\n</think>\n\n12<|im_end|>|"
    plain = tokenize_example(Example(messages=PLAIN), tok)
    assert trained_text(plain, tok) == "4<|im_end|>|12<|im_end|>|"
    prompt = tok.decode(prompt_ids(tok, PLAIN[:-1]))
    assert prompt.endswith("<think>\n\n</think>\n\n") == (not thinking)
    text = tok.decode(plain.input_ids)
    assert text.startswith(prompt) and text[len(prompt):].startswith("12<|im_end|>") == (not thinking)


def test_an_unknown_kwarg_the_template_ignores_is_harmless(tokenizer):
    plain, extra = qwen3(tokenizer), qwen3(tokenizer, no_such_argument=3)
    assert template_kwargs(extra) == {"no_such_argument": 3}
    for messages in (QWEN3_CHAT, PLAIN):
        a, b = tokenize_example(Example(messages=messages), plain), tokenize_example(Example(messages=messages), extra)
        assert (a.input_ids, a.trained) == (b.input_ids, b.trained)
    assert prompt_ids(plain, PLAIN[:1]) == prompt_ids(extra, PLAIN[:1])


@pytest.mark.parametrize(("value", "says"), [
    ([1, 2], "template_kwargs must be a mapping of chat template arguments"),
    ("enable_thinking=false", "template_kwargs must be a mapping"),
    ({"add_generation_prompt": True}, "template_kwargs: 'add_generation_prompt' is set by tuneforge itself"),
    ({"bad name": 1}, "template_kwargs: 'bad name' is not a template variable name"),
])
def test_bad_template_kwargs_are_refused_in_one_line_naming_the_key(value, says):
    from tuneforge.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(data={"data": {"train": "x.jsonl"}, "template_kwargs": value}, check_files=False)
    assert says in str(e.value) and "\n" not in str(e.value)
    config = load_config(data={"data": {"train": "x.jsonl"}, "template_kwargs": {"enable_thinking": False}},
                         check_files=False)
    assert config.template_kwargs == {"enable_thinking": False}


def test_the_kwargs_change_the_token_cache_key_and_travel_with_the_saved_tokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from tuneforge.data.token_cache import tokenizer_fingerprint

    off, on = qwen3(tokenizer, enable_thinking=False), qwen3(tokenizer)
    assert tokenizer_fingerprint(off) != tokenizer_fingerprint(on)
    assert tokenizer_fingerprint(on) == tokenizer_fingerprint(with_template(tokenizer, fixture("qwen3"),
                                                                             PUBLIC["qwen3"][0]))
    off.save_pretrained(tmp_path)
    assert template_kwargs(AutoTokenizer.from_pretrained(tmp_path)) == {"enable_thinking": False}


def test_serve_renders_with_the_run_kwargs_and_a_request_may_override_them(tmp_path, tokenizer):
    """An adapter trained with enable_thinking false: its chats get the empty think block; a request's
    chat_template_kwargs override it; a bad value is a 400 naming the field, never a 5xx."""
    from _serve_helpers import save_adapter, tiny_base
    from tuneforge.serving import protocol as P
    from tuneforge.serving.protocol import APIError
    from tuneforge.serving.server import ServeConfig, Server

    adapter = tmp_path / "thinking-off"
    save_adapter(adapter, "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=1)
    qwen3(tokenizer, enable_thinking=False).save_pretrained(adapter)
    server = Server(ServeConfig(base="tiny", adapters={"off": str(adapter)}), model=tiny_base(),
                    tokenizer=qwen3(tokenizer))
    messages = [{"role": "user", "content": "2+2?"}]
    off = server.tokenizer_for("off")
    assert off.decode(server.chat_prompt_ids("off", messages)).endswith("assistant\n<think>\n\n</think>\n\n")
    assert off.decode(server.chat_prompt_ids("off", messages, {"enable_thinking": True})).endswith("assistant\n")
    assert off.decode(server.chat_prompt_ids(None, messages)).endswith("assistant\n")    # the base's: thinking on
    body = {"model": "off", "messages": messages}
    parsed = P.parse_body(P.ChatCompletionRequest,
                          json.dumps({**body, "chat_template_kwargs": {"enable_thinking": False}}).encode())
    assert parsed.chat_template_kwargs == {"enable_thinking": False}
    for bad, says in (([1], "chat_template_kwargs must be a mapping"), ({"tokenize": True}, "set by tuneforge")):
        with pytest.raises(APIError) as e:
            P.parse_body(P.ChatCompletionRequest, json.dumps({**body, "chat_template_kwargs": bad}).encode())
        assert e.value.status == 400 and says in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------ held-out loss


def test_heldout_loss_excludes_reasoning_when_train_reasoning_is_off(tokenizer, tiny_model):
    """The held-out loss of a reasoning record with train_reasoning false is the mean cross-entropy over exactly
    the answer tokens (and their end markers), computed here by hand from the model's logits."""
    from tuneforge.evaluation.heldout import example_losses, tokenize_heldout

    tok = with_template(tokenizer, fixture("qwen3"))            # no new tokens: the tiny model's vocabulary
    examples = [Example(messages=QWEN3_CHAT), Example(messages=QWEN3_CHAT[:2])]
    off = tokenize_heldout(examples, tok, train_reasoning=False)
    on = tokenize_heldout(examples, tok, train_reasoning=True)
    assert [t.input_ids for t in off] == [t.input_ids for t in on]
    assert [trained_text(t, tok) for t in off] == ["4<|im_end|>|12<|im_end|>|", "4<|im_end|>|"]
    assert "4 times 3 is 12." in trained_text(on[0], tok)
    sums, counts = example_losses(tiny_model, off)
    for t, total, n in zip(off, sums, counts, strict=True):
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([t.input_ids])).logits[0].double()
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(t.input_ids[1:]), reduction="none")
        targets = torch.tensor(t.trained[1:])
        assert n == int(targets.sum()) and n < sum(x.num_trained for x in on if x.input_ids == t.input_ids)
        assert total == pytest.approx(float(nll[targets].sum()), rel=1e-4)


# ------------------------------------------------------------------------------------ data stats --template


@pytest.fixture()
def gemma_vocab_dir(tiny_model_dir, tmp_path, tokenizer):
    """The tiny model's tokenizer with Gemma's turn tokens added (so template: gemma fits it)."""
    folder = tmp_path / "gemma-vocab"
    shutil.copytree(tiny_model_dir, folder)
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.save_pretrained(folder)
    return folder


def test_stats_with_template_count_the_tokens_training_trains_on(gemma_vocab_dir, tmp_path, capsys):
    from tuneforge.cli import main
    from tuneforge.data.curation.stats import compute_stats
    from tuneforge.data.dataset import load_examples, tokenize_examples
    from tuneforge.data.settings import DataConfig
    from tuneforge.data.templates import apply_template
    from tuneforge.models.loading import load_tokenizer

    rows = [{"prompt": f"Ticket {i}: {'charged twice ' * (i % 3 + 1)}", "completion": ["billing", "shipping"][i % 2]}
            for i in range(12)] + [{"messages": PLAIN}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=str(data), val_fraction=0.0)
    tok = load_tokenizer(gemma_vocab_dir)
    apply_template(tok, "gemma", str(gemma_vocab_dir))
    trained, _ = tokenize_examples(load_examples(str(data), cfg), tok, cfg, [])
    stats = compute_stats(data, model=str(gemma_vocab_dir), template="gemma")
    assert sorted(stats.lengths.tolist()) == sorted(len(t) for t in trained)
    assert (stats.tokens, stats.trained_tokens) == (sum(len(t) for t in trained), sum(t.num_trained for t in trained))
    plain = compute_stats(data, model=str(gemma_vocab_dir))          # the tokenizer's own (ChatML) counts otherwise
    assert plain.trained_tokens is None and sorted(plain.lengths.tolist()) != sorted(stats.lengths.tolist())
    assert main(["data", "stats", str(data), "--model", str(gemma_vocab_dir), "--template", "gemma",
                 "--out", str(tmp_path)]) == 0
    assert f"trained tokens: {stats.trained_tokens} of {stats.tokens}" in capsys.readouterr().out
    # a template the vocabulary cannot write is refused, as training refuses it
    assert main(["data", "stats", str(data), "--model", str(gemma_vocab_dir), "--template", "llama3",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "template: llama3 writes <|start_header_id|>" in err[0]
    assert main(["data", "stats", str(data), "--template", "gemma", "--template-kwargs", "[1]"]) == 2
    assert "--template-kwargs must be a mapping" in capsys.readouterr().err
