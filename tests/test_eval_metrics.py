"""Each generation metric against hand-computed values; bootstrap intervals against known distributions."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest

from tuneforge.evaluation import bootstrap, metrics


def test_exact_and_normalised_match():
    assert metrics.exact(" billing\n", "billing") == 1.0
    assert metrics.exact("Billing", "billing") == 0.0
    assert metrics.normalised("The Billing!", "billing") == 1.0
    assert metrics.normalised("an  apple, please", "apple please") == 1.0
    assert metrics.normalised("billing queue", "billing") == 0.0


def test_token_f1_by_hand():
    # normalised: "cat sat" vs "cat sat down": 2 common, P = 1, R = 2/3, F1 = 2 * (2/3) / (5/3) = 0.8
    assert metrics.token_f1("The cat sat", "a cat sat down") == pytest.approx(0.8)
    # multiset overlap: "a a b" vs "a b b" -> tokens (a, a, b) / (a, b, b): common a + b = 2, P = R = 2/3
    assert metrics.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("", "x") == 0.0
    assert metrics.token_f1("q", "r") == 0.0


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat on the mat" is 5 tokens: P = 5/6, R = 1, F = 10/11
    assert metrics.rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert metrics.rouge_l("a b c", "d e f") == 0.0


def test_chrf_by_hand():
    # "abcdefg" vs "abcdefh": order n has 8-n n-grams each side, 7-n of them shared, so P = R = (7-n)/(8-n);
    # chrF averages the six orders: (6/7 + 5/6 + 4/5 + 3/4 + 2/3 + 1/2) / 6
    expected = sum((7 - n) / (8 - n) for n in range(1, 7)) / 6
    assert metrics.chrf("abcdefg", "abcdefh") == pytest.approx(expected, abs=1e-6)
    assert metrics.chrf("same text", "same text") == pytest.approx(1.0)


def test_json_and_schema_and_regex():
    assert metrics.json_valid('{"a": 1}') == 1.0
    assert metrics.json_valid('```json\n{"a": 1}\n```') == 1.0
    assert metrics.json_valid("{a: 1}") == 0.0
    schema_valid = metrics.schema_valid_metric({"type": "object", "required": ["queue"],
                                                "properties": {"queue": {"enum": ["billing", "bug"]}}})
    assert schema_valid('{"queue": "bug"}') == 1.0
    assert schema_valid('{"queue": "refund"}') == 0.0
    assert schema_valid("not json") == 0.0
    with pytest.raises(metrics.MetricError, match="not a valid JSON Schema"):
        metrics.check_schema({"type": "no-such-type"})
    regex = metrics.regex_metric(r"[a-z]+")
    assert regex(" billing ") == 1.0 and regex("billing 2") == 0.0
    with pytest.raises(metrics.MetricError, match="eval.regex"):
        metrics.regex_metric("(")


def test_user_metric_is_imported_by_module_and_function(monkeypatch):
    module = types.ModuleType("my_eval_metrics")
    module.length_ratio = lambda p, r: len(p) / len(r)
    monkeypatch.setitem(sys.modules, "my_eval_metrics", module)
    fn = metrics.user_metric("my_eval_metrics:length_ratio")
    assert fn("ab", "abcd") == 0.5
    with pytest.raises(metrics.MetricError, match="module:function"):
        metrics.user_metric("no_colon")
    with pytest.raises(metrics.MetricError, match="cannot import"):
        metrics.user_metric("my_eval_metrics:missing")


def test_label_accuracy_and_confusion_by_hand():
    labels = ["billing", "bug"]
    preds = ["Billing.", "bug", "bug", "I'm sorry, I can't"]
    refs = ["billing", "billing", "bug", "bug"]
    scored = metrics.MetricSet.build(labels=labels).score(preds, refs)
    assert scored["label"] == [1.0, 0.0, 1.0, 0.0]
    assert scored["valid_label"] == [1.0, 1.0, 1.0, 0.0]
    table = metrics.confusion(preds, refs, labels)
    assert table == {"billing": {"billing": 1, "bug": 1, "(other)": 0}, "bug": {"billing": 0, "bug": 1, "(other)": 1}}
    pl = metrics.per_label(table)
    assert pl["bug"]["precision"] == pytest.approx(0.5) and pl["bug"]["recall"] == pytest.approx(0.5)
    assert pl["billing"]["precision"] == 1.0 and pl["billing"]["recall"] == 0.5


def test_label_named_finds_the_one_label_an_answer_names_in_any_wording():
    labels = ["positive", "negative", "feature request"]
    preds = ["This review is negative.", "Positive", "positive, not negative", "The positives outweigh it",
             "It is a Feature Request!", "no idea", "NEGATIVE"]
    refs = ["negative", "positive", "positive", "positive", "feature request", "negative", "positive"]
    scored = metrics.MetricSet.build(labels=labels).score(preds, refs)
    assert scored["label_named"] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]   # two labels named -> neither; whole words
    assert scored["label"] == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_bootstrap_interval_of_a_bernoulli_mean_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(2000) < 0.3).astype(float)
    iv = bootstrap.interval(x, resamples=4000)
    half = 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / x.size)     # ~0.020
    assert iv.value == pytest.approx(x.mean())
    assert iv.high - iv.value == pytest.approx(half, rel=0.15)
    assert iv.value - iv.low == pytest.approx(half, rel=0.15)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    trials, covered = 300, 0
    for t in range(trials):
        sample = rng.exponential(1.0, size=200)          # true mean 1.0
        iv = bootstrap.interval(sample, resamples=500, seed=t)
        covered += iv.low <= 1.0 <= iv.high
    assert 0.90 <= covered / trials <= 0.99


def test_constant_values_give_a_zero_width_interval():
    iv = bootstrap.interval([1.0] * 50)
    assert (iv.value, iv.low, iv.high) == (1.0, 1.0, 1.0)


def test_ratio_interval_is_the_token_weighted_mean():
    iv = bootstrap.ratio_interval([2.0, 10.0], [1, 4])
    assert iv.value == pytest.approx(12 / 5)
    assert 2.0 <= iv.low <= iv.high <= 2.5


def test_paired_bootstrap_against_a_known_difference():
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, 1000)
    # the pairing removes the shared noise: a - b ~ N(0.1, 0.1^2) per example -> se = 0.1 / sqrt(1000)
    tuned = base + 0.1 + rng.normal(0, 0.1, 1000)
    paired = bootstrap.paired_interval(tuned, base, resamples=2000)
    diff = tuned - base
    assert paired.value == pytest.approx(diff.mean())
    se = diff.std() / math.sqrt(diff.size)
    assert paired.high - paired.low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert paired.p_not_better == 0.0
    # unpaired intervals of the same data overlap: only the paired test separates them
    assert bootstrap.interval(tuned).overlaps(bootstrap.interval(base))
    same = bootstrap.paired_interval(base, base)
    assert (same.value, same.low, same.high, same.p_not_better) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same examples"):
        bootstrap.paired_interval([1.0], [1.0, 2.0])
