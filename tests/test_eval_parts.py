"""The parts of `tuneforge eval` against references: batched generation vs one prompt at a time, the shared-prefix
MMLU cloze vs full sequences, held-out loss vs the trainer's validation loss, failure rules, retrieval, prompts."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tuneforge.config.eval import check_columns
from tuneforge.data.synthetic_tickets import SYSTEM_PROMPT
from tuneforge.evaluation import columns, failures, forgetting, generation, heldout
from tuneforge.evaluation.retrieval import DocsError, Retriever, load_passages

TICKETS = ["I was charged twice", "Where is my parcel? It has been two weeks since I ordered the blue lamp.",
           "app crashes", "Please add a dark mode to the dashboard, my eyes hurt at night when I use it a lot",
           "refund please", "I can't log in"]


def _conv(text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model, tokenizer):
    convs = [_conv(t) for t in TICKETS]
    batched = generation.generate(tiny_model, tokenizer, convs, max_new_tokens=12, batch_size=4)
    for i, conv in enumerate(convs):
        ids = torch.tensor([tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]])
        out = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        end = new.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in new else None
        assert batched.texts[i] == tokenizer.decode(new[:end], skip_special_tokens=True).strip(), i
        assert batched.new_tokens[i] == (len(new) if end is None else end + 1)
        assert batched.stopped[i] == (end is not None)
        assert batched.prompt_tokens[i] == ids.shape[1]


def test_sampling_is_seeded(tiny_model, tokenizer):
    convs = [_conv(t) for t in TICKETS[:3]]
    a = generation.generate(tiny_model, tokenizer, convs, max_new_tokens=6, temperature=1.0, seed=3).texts
    b = generation.generate(tiny_model, tokenizer, convs, max_new_tokens=6, temperature=1.0, seed=3).texts
    c = generation.generate(tiny_model, tokenizer, convs, max_new_tokens=6, temperature=1.0, seed=4).texts
    assert a == b and a != c


def _full_sequence_logliks(model, tokenizer, q):
    out = []
    for choice in q.choices:
        ctx, cont = forgetting.split_tokens(tokenizer, q.context, " " + choice.strip())
        ids = torch.tensor([ctx + cont])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def test_mmlu_cloze_shared_prefix_equals_four_full_sequences(tiny_model, tokenizer):
    choices = ["The nucleus", "Mitochondria", "A ribosome of the rough endoplasmic reticulum", "Golgi"]
    q = forgetting.Question("high_school_biology", "Which organelle makes most of a cell's ATP?", choices[:4], 1)
    with torch.no_grad():
        reference = _full_sequence_logliks(tiny_model, tokenizer, q)
        cached = forgetting.choice_logliks(tiny_model, tokenizer, q, share_prefix=True)
        packed = forgetting.choice_logliks(tiny_model, tokenizer, q, share_prefix=False)
    assert cached == pytest.approx(reference, abs=1e-4)
    assert packed == pytest.approx(reference, abs=1e-4)


def test_mmlu_tree_rows_score_like_full_sequences(tiny_model, tokenizer):
    """Several questions per forward under the tree mask (contexts once, continuations branching off them,
    one-token and multi-token choices, rows split by row_tokens) == each choice as its own full sequence."""
    qs = [forgetting.Question("anatomy", "Which bone is the longest?", ["Femur", "A", "The small stapes", "Ulna"], 0),
          forgetting.Question("virology", "What does a virus need to replicate?",
                              ["A host cell", "Sunlight and water", "B", "Nothing at all, it divides"], 0),
          forgetting.Question("high_school_biology", "Which organelle makes most of a cell's ATP?",
                              ["The nucleus", "Mitochondria", "A ribosome", "Golgi"], 1)]
    with torch.no_grad():
        reference = [_full_sequence_logliks(tiny_model, tokenizer, q) for q in qs]
        for row_tokens in (10_000, 60):          # all three in one row; one question a row
            items = [forgetting._pieces(tokenizer, q) for q in qs]
            got = forgetting._logliks_tree(tiny_model, items, torch.device("cpu")) if row_tokens > 1000 else \
                [forgetting._logliks_tree(tiny_model, [it], torch.device("cpu"))[0] for it in items]
            for g, r in zip(got, reference, strict=True):
                assert g == pytest.approx(r, abs=1e-4)
            scored = forgetting.score_mmlu(tiny_model, tokenizer, qs, row_tokens=row_tokens)
            expected = [float(max(range(4), key=lambda i: r[i]) == q.answer)
                        for r, q in zip(reference, qs, strict=True)]
            assert scored["correct"] == expected


def test_mmlu_loader_takes_a_fixed_stratified_subset(tmp_path):
    folder = tmp_path / "mmlu" / "test"
    folder.mkdir(parents=True)
    for subject in ("anatomy", "virology"):
        rows = [f"q{i} of {subject},a,b,c,d,{'ABCD'[i % 4]}" for i in range(15)]
        (folder / f"{subject}_test.csv").write_text("\n".join(rows) + "\n")
    subset = forgetting.load_mmlu(tmp_path / "mmlu", per_subject=10)
    assert [q.subject for q in subset].count("anatomy") == 10 and len(subset) == 20
    assert subset == forgetting.load_mmlu(tmp_path / "mmlu", per_subject=10)      # fixed
    assert len(forgetting.load_mmlu(tmp_path / "mmlu", per_subject=None)) == 30
    (folder / "bad_test.csv").write_text("only,three,fields\n")
    with pytest.raises(forgetting.ForgettingDataError, match="bad_test.csv:1"):
        forgetting.load_mmlu(tmp_path / "mmlu")
    with pytest.raises(forgetting.ForgettingDataError, match="no MMLU files"):
        forgetting.load_mmlu(tmp_path / "nothing")


def test_heldout_loss_equals_the_trainers_token_weighted_validation_loss(tiny_model, tokenizer):
    from tuneforge.data.formats import Example
    from tuneforge.data.packing import micro_batches
    from tuneforge.methods.loss import evaluate_loss

    examples = [Example(messages=_conv(t) + [{"role": "assistant", "content": lab}])
                for t, lab in zip(TICKETS, ["billing", "shipping", "bug", "feature", "refund", "login"], strict=True)]
    tokenized = heldout.tokenize_heldout(examples, tokenizer)
    sums, tokens = heldout.example_losses(tiny_model, tokenized, "base", batch_size=4)
    result = heldout.loss_and_perplexity(sums, tokens)
    reference = evaluate_loss(tiny_model, list(micro_batches(tokenized, 3, 0, 0, shuffle=False)), torch.device("cpu"),
                              "base")
    assert result["loss"]["value"] == pytest.approx(reference, rel=1e-5)
    assert result["perplexity"]["value"] == pytest.approx(torch.tensor(reference).exp().item(), rel=1e-5)
    assert result["loss"]["low"] <= result["loss"]["value"] <= result["loss"]["high"]
    assert result["tokens"] == sum(t.num_trained for t in tokenized)


@pytest.mark.parametrize("answer, stopped, expected", [
    ("", True, "empty"),
    ("billing billing billing billing billing", False, "repetition_loop"),
    ("I think this ticket should go to the team that", False, "never_stopped"),
    ("I'm sorry, I can't help with that.", True, "refusal"),
    ("I'm sorry for any misunderstanding, but", False, "refusal"),          # a truncated refusal is a refusal
    ("my parcel has been two weeks you ordered", False, "echoed_prompt"),   # 7 of 8 words in runs of the prompt
    ("You wrote: where is my parcel it has been two weeks", True, "echoed_prompt"),
    ("Shipping department", True, "format_broken"),
    ("refund", True, "wrong_label"),
])
def test_failure_rules(answer, stopped, expected):
    rules = failures.FormatRules(labels=["billing", "shipping", "refund"])
    prompt = "Where is my parcel? It has been two weeks since I ordered."
    assert failures.categorise(answer, prompt, stopped, rules) == expected


def test_failure_analysis_counts_and_keeps_examples():
    rows = [{"index": i, "prompt": "p", "reference": "billing", "answer": a, "stopped": True, "correct": a == "billing"}
            for i, a in enumerate(["billing", "refund", "refund", "", "nope nope nope nope"])]
    out = failures.analyse(rows, failures.FormatRules(labels=["billing", "refund"]))
    assert out["wrong"] == 4 and out["counts"] == {"empty": 1, "repetition_loop": 1, "wrong_label": 2}
    assert out["examples"]["wrong_label"][0] == {"index": 1, "prompt": "p", "reference": "billing", "answer": "refund"}
    assert "category" not in rows[0] and rows[1]["category"] == "wrong_label"


def test_json_failures_are_format_broken_when_json_is_expected():
    rules = failures.FormatRules(json_expected=True)
    assert failures.categorise('{"a": 1', "give json", True, rules) == "format_broken"
    assert failures.categorise('{"a": 2}', "give json", True, rules) == "wrong_answer"


def test_bm25_retrieves_the_page_of_the_right_queue(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "shipping.md").write_text("# Shipping\n\nParcels, couriers, tracking numbers and customs fees.\n")
    (docs / "login.md").write_text("# Login\n\nPasswords, two-factor codes and locked accounts.\n")
    (docs / "ignored.bin").write_bytes(b"\x00")
    retriever = Retriever(docs)
    assert retriever.top("the courier lost my parcel", 1)[0].source == "shipping.md"
    assert retriever.top("my two-factor code fails", 1)[0].text.startswith("Login: ")
    records = tmp_path / "docs.jsonl"
    records.write_text(json.dumps({"title": "Refund", "text": "Money back for returns."}) + "\n")
    assert Retriever(records).top("money back", 1)[0].text == "Refund: Money back for returns."
    with pytest.raises(DocsError, match="folder not found"):
        load_passages(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DocsError, match="no .md or .txt"):
        load_passages(tmp_path / "empty")


def test_column_prompts():
    prompt = _conv("where is my parcel")
    train = [_conv(f"ticket {i}") + [{"role": "assistant", "content": "bug"}] for i in range(10)]
    shots = columns.fewshot_examples(train, 3, seed=0)
    assert shots == columns.fewshot_examples(train, 3, seed=0) and len(shots) == 3
    few = columns.build_prompts("fewshot", [prompt], shots)[0]
    assert few[0]["role"] == "system" and few[-1] == prompt[-1]
    assert [m["role"] for m in few[1:]] == ["user", "assistant"] * 3 + ["user"]
    rag = columns.with_context(prompt, ["Shipping: parcels"])
    assert rag[-1]["content"] == "Context:\n- Shipping: parcels\n\nwhere is my parcel" and rag[0] == prompt[0]
    with pytest.raises(ValueError, match="unknown column"):
        check_columns(["base", "tunde"])


def test_the_eval_section_of_the_run_config_is_validated_at_load():
    import tuneforge
    from tuneforge.errors import ConfigError

    config = tuneforge.load_config("examples/quickstart.yaml", ["eval.columns=[base,fewshot,tuned]", "eval.samples=3"])
    assert config.eval.columns == ["base", "fewshot", "tuned"] and config.eval.forgetting.per_subject == 10
    for override, message in ((["eval.colums=[base]"], "unknown key 'eval.colums' (did you mean 'columns'?)"),
                              (["eval.columns=[base,tunde]"], "unknown column(s) tunde"),
                              (["eval.forgetting.max_drp=0.1"], "did you mean 'max_drop'?")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            tuneforge.load_config("examples/quickstart.yaml", override)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_scoring_equals_the_unmerged_adapter_and_restores_the_weights(tiny_model, tokenizer, method):
    from _method_helpers import perturbed, run_config
    from tuneforge.evaluation.merged import merged_for_scoring
    from tuneforge.methods import apply_method

    model = perturbed(apply_method(tiny_model, run_config(method, {})))
    probe = torch.tensor([tokenizer("Where is my parcel?")["input_ids"]])
    convs = [_conv(t) for t in TICKETS]
    with torch.no_grad():
        before = model(input_ids=probe).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = generation.generate(model, tokenizer, convs, method, max_new_tokens=8)
    record: dict = {}
    with merged_for_scoring(model, method, probe, record=record) as merged:
        assert merged and record["max_abs_diff"] < 1e-4
        with torch.no_grad():
            assert torch.allclose(model(input_ids=probe).logits, before, atol=1e-4)
        assert generation.generate(model, tokenizer, convs, method, max_new_tokens=8).texts == unmerged.texts
    for k, v in model.state_dict().items():
        assert torch.allclose(v, weights[k], atol=1e-6), k
