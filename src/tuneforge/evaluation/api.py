"""``tuneforge.evaluate(run_dir, ...)``: the columns, metrics, failures, forgetting and the report of one run.

Order of work: every input is checked first (the run, the test files and each record, the schema, the docs
folder, the MMLU folder, the judge endpoint), so bad input fails with one line before a model loads and
before anything is written. Then the tuned model loads once; the base columns run on the same model with
the method disabled (``methods.method_disabled``: no second copy in memory), or on a separately loaded
base for methods that change the base weights (``full``). Each column answers the same prompts with
batched greedy generation; every metric gets a bootstrap interval, and tuned minus each baseline a paired
bootstrap. Tool records (:mod:`.tool_eval`) get their tools in every column's prompt and a ``tool_calls``
block of call scores per column. The report is written to ``<run>/eval/`` (or ``out``) atomically (:mod:`.report`).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tuneforge.config import RunConfig, load_config
from tuneforge.config.eval import BASE_COLUMNS, EvalSettings, check_columns
from tuneforge.data.dataset import DataError, load_examples
from tuneforge.data.formats import Example
from tuneforge.data.loaders import data_sha256
from tuneforge.data.tool_formats import HERMES, ToolCallFormat
from tuneforge.data.tool_formats import resolve as resolve_tool_format
from tuneforge.evaluation import bootstrap, failures, generation, heldout, tool_eval
from tuneforge.evaluation import columns as cols
from tuneforge.evaluation import forgetting as forget
from tuneforge.evaluation.metrics import MetricError, MetricSet, check_schema, confusion, normalise_label, per_label
from tuneforge.evaluation.retrieval import DocsError, Retriever
from tuneforge.runs import EvalReport, NotARunError, RunDir, RunRecord

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64


class EvalError(ValueError):
    """Input ``tuneforge eval`` cannot use; the message names the file, line or setting."""


BAD_INPUT = (EvalError, MetricError, DocsError, forget.ForgettingDataError, DataError, NotARunError)


@dataclass
class EvalResult:
    out_dir: Path
    report: dict

    def table(self, set_name: str = "test") -> str:
        from tuneforge.evaluation.report import main_table_md

        if self.report.get("main_metric") == "pairwise_accuracy":       # a reward model's report
            from tuneforge.evaluation.reward_model import reward_table

            return reward_table(self.report, set_name)
        return main_table_md(self.report, set_name)

    @property
    def record(self) -> EvalReport:
        """The report as the typed record ``report.json`` holds."""
        return EvalReport.model_validate(self.report)


@dataclass
class TestSet:
    name: str
    file: str
    examples: list[Example]

    @property
    def prompts(self) -> list[list[dict]]:
        return [ex.messages[:-1] for ex in self.examples]

    @property
    def references(self) -> list[str]:
        return [ex.messages[-1]["content"] for ex in self.examples]

    @property
    def tools(self) -> list[list[dict] | None]:
        """Each prompt's tool definitions (the record's or ``data.tools``; None: none)."""
        return [ex.tools for ex in self.examples]

    @property
    def has_tools(self) -> bool:
        return any(tool_eval.is_tool_record(ex) for ex in self.examples)


# ------------------------------------------------------------------------------------------- inputs


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise EvalError(f"{run_dir}: no such run directory")
    run = RunDir(run_dir)
    if not run.config.is_file() or not (run.adapter_config.is_file() or run.model_config.is_file()):
        raise EvalError(f"{run_dir}: not a tuneforge run directory (needs config.yaml and the trained adapter or "
                        "model, as `tuneforge train` writes them)")


def load_test_set(name: str, file: str | Path, config: RunConfig, max_examples: int | None) -> TestSet:
    """The usable test conversations of ``file`` (any source :mod:`tuneforge.data.sources` reads: a file, a folder of
    shards, a ``save_to_disk`` folder, a Hub id); any unusable record stops with its file and line."""
    from tuneforge.data.sources import parse_source

    path = Path(file)
    if parse_source(str(file)).kind == "file" and not path.is_file():
        raise EvalError(f"test file {path}: not found")
    loaded = load_examples(str(file), config.data, "sft")
    if loaded.rejects:
        r = loaded.rejects[0]
        more = f" (and {len(loaded.rejects) - 1} more)" if len(loaded.rejects) > 1 else ""
        raise EvalError(f"{r.source}:{r.line}: test record unusable: {r.reason}{more}; fix or remove it")
    for ex in loaded.examples:
        msgs = ex.messages or []
        before = ("user", "tool") if tool_eval.is_tool_record(ex) else ("user",)
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] not in before:
            raise EvalError(f"{ex.meta.get('where', path)}: test record unusable: it must end with a user turn (or, "
                            "with tools, tool results) and the reference assistant answer")
    if not loaded.examples:
        raise EvalError(f"test file {path}: no records")
    return TestSet(name, str(file), loaded.examples[:max_examples])


def default_test_file(config: RunConfig, settings: EvalSettings) -> str:
    file = settings.data or config.data.validation or next(       # a mixture: its first source's validation file
        (src.validation for src in config.data.sources or [] if src.validation), None)
    if not file:
        raise EvalError("no test file: pass --data FILE (or set eval.data in the config)")
    return file


@contextlib.contextmanager
def _base_model(loaded: Any, config: RunConfig, cache: dict) -> Iterator[tuple[torch.nn.Module, str]]:
    """The base model as (model, method name for dispatch): the tuned model with its method disabled, or a
    separately loaded base for methods that cannot be disabled."""
    from tuneforge.methods import method_disabled
    from tuneforge.methods.registry import get_method

    if get_method(config.method).disable is not None:
        with method_disabled(loaded.model, config):
            yield loaded.model, config.method
        return
    if "base" not in cache:
        from tuneforge.runs import load_base

        cache["base"] = load_base(config.model, config.dtype, str(loaded.device)).model
    yield cache["base"], "base"


# -------------------------------------------------------------------------------------------- scoring


def _column_rows(test: TestSet, texts: list[str], answers: generation.Generations, scores: dict[str, list[float]],
                 key: str) -> list[dict]:
    return [{"index": i, "prompt": p[-1]["content"], "reference": r, "answer": a, "stopped": s,
             "correct": bool(scores[key][i])}
            for i, (p, r, a, s) in enumerate(zip(test.prompts, test.references, texts, answers.stopped,
                                                 strict=True))]


def _score_column(test: TestSet, gens: generation.Generations, metric_set: MetricSet, rules: failures.FormatRules,
                  settings: EvalSettings, main_metric: str, fmt: ToolCallFormat = HERMES
                  ) -> tuple[dict, dict[str, list[float]]]:
    texts = tool_eval.content_texts(test.examples, gens.texts, fmt)   # a tool record's answer without its calls
    scores = metric_set.score(texts, test.references)
    seed, resamples = settings.seed, settings.bootstrap_resamples
    out: dict[str, Any] = {
        "metrics": {m: bootstrap.interval(v, resamples, seed=seed).to_dict() for m, v in scores.items()},
        "prompt_tokens": sum(gens.prompt_tokens) / max(len(gens.prompt_tokens), 1),
        "generated_tokens": sum(gens.new_tokens),
        "tokens_per_s": gens.tokens_per_s,
        "seconds": gens.seconds,
        "stopped": sum(gens.stopped) / max(len(gens.stopped), 1),
    }
    rows = _column_rows(test, texts, gens, scores, main_metric)
    out["failures"] = failures.analyse(rows, rules)
    if metric_set.labels:
        table = confusion(texts, test.references, metric_set.labels)
        out["confusion"] = table
        out["per_label"] = per_label(table)
    out["answers"] = gens.texts
    out["categories"] = [r.get("category") for r in rows]
    return out, scores


def _variability(model: torch.nn.Module, tokenizer: Any, method: str | None, prompts: list[list[dict]],
                 settings: EvalSettings, max_new_tokens: int, tools: list[list[dict] | None] | None = None) -> dict:
    """n samples per prompt at temperature T: distinct answers / n, and the share agreeing with the majority."""
    samples = [generation.generate(model, tokenizer, prompts, method, max_new_tokens, settings.batch_size,
                                   temperature=settings.temperature, seed=settings.seed + s, tools=tools).texts
               for s in range(settings.samples)]
    distinct, agreement = [], []
    for i in range(len(prompts)):
        answers = [normalise_label(s[i]) for s in samples]
        counts = Counter(answers)
        distinct.append(len(counts) / len(answers))
        agreement.append(counts.most_common(1)[0][1] / len(answers))
    r = settings.bootstrap_resamples
    return {"distinct": bootstrap.interval(distinct, r, seed=settings.seed).to_dict(),
            "majority_agreement": bootstrap.interval(agreement, r, seed=settings.seed).to_dict(),
            "samples": settings.samples, "temperature": settings.temperature, "prompts": len(prompts),
            "examples": [{"prompt": p[-1]["content"], "answers": [s[i] for s in samples]}
                         for i, p in enumerate(prompts[:5])]}


def _general_text(settings: EvalSettings) -> str:
    path = Path(settings.forgetting.general_text) if settings.forgetting.general_text else forget.general_text_path()
    if not path.is_file():
        raise EvalError(f"eval.forgetting.general_text: {path}: file not found")
    if path.suffix == ".jsonl":
        import json

        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return "\n\n".join(str(rec.get("text", "")) for rec in lines)
    return path.read_text()


# ---------------------------------------------------------------------------------------------- evaluate


def resolve_settings(config: RunConfig, **overrides: Any) -> EvalSettings:
    """The run's ``eval:`` settings (or the defaults) with non-None ``overrides`` applied and validated."""
    base = (config.eval or EvalSettings()).model_dump()
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "forgetting_full":
            base["forgetting"]["per_subject"] = None
        elif key.startswith("forgetting_"):
            base["forgetting"][key.removeprefix("forgetting_")] = value
        else:
            base[key] = value
    try:
        return EvalSettings.model_validate(base)
    except Exception as e:      # pydantic's ValidationError: one line naming the setting
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            first = e.errors()[0]
            raise EvalError(f"eval.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        raise


@dataclass
class Inputs:
    """Everything :func:`evaluate` reads besides the models, checked."""
    test_sets: list[TestSet]
    labels: list[str] | None
    json_refs: bool
    metric_set: MetricSet
    rules: failures.FormatRules
    wanted: list[str]
    retriever: Retriever | None
    shots: list[list[dict]]
    questions: list | None
    general_text: str
    judge_client: Any


def check_inputs(config: RunConfig, settings: EvalSettings) -> Inputs:
    """Read and check every input of the evaluation (test files and each record, schema, docs folder, MMLU
    folder, judge endpoint); raises one of :data:`BAD_INPUT` naming the file, line or setting."""
    limit = settings.max_examples
    test_sets = [load_test_set("test", default_test_file(config, settings), config, limit)]
    test_sets += [load_test_set(name, file, config, limit) for name, file in settings.extra.items()]
    labels = settings.labels
    json_refs = labels is None and all(_is_json(r) for t in test_sets for r in t.references)
    metric_set = MetricSet.build(labels, settings.json_schema, settings.regex, settings.user_metric, json_refs)
    rules = failures.FormatRules(labels=labels, json_expected=json_refs,
                                 schema_ok=_schema_check(settings.json_schema),
                                 regex_ok=metric_set.metrics.get("regex"))
    wanted = check_columns(settings.columns)
    retriever = None
    if any(c in ("rag", "tuned+rag") for c in wanted):
        if not settings.docs:
            raise EvalError("the rag columns need documents: pass --docs DIR (or set eval.docs)")
        retriever = Retriever(settings.docs)
    shots: list[list[dict]] = []
    if "fewshot" in wanted:
        shots = _fewshot_pool(config, settings)
    questions, general_text = None, ""
    if settings.forgetting.enabled:
        if not settings.forgetting.data:
            raise EvalError("forgetting needs the MMLU folder: pass --forgetting-data DIR (or set "
                            "eval.forgetting.data)")
        questions = forget.load_mmlu(settings.forgetting.data, settings.forgetting.split,
                                     settings.forgetting.per_subject)
        general_text = _general_text(settings)
    judge_client = None
    if settings.judge is not None:
        from tuneforge.evaluation.judge import connect

        if "tuned" not in wanted or (settings.judge.against == "base" and "base" not in wanted):
            raise EvalError("the judge compares the tuned column with the base column (or eval.judge.against: "
                            "reference): add them to --columns")
        if settings.judge.against not in ("base", "reference"):
            raise EvalError(f"eval.judge.against: {settings.judge.against!r}: write base or reference")

        judge_client = connect(settings.judge)
    return Inputs(test_sets, labels, json_refs, metric_set, rules, wanted, retriever, shots, questions,
                  general_text, judge_client)


def check_before_training(config: RunConfig) -> None:
    """``tuneforge train`` with ``eval.after_training``: check the evaluation's inputs before training, so a
    bad test file, schema, docs folder, MMLU folder or judge endpoint fails in one line before the first step
    rather than after the last. Raises :class:`~tuneforge.errors.ConfigError` (one line: the CLI's exit 2)."""
    from tuneforge.errors import ConfigError
    from tuneforge.evaluation.judge import JudgeError

    try:
        check_inputs(config, resolve_settings(config))
    except (*BAD_INPUT, JudgeError) as e:
        raise ConfigError(f"eval (run after training, eval.after_training): {e}") from e


def evaluate(run_dir: str | Path, data: str | None = None, columns: list[str] | None = None,
             docs: str | None = None, out: str | Path | None = None, forgetting: bool | None = None,
             forgetting_data: str | None = None, judge: str | None = None, progress: bool = True,
             settings: EvalSettings | None = None, **overrides: Any) -> EvalResult:
    """Evaluate the run in ``run_dir``; write ``report.md``, ``report.json`` and ``report.html``.

    Arguments override the run config's ``eval:`` section (``overrides``: any other of its keys, e.g.
    ``max_examples=50``, ``fewshot_k=5``, ``extra={"handwritten": "tickets.jsonl"}``). Returns the report.
    """
    started = time.time()
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    config = load_config(RunDir(run_dir).config, check_files=False)
    record = RunRecord.load(run_dir) or RunRecord()     # a broken or newer run.json stops here, in one line
    if settings is None:
        settings = resolve_settings(config, data=data, columns=columns, docs=docs, forgetting_enabled=forgetting,
                                    forgetting_data=forgetting_data, **overrides)
    if judge is not None:
        from tuneforge.config.eval import JudgeSettings

        settings = settings.model_copy(update={"judge": JudgeSettings(url=judge)})
    out_dir = Path(out) if out else RunDir(run_dir).eval_dir
    if config.task == "reward":       # a reward model: held-out pairwise accuracy, no generation
        from tuneforge.evaluation.reward_model import evaluate_reward

        try:
            return EvalResult(out_dir, evaluate_reward(run_dir, default_test_file(config, settings), out_dir,
                                                       settings.max_examples, settings.batch_size,
                                                       settings.bootstrap_resamples, settings.seed))
        except ValueError as e:
            raise EvalError(str(e)) from None

    # ---- every input checked before any model loads
    inp = check_inputs(config, settings)
    test_sets, labels, json_refs, metric_set = inp.test_sets, inp.labels, inp.json_refs, inp.metric_set
    rules, wanted, retriever, shots = inp.rules, inp.wanted, inp.retriever, inp.shots
    questions, general_text, judge_client = inp.questions, inp.general_text, inp.judge_client

    # ---- models
    from tuneforge.runs import load_run

    if config.threads:
        torch.set_num_threads(config.threads)

    max_new = settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    main_metric = "label" if labels else ("json_valid" if json_refs else "normalised")
    log.info("loading %s", run_dir)
    loaded = load_run(run_dir)
    tokenizer, cache = loaded.tokenizer, {}
    try:            # the format the answers' tool calls are read in (the run's data.tool_call_format)
        fmt = resolve_tool_format(config.data.tool_call_format, tokenizer.chat_template)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if settings.max_new_tokens is None:     # room for the longest reference call: a cut call scores as no call
        longest = max(tool_eval.longest_reference_tokens(tokenizer, t.examples) for t in test_sets)
        max_new = max(max_new, longest + tool_eval.MARGIN_TOKENS if longest else 0)
    from tuneforge.data.rendering import prompt_ids
    from tuneforge.evaluation.merged import merged_for_scoring

    probe = torch.tensor([prompt_ids(tokenizer, test_sets[0].prompts[0], tools=test_sets[0].tools[0])],
                         device=loaded.device)
    merge_record: dict[str, Any] = {"merged": False}

    def tuned_model() -> contextlib.AbstractContextManager[bool]:
        """The tuned model, its adapter merged in memory when that is checked equal (faster scoring)."""
        return merged_for_scoring(loaded.model, config.method, probe, record=merge_record)
    report: dict[str, Any] = {"tuneforge_eval": 1, "run": str(run_dir), "main_metric": main_metric,
                              "columns": wanted, "sets": {}}
    total = sum(len(t.examples) for t in test_sets) * len(wanted)
    bar = tqdm(total=total, desc="eval generation", unit="prompt", disable=not progress, dynamic_ncols=True)
    for test in test_sets:
        per_col: dict[str, dict] = {}
        col_scores: dict[str, dict[str, list[float]]] = {}
        call_scores: dict[str, dict[str, list[float]]] = {}
        for column in wanted:
            prompts = cols.build_prompts(column, test.prompts, shots, retriever, settings.rag_k)
            bar.set_postfix(set=test.name, column=column)
            if column in BASE_COLUMNS:
                with _base_model(loaded, config, cache) as (model, method):
                    gens = generation.generate(model, tokenizer, prompts, method, max_new, settings.batch_size,
                                               progress=bar.update, tools=test.tools, tool_format=fmt)
            else:
                with tuned_model():
                    gens = generation.generate(loaded.model, tokenizer, prompts, config.method, max_new,
                                               settings.batch_size, progress=bar.update, tools=test.tools,
                                               tool_format=fmt)
            per_col[column], col_scores[column] = _score_column(test, gens, metric_set, rules, settings, main_metric,
                                                                fmt)
            if test.has_tools:
                per_col[column]["tool_calls"], call_scores[column] = tool_eval.column_block(
                    test.examples, gens.texts, settings.seed, settings.bootstrap_resamples, fmt)
            if column in ("rag", "tuned+rag"):
                per_col[column]["context_example"] = prompts[0][-1]["content"] if prompts else ""
        entry: dict[str, Any] = {"file": test.file, "sha256": data_sha256(test.file), "n": len(test.examples),
                                 "columns": per_col, "prompts": [p[-1]["content"] for p in test.prompts],
                                 "references": test.references}
        entry["paired"] = _paired(col_scores, settings)
        if call_scores:
            entry["paired_tool_calls"] = _paired(call_scores, settings)
        entry["loss"] = _losses(loaded, config, test, cache, settings, tuned_model)
        report["sets"][test.name] = entry
    bar.close()

    if settings.samples:
        log.info("output variability: %d samples at temperature %s", settings.samples, settings.temperature)
        prompts = test_sets[0].prompts[:settings.variability_examples]
        tools = test_sets[0].tools[:settings.variability_examples]
        with _base_model(loaded, config, cache) as (model, method):
            base_var = _variability(model, tokenizer, method, prompts, settings, max_new, tools)
        with tuned_model():
            tuned_var = _variability(loaded.model, tokenizer, config.method, prompts, settings, max_new, tools)
        report["variability"] = {"base": base_var, "tuned": tuned_var}

    if config.data.sources is not None:        # a mixture: held-out loss on each source's validation examples
        report["sources"] = _source_losses(loaded, config, cache, settings, tuned_model)

    if questions is not None:
        report["forgetting"] = _forgetting(loaded, config, cache, questions, general_text, settings, progress,
                                           tuned_model)

    if judge_client is not None:
        from tuneforge.evaluation.judge import judge_pairwise

        test = report["sets"]["test"]
        other = "base" if settings.judge.against == "base" else None
        n = settings.judge.max_examples
        report["judge"] = judge_pairwise(judge_client, settings.judge, test["prompts"][:n],
                                         test["columns"]["tuned"]["answers"][:n],
                                         (test["columns"][other]["answers"] if other else test["references"])[:n],
                                         against=settings.judge.against)

    report["metadata"] = _metadata(record, config, settings, started, max_new)
    report["metadata"]["merged_for_scoring"] = merge_record
    report["loss_curve"] = _loss_curve(run_dir)
    from tuneforge.evaluation.report import write_report

    write_report(report, out_dir)
    return EvalResult(out_dir, report)


# ----------------------------------------------------------------------------------------------- helpers


def _is_json(text: str) -> bool:
    from tuneforge.evaluation.metrics import json_valid

    return bool(json_valid(text))


def _schema_check(schema: Any) -> Any:
    if schema is None:
        return None
    from tuneforge.evaluation.metrics import parse_json

    is_valid = check_schema(schema)

    def ok(answer: str) -> bool:
        try:
            return bool(is_valid(parse_json(answer)))
        except ValueError:
            return False
    return ok


def _fewshot_pool(config: RunConfig, settings: EvalSettings) -> list[list[dict]]:
    train = Path(config.data.train_paths()[0])       # a mixture: its first source (the run's own data)
    if not train.exists():
        raise EvalError(f"the fewshot column takes examples from the training file {train}, which is not there "
                        "(drop fewshot from --columns, or restore the file)")
    loaded = load_examples(str(train), config.data, "sft")
    pool = [ex.messages for ex in loaded.examples if ex.messages]
    return cols.fewshot_examples(pool, settings.fewshot_k, settings.seed)


def _paired(col_scores: dict[str, dict[str, list[float]]], settings: EvalSettings) -> dict:
    out = {}
    for tuned in ("tuned", "tuned+rag"):
        if tuned not in col_scores:
            continue
        for base in col_scores:
            if base == tuned or base in ("tuned", "tuned+rag") and tuned == "tuned":
                continue
            out[f"{tuned} - {base}"] = {
                m: bootstrap.paired_interval(col_scores[tuned][m], col_scores[base][m], settings.bootstrap_resamples,
                                             seed=settings.seed).to_dict()
                for m in col_scores[tuned]}
    return out


def _losses(loaded: Any, config: RunConfig, test: TestSet, cache: dict, settings: EvalSettings,
            tuned_model: Any) -> dict:
    examples = heldout.tokenize_heldout(test.examples, loaded.tokenizer, config.data.train_on, config.data.max_length,
                                        config.data.train_reasoning)
    out = {}
    with _base_model(loaded, config, cache) as (model, method):
        sums, tokens = heldout.example_losses(model, examples, method)
        out["base"] = heldout.loss_and_perplexity(sums, tokens, settings.bootstrap_resamples, settings.seed)
    with tuned_model():
        sums, tokens = heldout.example_losses(loaded.model, examples, config.method)
    out["tuned"] = heldout.loss_and_perplexity(sums, tokens, settings.bootstrap_resamples, settings.seed)
    return out


def _source_losses(loaded: Any, config: RunConfig, cache: dict, settings: EvalSettings, tuned_model: Any) -> dict:
    """A run on a mixture: the base and tuned held-out loss on each source's validation examples, prepared as training
    prepared them (each source's validation file, or its val_fraction split by the run's seed; the token cache)."""
    from tuneforge.data.dataset import prepare_data

    try:
        data = prepare_data(config.data, loaded.tokenizer, config.seed, config.task)
    except (OSError, ValueError) as e:       # a source moved or removed since training: the rest of the report stays
        log.warning("held-out loss by source left out: %s", e)
        return {}
    r, seed = settings.bootstrap_resamples, settings.seed
    out: dict[str, Any] = {}
    for name, examples in (data.mixture.validation_of(data.validation) if data.mixture is not None else []):
        if not examples:
            continue
        with _base_model(loaded, config, cache) as (model, method):
            base = heldout.loss_and_perplexity(*heldout.example_losses(model, examples, method), r, seed)
        with tuned_model():
            tuned = heldout.loss_and_perplexity(*heldout.example_losses(loaded.model, examples, config.method), r,
                                                seed)
        out[name] = {"n": len(examples), "base": base, "tuned": tuned}
    return out


def _forgetting(loaded: Any, config: RunConfig, cache: dict, questions: list, general_text: str,
                settings: EvalSettings, progress: bool, tuned_model: Any) -> dict:
    from tuneforge.methods.registry import get_method

    share = get_method(config.method).forward is None
    r, seed = settings.bootstrap_resamples, settings.seed
    bar = tqdm(total=2 * len(questions), desc="MMLU cloze", unit="q", disable=not progress, dynamic_ncols=True)
    with _base_model(loaded, config, cache) as (model, method):
        base = forget.score_mmlu(model, loaded.tokenizer, questions, method, share, progress=bar.update)
    with tuned_model():
        tuned = forget.score_mmlu(loaded.model, loaded.tokenizer, questions, config.method, share,
                                  progress=bar.update)
    bar.close()
    drop = bootstrap.paired_interval(base["correct"], tuned["correct"], r, seed=seed)
    subjects = sorted(set(base["subject"]))
    per_subject = {s: {"n": base["subject"].count(s),
                       "base": sum(c for c, x in zip(base["correct"], base["subject"], strict=True) if x == s),
                       "tuned": sum(c for c, x in zip(tuned["correct"], tuned["subject"], strict=True) if x == s)}
                   for s in subjects}
    windows = heldout.text_windows(general_text, loaded.tokenizer)
    with _base_model(loaded, config, cache) as (model, method):
        text_base = heldout.loss_and_perplexity(*heldout.example_losses(model, windows, method), r, seed)
    with tuned_model():
        text_tuned = heldout.loss_and_perplexity(*heldout.example_losses(loaded.model, windows, config.method), r,
                                                 seed)
    fs = settings.forgetting
    return {"questions": len(questions), "subjects": len(subjects),
            "subset": "full" if fs.per_subject is None else f"{fs.per_subject} a subject (seed 0)",
            "data": fs.data, "split": fs.split,
            "base": bootstrap.interval(base["correct"], r, seed=seed).to_dict(),
            "tuned": bootstrap.interval(tuned["correct"], r, seed=seed).to_dict(),
            "base_norm": bootstrap.interval(base["correct_norm"], r, seed=seed).to_dict(),
            "tuned_norm": bootstrap.interval(tuned["correct_norm"], r, seed=seed).to_dict(),
            "drop": drop.to_dict(), "max_drop": fs.max_drop, "passed": drop.value <= fs.max_drop,
            "per_subject": per_subject,
            "general_text": {"base": text_base, "tuned": text_tuned,
                             "file": fs.general_text or "tuneforge/recipes/data/general_text.jsonl"}}


def _metadata(run: RunRecord, config: RunConfig, settings: EvalSettings, started: float, max_new: int) -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    meta = {"base_model": config.model, "method": config.method, "task": config.task,
            "data": None if run.data is None else [d.to_dict() for d in run.data], "hyperparameters": {
                "learning_rate": config.learning_rate, "batch_size": config.batch_size,
                "max_steps": config.max_steps, "epochs": config.epochs, "seed": config.seed,
                **({k: v for k, v in config.section(config.method).model_dump().items()
                    if isinstance(v, int | float | str | bool)} if config.method in (config.model_extra or {})
                   else {})},
            "trainable_params": run.trainable_params, "total_params": run.total_params,
            "train_wall_time_s": run.wall_time_s, "steps": run.steps,
            "best_eval_loss": run.best_eval_loss, "device": run.device, "dtype": run.dtype,
            "eval_wall_time_s": round(time.time() - started, 2), "eval_peak_rss_mib": round(peak, 1),
            "max_new_tokens": max_new, "settings": settings.model_dump(mode="json"),
            "versions": run.versions}
    if torch.cuda.is_available():
        meta["eval_peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return meta


def _loss_curve(run_dir: Path) -> list[dict]:
    import json

    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rows.append({k: row[k] for k in ("step", "loss", "eval_loss") if k in row})
    return rows
