"""The ``template:`` key: built-ins, files, ``auto``; the template travels with the run (checkpoints, run.json,
generation, serving); bad input is one line and exit 2 before any weights load; ``trust_remote_code``."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import yaml

from conftest import write_jsonl
from test_template_masks import trained_text
from tuneforge.data.formats import Example
from tuneforge.data.rendering import prompt_ids, tokenize_example
from tuneforge.data.templates import BUILTINS, apply_template, builtin_text
from tuneforge.data.templates.resolve import adds_bos
from tuneforge.errors import ConfigError

TWO_TURNS = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
             {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, since 1871."}]


def with_builtin(tokenizer, name: str):
    """A copy of SmolLM2's tokenizer set to the built-in ``name`` (its special tokens added first: SmolLM2 has only
    ChatML's)."""
    tok = copy.deepcopy(tokenizer)
    if BUILTINS[name].special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(BUILTINS[name].special_tokens)})
    apply_template(tok, name, "smollm2")
    return tok


# ------------------------------------------------------------------------------------------ built-ins


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_each_builtin_trains_exactly_the_answers_and_their_end_marker(tokenizer, name):
    tok = with_builtin(tokenizer, name)
    end = BUILTINS[name].end_of_turn
    end = tok.eos_token if end == "eos_token" else end
    lead = " " if name == "base" else ""        # "Assistant: Paris": the token " Paris" holds the separator space
    result = tokenize_example(Example(messages=TWO_TURNS), tok)
    assert trained_text(result, tok) == f"{lead}Paris{end}|{lead}Rome, since 1871.{end}|"
    # the inference prompt is exactly the text before the last answer, and none of the new turn is trained
    # (llama3's "\n\n" before the answer merges into one token in SmolLM2's BPE at the prompt's end)
    if name != "llama3":
        prompt = prompt_ids(tok, TWO_TURNS[:-1])
        assert result.input_ids[:len(prompt)] == prompt and result.trained[len(prompt)]
        assert trained_text(type(result)(prompt, result.trained[:len(prompt)]), tok) == f"{lead}Paris{end}|"


LLAMA3_CONVERSATIONS = [
    TWO_TURNS,
    [{"role": "system", "content": "  Be brief. "}, *TWO_TURNS],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": " ok\n"}],
]


@pytest.mark.parametrize("kwargs", [{}, {"date_string": "04 Dec 2026"}])
@pytest.mark.parametrize("generation", [False, True])
@pytest.mark.parametrize("conversation", range(len(LLAMA3_CONVERSATIONS)))
def test_llama3_builtin_renders_the_official_llama_3_2_template_token_for_token(tokenizer, conversation, generation,
                                                                                  kwargs):
    """Against meta-llama/Llama-3.2-3B-Instruct's template (tests/fixtures/chat_templates/llama3.jinja), with the
    date fixed as the built-in fixes it ("26 Jul 2024", or the run's ``template_kwargs`` date_string): the official
    one renders today's date under transformers (``strftime_now``), so the date is always passed here."""
    from test_template_masks import fixture, with_template

    messages = LLAMA3_CONVERSATIONS[conversation]
    ours = with_builtin(tokenizer, "llama3")
    official = with_template(tokenizer, fixture("llama3"), list(BUILTINS["llama3"].special_tokens))
    date = {"date_string": kwargs.get("date_string", "26 Jul 2024")}
    want = official.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **date)
    got = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)
    # the built-ins write BOS only for a tokenizer that adds one (SmolLM2's does not): the rest is compared
    assert want.startswith(official.bos_token) and not got.startswith(ours.bos_token)
    want = want[len(official.bos_token):]
    assert got == want
    assert ours(got, add_special_tokens=False)["input_ids"] == official(want, add_special_tokens=False)["input_ids"]
    assert f"Cutting Knowledge Date: December 2023\nToday Date: {date['date_string']}\n\n" in got


def test_alpaca_is_the_classic_prompt_and_base_is_plain_text(tokenizer):
    alpaca = with_builtin(tokenizer, "alpaca").apply_chat_template(TWO_TURNS[:2], tokenize=False)
    assert alpaca == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      "the request.\n\n### Instruction:\nCapital of France?\n\n### Response:\nParis<|im_end|>\n\n")
    base = with_builtin(tokenizer, "base").apply_chat_template(TWO_TURNS[:1], tokenize=False,
                                                                add_generation_prompt=True)
    assert base == "User: Capital of France?\n\nAssistant:"


def test_builtins_start_with_bos_only_for_tokenizers_that_add_one(tokenizer):
    class AddsBos:                            # a Llama/Gemma-like tokenizer: every text starts with BOS (id 1)
        bos_token_id = 1

        def __call__(self, text, **kwargs):
            return {"input_ids": [1, 99]}

    assert adds_bos(AddsBos()) and not adds_bos(tokenizer)          # SmolLM2 starts texts without BOS
    for name in BUILTINS:
        assert ("bos_token" in builtin_text(name, with_bos=True)) == (name not in ("chatml", "phi3")), name
        assert "bos_token" not in builtin_text(name, with_bos=False), name
    assert not with_builtin(tokenizer, "alpaca").chat_template.count("bos_token")


def test_reasoning_content_renders_in_a_think_block_and_is_trained_as_asked(tokenizer):
    tok = with_builtin(tokenizer, "alpaca")
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]
    on = trained_text(tokenize_example(Example(messages=messages), tok), tok)
    off = trained_text(tokenize_example(Example(messages=messages), tok, train_reasoning=False), tok)
    assert on == "<think>\nTwo and two.\n</think>\n\n4<|im_end|>|" and off == "4<|im_end|>|"


# ------------------------------------------------------------------------------------------ resolving


def test_auto_keeps_the_tokenizer_template_and_refuses_a_base_model(tokenizer):
    tok = copy.deepcopy(tokenizer)
    own = tok.chat_template
    assert apply_template(tok, "auto", "smollm2").source == "tokenizer" and tok.chat_template == own
    tok.chat_template = None
    with pytest.raises(ConfigError) as e:
        apply_template(tok, "auto", "gemma-3-270m")
    message = str(e.value)
    assert "\n" not in message and "template: auto" in message and "gemma-3-270m" in message
    assert all(name in message for name in BUILTINS)
    assert apply_template(tok, "auto", "gemma-3-270m", needs_chat=False).source == "none"   # pretraining needs none


def test_a_template_whose_tokens_the_vocabulary_lacks_is_refused_in_one_line(tokenizer):
    tok = copy.deepcopy(tokenizer)
    with pytest.raises(ConfigError) as e:
        apply_template(tok, "llama3", "smollm2")
    assert "<|eot_id|>" in str(e.value) and "alpaca or base" in str(e.value) and "\n" not in str(e.value)
    assert tok.chat_template == tokenizer.chat_template                   # unchanged


def _config(model_dir, data, tmp_path, **extra):
    settings = {"model": str(model_dir), "data": {"train": str(data), "val_fraction": 0.0},
                "output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "eval_base": False,
                "progress": False, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture()
def data(tmp_path):
    rows = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late'][i % 2]}",
             "completion": ["billing", "shipping"][i % 2]} for i in range(16)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.fixture()
def base_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with its chat template removed: a base model."""
    folder = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture()
def no_weights(monkeypatch):
    """Fail the test if any weights load."""
    import tuneforge.training.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the bad input was refused")

    monkeypatch.setattr(trainer, "load_base_model", refuse)


def _cli_error(capsys, *argv) -> str:
    from tuneforge.cli import main

    assert main(list(argv)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_unknown_template_name_names_the_closest_builtin(tmp_path, data, tiny_model_dir, capsys):
    error = _cli_error(capsys, "train", str(_config(tiny_model_dir, data, tmp_path, template="chatm")))
    assert "unknown template 'chatm' (did you mean 'chatml'?)" in error and "alpaca" in error


def test_a_template_file_that_does_not_parse_is_named_with_its_line(tmp_path, data, tiny_model_dir, capsys):
    bad = tmp_path / "mine.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }}\n{% if %}\n{% endfor %}\n")
    error = _cli_error(capsys, "train", str(_config(tiny_model_dir, data, tmp_path, template=str(bad))))
    assert f"{bad}:3: the template does not parse" in error
    missing = tmp_path / "missing.jinja"
    error = _cli_error(capsys, "train", str(_config(tiny_model_dir, data, tmp_path, template=str(missing))))
    assert "'template': file" in error and "not found" in error


def test_a_base_model_with_template_auto_stops_before_weights_load(tmp_path, data, base_model_dir, capsys,
                                                                   no_weights):
    error = _cli_error(capsys, "train", str(_config(base_model_dir, data, tmp_path)))
    assert "template: auto" in error and "no chat template" in error and "alpaca" in error


def test_a_template_the_vocabulary_cannot_write_stops_before_weights_load(tmp_path, data, tiny_model_dir, capsys,
                                                                         no_weights):
    error = _cli_error(capsys, "train", str(_config(tiny_model_dir, data, tmp_path, template="gemma")))
    assert "template: gemma writes <start_of_turn>, <end_of_turn>" in error


def test_a_template_file_trains_and_is_saved(tmp_path, data, tiny_model_dir):
    from tuneforge.config import load_config
    from tuneforge.training.trainer import train

    mine = tmp_path / "templates" / "mine.jinja"
    mine.parent.mkdir()
    mine.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    result = train(load_config(_config(tiny_model_dir, data, tmp_path, template="templates/mine.jinja")))
    assert (result.run_dir / "chat_template.jinja").read_text() == mine.read_text()
    record = json.loads((result.run_dir / "run.json").read_text())["template"]
    assert record["source"] == "file" and record["name"] == str(mine)


# ------------------------------------------------------------------------------------------ end to end


def test_alpaca_on_a_base_model_trains_and_the_run_carries_its_template(tmp_path, data, base_model_dir, monkeypatch):
    """A tokenizer without a chat template, ``template: alpaca``: the run trains, every saved tokenizer (run and
    checkpoints) holds the alpaca template, run.json records it, and generation renders with it."""
    import tuneforge.runs.loading as loading
    from tuneforge.config import load_config
    from tuneforge.runs import load_run
    from tuneforge.training.trainer import train

    result = train(load_config(_config(base_model_dir, data, tmp_path, template="alpaca", save_every=1)))
    alpaca = builtin_text("alpaca", with_bos=False)
    run = result.run_dir
    saved = [run / "chat_template.jinja", *run.glob("checkpoints/*/chat_template.jinja")]
    assert len(saved) >= 2 and all(p.read_text() == alpaca for p in saved)
    record = json.loads((run / "run.json").read_text())
    assert record["template"]["name"] == "alpaca" and record["template"]["source"] == "builtin"
    assert len(record["template"]["sha256"]) == 64 and record["trust_remote_code"] is False
    prompts = []

    def spy(model, config, input_ids, **kwargs):
        prompts.append(loaded.tokenizer.decode(input_ids[0]))
        return input_ids

    loaded = load_run(run, device="cpu")
    monkeypatch.setattr(loading, "method_generate", spy)
    loaded.generate("Where is my parcel?")
    assert prompts == ["Below is an instruction that describes a task. Write a response that appropriately "
                       "completes the request.\n\n### Instruction:\nWhere is my parcel?\n\n### Response:\n"]


def test_serving_renders_each_adapter_with_its_own_template(tmp_path, tokenizer):
    """An adapter trained with alpaca on a base without a chat template: its chats render with alpaca; the bare base
    has none and says so (400), instead of a traceback."""
    from _serve_helpers import save_adapter, tiny_base
    from tuneforge.serving.protocol import APIError
    from tuneforge.serving.server import ServeConfig, Server

    base_tok = copy.deepcopy(tokenizer)
    base_tok.chat_template = None
    adapter = tmp_path / "tickets"
    save_adapter(adapter, "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=1)
    trained_tok = copy.deepcopy(base_tok)
    apply_template(trained_tok, "alpaca")
    trained_tok.save_pretrained(adapter)
    phi = tmp_path / "phi"                  # an adapter whose template ends answers with its own token, <|end|>
    save_adapter(phi, "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=2)
    phi_tok = with_builtin(tokenizer, "phi3")
    phi_tok.save_pretrained(phi)
    end = phi_tok.convert_tokens_to_ids("<|end|>")
    server = Server(ServeConfig(base="tiny", adapters={"tickets": str(adapter), "phi": str(phi)}),
                    model=tiny_base(), tokenizer=base_tok)
    messages = [{"role": "user", "content": "Where is my parcel?"}]
    assert "### Instruction:\nWhere is my parcel?" in tokenizer.decode(server.chat_prompt_ids("tickets", messages))
    assert phi_tok.decode(server.chat_prompt_ids("phi", messages)) == \
        "<|user|>\nWhere is my parcel?<|end|>\n<|assistant|>\n"
    with pytest.raises(APIError) as e:
        server.chat_prompt_ids(None, messages)
    assert e.value.status == 400 and "no chat template" in str(e.value)
    assert {tokenizer.eos_token_id, end} <= server.engine.eos_ids          # answers stop at either template's end


# ------------------------------------------------------------------------------------------ trust_remote_code


@pytest.fixture()
def remote_code_model(tiny_model_dir, tmp_path):
    folder = tmp_path / "remote-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_with_its_own_code_is_refused_without_trust_remote_code(tmp_path, data, remote_code_model, capsys,
                                                                         no_weights):
    error = _cli_error(capsys, "train", str(_config(remote_code_model, data, tmp_path)))
    assert "modeling_custom.CustomForCausalLM" in error and "trust_remote_code: true" in error


def test_trust_remote_code_lets_it_load_with_a_warning(remote_code_model, tiny_model_dir, caplog):
    from tuneforge.config import load_config
    from tuneforge.models.remote_code import check_remote_code

    check_remote_code("plain", tiny_model_dir, trust=False)               # no auto_map: nothing to refuse
    with caplog.at_level(logging.WARNING, logger="tuneforge.models.remote_code"):
        check_remote_code("custom", remote_code_model, trust=True)
    assert "runs Python code shipped with it" in caplog.text
    config = load_config(data={"model": str(remote_code_model), "data": {"train": "x.jsonl"},
                               "trust_remote_code": True}, check_files=False)
    assert config.trust_remote_code is True
    assert load_config(data={"data": {"train": "x.jsonl"}}, check_files=False).trust_remote_code is False


def test_the_token_cache_key_follows_the_chosen_template(tokenizer, data, tmp_path, monkeypatch):
    """Two runs on the same data and tokenizer with other templates tokenize apart (two cache entries, other
    tokens); the same template again is read from the cache."""
    from tuneforge.data.dataset import prepare_data
    from tuneforge.data.settings import DataConfig

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(train=str(data), val_fraction=0.0)
    first = prepare_data(cfg, with_builtin(tokenizer, "alpaca"), seed=0)
    second = prepare_data(cfg, with_builtin(tokenizer, "base"), seed=0)
    assert first.train[0].input_ids != second.train[0].input_ids
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.pt"))) == 2
    assert prepare_data(cfg, with_builtin(tokenizer, "alpaca"), seed=0).train[0].input_ids == first.train[0].input_ids
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.pt"))) == 2
