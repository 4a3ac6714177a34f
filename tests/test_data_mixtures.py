"""Mixtures (``data.train`` as a list of sources): what each source gives an epoch (weights, epochs), a draw that is a
pure function of (seed, epoch), exact resume, per-source counts in metrics and run.json, per-source validation loss,
each source cached on its own, one-line errors, and the one-file form unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from conftest import Killed, crash_after_checkpoint, write_jsonl
from tuneforge.config import load_config
from tuneforge.data.dataset import prepare_data
from tuneforge.data.mixture import Mixture, MixtureSource, examples_per_epoch
from tuneforge.data.settings import SourceConfig
from tuneforge.errors import ConfigError
from tuneforge.training.trainer import TrainingRecipe, train

TICKETS = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
            "completion": ["billing", "shipping", "login"][i % 3]} for i in range(16)]
GENERAL = [{"instruction": f"Name a colour number {i}.", "output": ["red", "green", "blue", "amber"][i % 4]}
           for i in range(40)]


def _sources(*specs: dict) -> list[SourceConfig]:
    return [SourceConfig(**s) for s in specs]


# ------------------------------------------------------------------------------------- what an epoch holds


def test_weights_alone_make_an_epoch_one_pass_over_the_first_source():
    # shares 0.8 / 0.2 of an epoch of 1000 / 0.8 = 1250 examples: mine once, general 250 of its 100000
    sources = _sources({"path": "mine.jsonl", "weight": 4}, {"path": "general.jsonl", "weight": 1})
    assert examples_per_epoch(sources, [1000, 100_000]) == [1000, 250]
    # a small general set is repeated to reach its share: 1000 / 0.5 = 2000 examples, general's 30 about 33 times
    sources = _sources({"path": "mine.jsonl", "weight": 1}, {"path": "general.jsonl", "weight": 1})
    assert examples_per_epoch(sources, [1000, 30]) == [1000, 1000]
    # a zero weight leaves a source out; the anchor is the first with a positive weight
    sources = _sources({"path": "off.jsonl", "weight": 0}, {"path": "a.jsonl", "weight": 3},
                       {"path": "b.jsonl", "weight": 1})
    assert examples_per_epoch(sources, [50, 300, 7]) == [0, 300, 100]


def test_epochs_repeat_or_subsample_and_weights_beside_them_are_shares_of_the_whole_epoch():
    sources = _sources({"path": "a.jsonl", "epochs": 2}, {"path": "b.jsonl", "epochs": 0.25}, {"path": "c.jsonl"})
    assert examples_per_epoch(sources, [10, 40, 7]) == [20, 10, 7]            # no weight nor epochs: epochs 1
    # 0.2 of the epoch from general, the rest (100 examples, 0.8) from mine's one pass: 125 in all
    sources = _sources({"path": "mine.jsonl", "epochs": 1}, {"path": "general.jsonl", "weight": 0.2})
    assert examples_per_epoch(sources, [100, 5000]) == [100, 25]


def _mixture(sizes, counts):
    sources, start = [], 0
    for k, (n, c) in enumerate(zip(sizes, counts, strict=True)):
        sources.append(MixtureSource(f"s{k}", f"s{k}.jsonl", None, None, start, n, 0, 0, c))
        start += n
    return Mixture(sources)


def test_an_epoch_draws_exactly_each_sources_count_full_passes_then_a_sample_without_repeats():
    mixture = _mixture([10, 40, 7], [25, 10, 7])
    draw = mixture.epoch_indices(seed=3, epoch=0)
    per_source = Counter(mixture.source_of(i) for i in draw)
    assert per_source == {0: 25, 1: 10, 2: 7} and len(draw) == mixture.epoch_length == 42
    first = Counter(i for i in draw if i < 10)
    assert sorted(first.values()) == [2] * 5 + [3] * 5             # two full passes and 5 more, each once
    second = [i for i in draw if 10 <= i < 50]
    assert len(set(second)) == 10                                     # a quarter of b, no example twice
    assert set(i for i in draw if i >= 50) == set(range(50, 57))


def test_the_draw_is_a_pure_function_of_seed_and_epoch():
    mixture = _mixture([10, 40], [5, 30])
    assert mixture.epoch_indices(1, 4) == _mixture([10, 40], [5, 30]).epoch_indices(1, 4)
    assert mixture.epoch_indices(1, 4) != mixture.epoch_indices(1, 5)    # another subsample each epoch
    assert mixture.epoch_indices(1, 4) != mixture.epoch_indices(2, 4)
    seen = set()
    for epoch in range(40):                                           # fractional epochs reach every example
        seen |= {i for i in mixture.epoch_indices(1, epoch) if i < 10}
    assert seen == set(range(10))


# ------------------------------------------------------------------------------------------------- bad input


@pytest.fixture()
def files(tmp_path):
    return (write_jsonl(tmp_path / "tickets.jsonl", TICKETS), write_jsonl(tmp_path / "general.jsonl", GENERAL))


def _config(tiny_model_dir, train_sources, out, **more):
    settings = {"model": str(tiny_model_dir), "data": {"train": train_sources, "val_fraction": 0.25},
                "output_dir": str(out), "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
                "progress": False, "seed": 5, "keep_best": False, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}
    settings.update(more)
    return settings


@pytest.mark.parametrize("sources, message", [
    ([{"path": "T", "weight": -1}, {"path": "G", "weight": 1}],
     r"'data\.train': source 1 \(tickets\): weight must be a number >= 0 \(got -1\)"),
    ([{"path": "T", "weight": 0}, {"path": "G", "weight": 0}],
     r"'data\.train': the weights of tickets, general sum to 0"),
    ([{"path": "T", "weight": 1, "epochs": 2}, {"path": "G"}],
     r"source 1 \(tickets\): give weight or epochs, not both"),
    ([{"path": "T", "epochs": 0}, {"path": "G"}], r"source 1 \(tickets\): epochs must be a number > 0"),
    ([{"path": "T"}, {"path": "G", "weight": 1}], r"weights are shares of the whole epoch and must sum to less than 1"),
    ([{"path": "T"}, {"path": "T"}], r"source 2 \(tickets\): the name 'tickets' is source 1's too"),
    ([{"path": "T"}, {"path": "missing.jsonl", "weight": None}],
     r"'data\.train' source 2 \(missing\): path: file or folder 'missing\.jsonl' not found"),
    ([{"path": "T", "validation": "nope.jsonl"}], r"source 1 \(tickets\): validation: file 'nope\.jsonl' not found"),
])
def test_bad_mixtures_are_one_line_naming_the_source_or_key(tiny_model_dir, files, tmp_path, sources, message):
    paths = {"T": str(files[0]), "G": str(files[1])}
    given = [{**s, "path": paths.get(s["path"], s["path"])} for s in sources]
    with pytest.raises(ConfigError, match=message) as err:
        load_config(data=_config(tiny_model_dir, given, tmp_path / "run"))
    assert "\n" not in str(err.value)


def test_a_mixture_with_another_task_or_a_shared_validation_file_is_refused(tiny_model_dir, files, tmp_path):
    sources = [{"path": str(files[0])}, {"path": str(files[1])}]
    with pytest.raises(ConfigError, match=r"a mixture\) trains task sft or pretrain; task 'preference'"):
        load_config(data=_config(tiny_model_dir, sources, tmp_path / "run", task="preference"))
    settings = _config(tiny_model_dir, sources, tmp_path / "run")
    settings["data"]["validation"] = str(files[0])
    with pytest.raises(ConfigError, match=r"give each source its own validation file"):
        load_config(data=settings)


def test_the_cli_says_a_bad_mixture_in_one_line_and_exits_2(tiny_model_dir, files, tmp_path):
    config = tmp_path / "mix.yaml"
    config.write_text(json.dumps(_config(tiny_model_dir, [{"path": str(files[0]), "weight": -0.5},
                                                          {"path": str(files[1]), "weight": 1}], tmp_path / "run")))
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(config)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "source 1 (tickets): weight must be a number >= 0 (got -0.5)" in errors[0]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------- preparing data


def test_each_source_is_cached_on_its_own_so_a_new_weight_does_not_tokenize_again(
        tiny_model_dir, tokenizer, files, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TUNEFORGE_NO_CACHE", raising=False)
    import tuneforge.data.dataset as dataset

    calls = []
    original = dataset._prepare
    monkeypatch.setattr(dataset, "_prepare", lambda cfg, *a: calls.append(cfg.train) or original(cfg, *a))
    for weight in (1.0, 3.0):
        config = load_config(data=_config(tiny_model_dir, [{"path": str(files[0]), "weight": weight},
                                                           {"path": str(files[1]), "weight": 1}], tmp_path / "r"))
        data = prepare_data(config.data, tokenizer, config.seed)
        assert data.mixture is not None and data.mixture.names == ["tickets", "general"]
    assert calls == [str(files[0]), str(files[1])]                   # tokenized once each, for the first weight
    assert [s.per_epoch for s in data.mixture.sources] == [12, 4]      # 12 tickets once; 1/4 of the epoch general
    # the one-file form: the very cache entry a mixture's source has (same key), and the same examples
    one = load_config(data=_config(tiny_model_dir, str(files[0]), tmp_path / "r"))
    alone = prepare_data(one.data, tokenizer, one.seed)
    assert len(calls) == 2
    first = data.mixture.sources[0]
    assert [e.input_ids for e in alone.train] == [e.input_ids for e in data.train[:first.size]]
    assert [e.input_ids for e in alone.validation] == [e.input_ids for e in data.validation[:first.val_size]]
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.pt"))) == 2


def test_a_source_may_be_a_folder_have_its_own_validation_file_and_its_rejects_are_kept(
        tiny_model_dir, tokenizer, files, tmp_path):
    folder = tmp_path / "general_parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", GENERAL[:20])
    write_jsonl(folder / "b.jsonl", [*GENERAL[20:], "{not json"])
    (folder / "notes.txt").write_text("not data")
    held_out = write_jsonl(tmp_path / "tickets_val.jsonl", TICKETS[:5])
    config = load_config(data=_config(tiny_model_dir, [{"path": str(files[0]), "validation": str(held_out)},
                                                       {"path": str(folder)}], tmp_path / "r"))
    data = prepare_data(config.data, tokenizer, config.seed, use_cache=False)
    assert data.mixture is not None
    tickets, general = data.mixture.sources
    assert (tickets.size, tickets.val_size) == (16, 5)                  # its own validation file: no split
    assert general.name == "general_parts" and (general.size, general.val_size) == (30, 10)
    assert [(r.source, r.line, r.reasons[0].check) for r in data.rejects] == [(str(folder / "b.jsonl"), 21,
                                                                               "not_json")]


# ----------------------------------------------------------------------------------------------- training


STEPS = 6


def _mix_settings(tiny_model_dir, files, out):
    # tickets 12 train (4 validation) as the anchor with weight 3, general (30 train) weight 1: 16 an epoch, 4
    # micro-batches of 4; 6 steps of 1 micro-batch cross an epoch boundary
    return _config(tiny_model_dir, [{"path": str(files[0]), "weight": 3}, {"path": str(files[1]), "weight": 1}],
                   out, max_steps=STEPS, eval_every=3, save_every=1)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_mixture_run_counts_each_source_in_metrics_and_run_json_and_validates_each(
        tiny_model_dir, files, tmp_path):
    out = tmp_path / "mix"
    config = load_config(data=_mix_settings(tiny_model_dir, files, out))
    recipe = TrainingRecipe(config)
    recipe.setup()
    data = recipe.data
    assert data.mixture is not None and data.epoch_length == 16 and recipe.steps == STEPS
    # what the run must draw: the shuffled order of each epoch's draw, 4 examples a step
    expected: Counter = Counter()
    for epoch in range(2):
        from tuneforge.data.packing import epoch_order

        view = data.mixture.epoch_indices(config.seed, epoch)
        for ids in list(epoch_order(len(view), 4, config.seed, epoch))[: 4 if epoch == 0 else 2]:
            expected.update(data.mixture.sources[data.mixture.source_of(view[i])].name for i in ids)
    recipe.fit()
    recipe.finish()
    rows = _rows(out)
    last = rows[-1]
    assert {k: last[f"examples_seen/{k}"] for k in ("tickets", "general")} == dict(expected)
    assert sum(expected.values()) == STEPS * 4
    # the first epoch drew its share exactly: 12 tickets and 4 general examples
    assert rows[3]["examples_seen/tickets"] == 12 and rows[3]["examples_seen/general"] == 4
    record = json.loads((out / "run.json").read_text())
    sources = {s["name"]: s for s in record["sources"]}
    assert sources["tickets"]["examples_seen"] == expected["tickets"] and sources["tickets"]["weight"] == 3
    assert sources["general"]["examples_per_epoch"] == 4 and sources["general"]["train_examples"] == 30
    assert sum(s["tokens_seen"] for s in sources.values()) == record["train_tokens_seen"]
    assert [d["path"] for d in record["data"]] == [str(files[0]), str(files[1])]
    # validation per source; the whole is the token-weighted mean of the sources'
    evals = [r for r in rows if "eval_loss" in r]
    assert evals
    tokens = {name: sum(b.num_loss_tokens for b in batches) for name, batches in recipe.val_sources}
    for r in evals:
        whole = sum(r[f"eval_loss/{n}"] * t for n, t in tokens.items()) / sum(tokens.values())
        assert r["eval_loss"] == pytest.approx(whole, rel=1e-5)
        assert r["eval_loss/tickets"] != r["eval_loss/general"]
    # and the whole equals one pass over every validation batch, as a one-file run computes it
    from tuneforge.methods.loss import evaluate_loss

    direct = evaluate_loss(recipe.model, recipe.val_batches, recipe.device, config.method)
    assert evals[-1]["eval_loss"] == pytest.approx(direct, rel=1e-4)



def test_a_resumed_mixture_run_is_bitwise_the_uninterrupted_one(tiny_model_dir, files, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(load_config(data=_mix_settings(tiny_model_dir, files, whole)))
    out = tmp_path / "resumed"
    config = load_config(data=_mix_settings(tiny_model_dir, files, out))
    crash = crash_after_checkpoint(3)

    with monkeypatch.context() as m:
        m.setattr(TrainingRecipe, "save_checkpoint", crash)
        with pytest.raises(Killed):
            train(config)
    train(load_config(data=_mix_settings(tiny_model_dir, files, out)), resume=True)
    a, b = _rows(whole), _rows(out)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    timing = {"tokens_per_s", "avg_tokens_per_s", "elapsed_s", "eval_seconds"}
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}
        assert any(k.startswith("examples_seen/") for k in ra)
    wa, wb = load_file(whole / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = json.loads((whole / "run.json").read_text()), json.loads((out / "run.json").read_text())
    assert ra["sources"] == rb["sources"]
    # a changed weight is another run: refused
    changed = _mix_settings(tiny_model_dir, files, out)
    changed["data"]["train"][1]["weight"] = 2
    from tuneforge.training.trainer import ResumeError

    with pytest.raises(ResumeError, match=r"different data\.train"):
        train(load_config(data=changed), resume=True)


# ------------------------------------------------------------------------------------------- data stats


def test_data_stats_on_a_run_config_shows_what_each_source_gives_an_epoch(tiny_model_dir, tokenizer, files, tmp_path,
                                                                          capsys):
    from tuneforge.cli import main

    settings = _config(tiny_model_dir, [{"path": str(files[0]), "weight": 3}, {"path": str(files[1]), "weight": 1}],
                       tmp_path / "r")
    config = tmp_path / "mix.yaml"
    config.write_text(json.dumps(settings))
    assert main(["data", "stats", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {s["name"]: s for s in report["sources"]}
    assert [by_name[n]["epoch_examples"] for n in ("tickets", "general")] == [12, 4]
    # the tokens counted are those of the examples training draws in its first epoch
    data = prepare_data(load_config(config).data, tokenizer, 5)
    assert data.mixture is not None
    draw = data.mixture.epoch_indices(5, 0)
    general = [i for i in draw if data.mixture.source_of(i) == 1]
    assert by_name["general"]["epoch_tokens"] == sum(len(data.train[i]) for i in general)
    assert report["epoch_tokens"] == sum(len(data.train[i]) for i in draw)
    tickets = by_name["tickets"]
    assert tickets["token_share"] == pytest.approx(tickets["epoch_tokens"] / report["epoch_tokens"])
    assert main(["data", "stats", str(config)]) == 0
    table = capsys.readouterr().out
    assert "tickets" in table and "general" in table and "epoch tokens" in table


def test_the_evaluation_report_shows_held_out_loss_per_source(tiny_model_dir, files, tmp_path):
    from tuneforge.evaluation.api import evaluate

    out = tmp_path / "mix"
    settings = _config(tiny_model_dir, [{"path": str(files[0]), "weight": 3}, {"path": str(files[1]), "weight": 1}],
                       out, max_steps=2)
    train(load_config(data=settings))
    test = write_jsonl(tmp_path / "test.jsonl", TICKETS[:3])
    result = evaluate(out, data=str(test), columns=["tuned"], max_examples=3, max_new_tokens=4, progress=False,
                      out=tmp_path / "eval")
    sources = result.report["sources"]
    assert list(sources) == ["tickets", "general"]
    assert sources["tickets"]["n"] == 4 and sources["general"]["n"] == 10      # val_fraction 0.25 of 16 and 40
    for entry in sources.values():
        assert entry["tuned"]["loss"]["value"] > 0 and entry["base"]["tokens"] == entry["tuned"]["tokens"]
    assert sources["tickets"]["tuned"]["loss"]["value"] != sources["general"]["tuned"]["loss"]["value"]
    # the tuned model's loss on each source is what training's last validation measured on the same examples
    last = [r for r in _rows(out) if "eval_loss" in r][-1]
    for name, entry in sources.items():
        assert entry["tuned"]["loss"]["value"] == pytest.approx(last[f"eval_loss/{name}"], rel=1e-4)
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "## Sources" in markdown and "| general |" in markdown
    assert "<h2>Sources</h2>" in (tmp_path / "eval" / "report.html").read_text()
