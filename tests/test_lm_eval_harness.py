"""tuneforge's MMLU cloze scorer gives lm-evaluation-harness's ``mmlu_continuation`` numbers on the same questions.

The harness runs in its own cached virtualenv (``python benchmarks/throughput/venvs.py lm-eval``; ``.ci/run``
builds it; without it these tests skip, naming that command) with its own task files as installed, pointed at
local copies of the questions (``benchmarks/eval/harness_mmlu.py``: the hub's ``cais/mmlu`` is unreachable), on
the real SmolLM2-135M-Instruct folder tuneforge scores. On a fixed handful of questions from several subjects:

- the harness's rendered requests are ours: its context string is ``Question.context``, and the text and token
  split of each request (its ``HFLM._encode_pair``: context tokens, continuation tokens) are exactly the tokens
  our scorer feeds the model;
- each choice's log-likelihood is the harness's within ``TOLERANCE`` (both fp32 on CPU), through the shared-prefix
  tree-masked rows and through packed full sequences;
- the predicted choice and ``acc`` are the harness's for every question.

- ``acc_norm`` is the harness's too (the log-likelihood per character of the choice).

Choices whose CSV text has surrounding spaces (766 of the 14,079 test questions, e.g. ``" Both (a) and (b)."``)
are scored as the harness (like the hub's loading script, which keeps the CSV's text) scores them:
``" " + choice`` as is. ``test_choices_with_surrounding_spaces...`` checks three of them (tuneforge once stripped
the choice first: 1.85 nats apart).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MMLU = ROOT.parent / "shared" / "data" / "mmlu"
sys.path.insert(0, str(ROOT / "benchmarks" / "throughput"))
sys.path.insert(0, str(ROOT / "benchmarks" / "eval"))
import venvs  # noqa: E402
from harness_mmlu import run_harness  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(venvs.ready(venvs.LM_EVAL) is None, reason="lm-evaluation-harness's venv is not built: "
                       "python benchmarks/throughput/venvs.py lm-eval"),
    pytest.mark.skipif(not MMLU.is_dir(), reason="needs ../shared/data/mmlu"),
]

# (subject, row of its test CSV): STEM, humanities, social sciences, other; a non-ASCII question (philosophy 2),
# questions with leading spaces (marketing 1, world_religions), short numeric choices (abstract_algebra).
QUESTIONS = [("abstract_algebra", 0), ("abstract_algebra", 1), ("high_school_biology", 2), ("philosophy", 1),
             ("philosophy", 2), ("marketing", 0), ("marketing", 1), ("sociology", 0), ("world_religions", 0),
             ("world_religions", 2), ("computer_security", 0), ("college_mathematics", 1)]
# a choice with a leading space, one with a trailing space, one with a leading space
SPACED = [("college_mathematics", 9), ("high_school_physics", 81), ("machine_learning", 28)]
# Largest difference measured: 2.3e-5 nats on QUESTIONS (tree rows and packed full sequences alike), 6.5e-5 on the
# 563 of 570 questions whose requests are identical in benchmarks/results/mmlu_harness_cpu_2026-12-03.json. Broken
# on purpose: the choice's leading space tokenized with the context moves a log-likelihood by 1.9 nats; the
# context's last token (":") scored with the continuation, by 0.0125 nats.
TOLERANCE = 5e-4


@pytest.fixture(scope="module")
def scored(real_model_path):
    from tuneforge.evaluation.forgetting import load_mmlu
    from tuneforge.models.loading import load_model, load_tokenizer

    by_subject: dict = {}
    for q in load_mmlu(MMLU, per_subject=None):
        by_subject.setdefault(q.subject, []).append(q)
    questions = [by_subject[s][i] for s, i in QUESTIONS + SPACED]
    assert not any(c != c.strip() for q in questions[:len(QUESTIONS)] for c in q.choices)
    assert all(any(c != c.strip() for c in q.choices) for q in questions[len(QUESTIONS):])
    harness = run_harness(venvs.python_of(venvs.LM_EVAL), real_model_path,
                          [{"subject": q.subject, "question": q.question, "choices": q.choices, "answer": q.answer}
                           for q in questions], MMLU, threads=2, batch=16, timeout=900)
    assert harness["versions"]["lm-eval"] == "0.4.13"
    rows = list(zip(questions, harness["questions"], strict=True))
    return rows[:len(QUESTIONS)], rows[len(QUESTIONS):], load_model(real_model_path).eval(), \
        load_tokenizer(real_model_path)


def _check_requests(rows, tokenizer):
    from tuneforge.evaluation.forgetting import _pieces

    for q, h in rows:
        ctx, conts = _pieces(tokenizer, q)     # the tokens our scorer feeds the model
        for j, ((h_ctx, h_cont), (h_ctx_ids, h_cont_ids)) in enumerate(zip(h["arguments"], h["tokens"], strict=True)):
            where = f"{q.subject} {h['doc_id']} choice {j}"
            assert q.context == h_ctx, (where, q.context, h_ctx)
            assert tokenizer.decode(conts[j]) == h_cont, (where, tokenizer.decode(conts[j]), h_cont)
            assert (ctx, conts[j]) == (h_ctx_ids, h_cont_ids), where


def _check_scores(rows, model, tokenizer):
    from tuneforge.evaluation.forgetting import choice_logliks, score_mmlu

    questions = [q for q, _ in rows]
    for share_prefix in (True, False):
        for q, h in rows:
            ours = choice_logliks(model, tokenizer, q, share_prefix=share_prefix)
            diff = max(abs(a - b) for a, b in zip(ours, h["logliks"], strict=True))
            assert diff < TOLERANCE, (q.subject, h["doc_id"], share_prefix, ours, h["logliks"])
            assert max(range(4), key=ours.__getitem__) == max(range(4), key=h["logliks"].__getitem__)
        scores = score_mmlu(model, tokenizer, questions, share_prefix=share_prefix)
        assert scores["correct"] == [h["acc"] for _, h in rows], share_prefix
        assert scores["correct_norm"] == [h["acc_norm"] for _, h in rows], share_prefix


def test_requests_are_the_harness_mmlu_continuation_requests(scored):
    rows, _, _, tokenizer = scored
    _check_requests(rows, tokenizer)


def test_choice_logliks_and_answers_equal_the_harness(scored):
    rows, _, model, tokenizer = scored
    _check_scores(rows, model, tokenizer)


def test_choices_with_surrounding_spaces_are_scored_as_the_harness_scores_them(scored):
    _, spaced, model, tokenizer = scored
    _check_requests(spaced, tokenizer)
    _check_scores(spaced, model, tokenizer)
