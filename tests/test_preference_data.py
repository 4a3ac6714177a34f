"""Preference data: the record shapes we read (prompt/chosen/rejected strings or messages, whole HH dialogues,
UltraFeedback message lists), rendering through SFT's chat-template path with only the final answer trained,
and every unusable pair rejected with its file, line and reason."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from tuneforge.cli import main
from tuneforge.data.dataset import DataError
from tuneforge.data.formats import Example, RecordError
from tuneforge.data.preference import (
    hh_turns,
    load_pairs,
    prepare_pairs,
    split_hh,
    to_preference,
    tokenize_pair,
)
from tuneforge.data.preview import preview_pairs
from tuneforge.data.rendering import tokenize_example
from tuneforge.data.settings import DataConfig

HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_test.jsonl.gz"


def _answer_text(tok, tokenizer) -> str:
    return tokenizer.decode([t for t, m in zip(tok.input_ids, tok.trained, strict=True) if m])


def test_hh_split_is_at_the_last_assistant_turn_not_the_common_prefix():
    chosen = "\n\nHuman: What colour is the sky?\n\nAssistant: It is blue"
    rejected = "\n\nHuman: What colour is the sky?\n\nAssistant: It is black"
    prompt, c, r = split_hh(chosen, rejected)
    assert prompt == [{"role": "user", "content": "What colour is the sky?"}]
    assert (c, r) == ("It is blue", "It is black")          # not prompt "... It is bl" + "ue" / "ack"


def test_hh_multi_turn_dialogue_keeps_earlier_turns_in_the_prompt():
    head = "\n\nHuman: hi\n\nAssistant: Hello! How can I help?\n\nHuman: a joke please"
    example = to_preference({"chosen": head + "\n\nAssistant: Why did the chicken...",
                             "rejected": head + "\n\nAssistant: No."})
    assert [m["role"] for m in example.prompt] == ["user", "assistant", "user"]
    assert example.prompt[1]["content"] == "Hello! How can I help?"
    assert example.chosen == {"role": "assistant", "content": "Why did the chicken..."}
    assert example.format == "hh_dialogue"


def test_hh_dialogues_that_differ_before_the_last_answer_are_rejected():
    with pytest.raises(RecordError, match="differ before their last") as e:
        split_hh("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y")
    assert e.value.check == "prompt_mismatch"


def test_hh_prompt_string_as_trl_splits_it():
    example = to_preference({"prompt": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: joke?\n\nAssistant:",
                             "chosen": " Sure: ...", "rejected": " No."})
    assert [m["role"] for m in example.prompt] == ["user", "assistant", "user"]
    assert hh_turns("\n\nHuman: a\n\nAssistant: b") == [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}]


def test_ultrafeedback_message_lists_share_the_conversation():
    conv = [{"role": "user", "content": "Write a haiku"}]
    chosen = conv + [{"role": "assistant", "content": "Autumn moon..."}]
    example = to_preference({"prompt": "Write a haiku", "chosen": chosen,       # ultrafeedback_binarized's fields
                             "rejected": conv + [{"role": "assistant", "content": "No."}], "messages": chosen,
                             "score_chosen": 8.0, "score_rejected": 3.0})
    assert example.prompt == conv and example.chosen["content"] == "Autumn moon..."
    assert example.format == "preference_messages"


def test_conversational_prompt_with_answer_only_lists():
    example = to_preference({"prompt": [{"role": "user", "content": "Hi"}],
                             "chosen": [{"role": "assistant", "content": "Hello!"}],
                             "rejected": [{"role": "assistant", "content": "What."}]})
    assert example.prompt == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("record, check", [
    ({"prompt": "q", "chosen": "a"}, "missing_field"),
    ({"prompt": "q", "rejected": "a"}, "missing_field"),
    ({"chosen": "a", "rejected": "b"}, "missing_field"),                    # no prompt and not a dialogue
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical_pair"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty_answer"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty_answer"),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "wrong_type"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "prompt_mismatch"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}, "turn_order"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "empty_answer"),
])
def test_unusable_records_name_the_reason(record, check):
    with pytest.raises(RecordError) as e:
        to_preference(record)
    assert e.value.check == check


def test_rendering_is_sfts_with_only_the_final_answer_trained_and_no_doubled_special_tokens(tokenizer):
    example = to_preference({"chosen": "\n\nHuman: hi\n\nAssistant: Hello!\n\nHuman: colour?\n\nAssistant: Blue.",
                             "rejected": "\n\nHuman: hi\n\nAssistant: Hello!\n\nHuman: colour?\n\nAssistant: Red."})
    pair, truncated = tokenize_pair(example, tokenizer, DataConfig(train="x.jsonl"))
    assert not truncated
    for side, answer in ((pair.chosen, "Blue."), (pair.rejected, "Red.")):
        assert _answer_text(side, tokenizer) == answer + "<|im_end|>"      # earlier assistant turn is context
        sft = tokenize_example(Example(messages=example.prompt + [{"role": "assistant", "content": answer}]),
                               tokenizer)
        assert side.input_ids == sft.input_ids                               # the SFT rendering, token for token
        text = tokenizer.decode(side.input_ids)
        # SmolLM2's template adds its default system turn: 5 turns, each opened and closed once
        assert text.count("<|im_start|>") == text.count("<|im_end|>") == 5
        assert text.endswith(answer + "<|im_end|>\n")
        assert side.input_ids[0] != side.input_ids[1]                        # no doubled BOS / <|im_start|>
        if tokenizer.bos_token_id is not None:
            assert side.input_ids[:2].count(tokenizer.bos_token_id) <= 1
    # the two sides share the prompt tokens exactly
    first = pair.chosen.trained.index(True)
    assert pair.chosen.input_ids[:first] == pair.rejected.input_ids[:first]


def test_truncated_away_answer_is_rejected_and_truncation_counted(tokenizer):
    long_prompt = "word " * 200
    cfg = DataConfig(train="x.jsonl", max_length=64, too_long="truncate")
    with pytest.raises(RecordError, match="truncated away") as e:
        tokenize_pair(to_preference({"prompt": long_prompt, "chosen": "a", "rejected": "b"}), tokenizer, cfg)
    assert e.value.check == "no_trained_tokens"
    pair, truncated = tokenize_pair(to_preference({"prompt": "q", "chosen": "long " * 100, "rejected": "b"}),
                                    tokenizer, cfg)
    assert truncated and len(pair.chosen) == 64 and pair.chosen.num_trained > 0
    with pytest.raises(RecordError) as e:
        tokenize_pair(to_preference({"prompt": "q", "chosen": "long " * 100, "rejected": "b"}), tokenizer,
                      DataConfig(train="x.jsonl", max_length=64))
    assert e.value.check == "too_long"


def test_file_with_bad_records_keeps_the_good_ones_and_lists_the_rest(tokenizer, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    rows += [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "a"}, "{not json"]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = prepare_pairs(DataConfig(train=str(path), val_fraction=0.0), tokenizer, seed=0, use_cache=False)
    assert len(data.train) == 4 and not data.validation
    assert [(r.line, r.reasons[0].check) for r in data.rejects] == [(5, "identical_pair"), (6, "missing_field"),
                                                                   (7, "not_json")]
    assert all(r.source == str(path) for r in data.rejects)


def test_zero_usable_pairs_refuses_with_one_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}] * 3)
    with pytest.raises(DataError, match=r"no usable preference pairs \(3 rejected.*:1: identical_pair"):
        prepare_pairs(DataConfig(train=str(path)), tokenizer, seed=0, use_cache=False)


def test_train_cli_refuses_zero_pairs_with_exit_2(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "", "rejected": "x"}] * 2)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntask: preference\noutput_dir: {tmp_path / 'run'}\n"
                      f"data:\n  train: {data}\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable preference pairs" in err[0] and f"{data}:1: empty_answer" in err[0]


@pytest.mark.skipif(not HH_FILE.is_file(), reason="shared HH data not present")
def test_real_hh_file_loads_with_its_mismatched_pairs_rejected(tokenizer):
    loaded = load_pairs(str(HH_FILE), DataConfig(train=str(HH_FILE)))
    with gzip.open(HH_FILE, "rt") as f:
        total = sum(1 for _ in f)
    checks = sorted({r.reasons[0].check for r in loaded.rejects})
    assert len(loaded.examples) + len(loaded.rejects) == total
    assert len(loaded.examples) > 0.99 * total and set(checks) <= {"prompt_mismatch", "empty_answer"}
    example, raw = loaded.examples[0]
    assert raw.data["chosen"].startswith("\n\nHuman:") and example.prompt[0]["role"] == "user"
    assert json.dumps(example.chosen)          # plain data


def test_preview_shows_prompt_and_both_answers(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris.",
                                                "rejected": "Lyon."}])
    text = preview_pairs(str(path), tokenizer, color=False)
    assert "[prompt]" in text and "Capital of France?" in text
    assert "[[Paris.<|im_end|>]]" in text and "[[Lyon.<|im_end|>]]" in text
    assert "1 usable pairs" in text


def test_data_preview_cli_recognises_preference_files(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris.",
                                                "rejected": "Lyon."}])
    assert main(["data", "preview", str(path), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "[chosen]\n[[Paris.<|im_end|>]]" in out and "[rejected]\n[[Lyon.<|im_end|>]]" in out
