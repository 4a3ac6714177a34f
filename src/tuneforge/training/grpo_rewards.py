"""GRPO's reward functions (``grpo.rewards``): built-ins, a Python ``module:function``, a reward-model run.

Every reward function is called on a micro-batch's ``n`` completions as
``f(prompts, completions, **fields, **options)``: ``prompts`` the ``n`` prompts as chat messages (one list of
``{"role", "content"}`` each; a prompt is repeated for each of its ``G`` completions), ``completions`` the ``n``
completion texts, ``fields`` the other fields of each completion's prompt record (one list of ``n`` values per key,
as TRL passes a dataset's columns), plus ``completion_ids`` (each completion's token ids, its end-of-turn token
included where it stopped) and ``completion_tokens`` (their counts); ``options``
the function's ``options:``. It returns ``n`` floats, or None for a completion it does not apply to (left out of
the sums, as TRL). A wrong number of scores, or a NaN, is a :class:`RewardError` naming the function.

Built-ins (``name:``; the record field each reads is an option, ``field``, with the default shown):

=================== =========================================================================================
``exact_match``     1 if the completion (stripped) equals the record's ``answer``, else 0
``normalized_match`` 1 if equal after lower-casing, dropping punctuation and collapsing whitespace (``answer``);
                    ``pattern``: a regex whose last match's first group (or whole match) is the answer compared
``label_match``     1 if the label found in the completion equals the record's ``label``: ``labels`` (a list) names
                    the candidates, the first one the completion mentions (any case) is its label; without
                    ``labels`` the normalised completion is
``regex``           1 if ``pattern`` is found in the completion (``full: true``: matches all of it), else 0
``json_valid``      1 if the completion (a fenced ```json block taken out) parses as JSON, else 0
``json_schema``     1 if it parses and validates against ``schema`` (a JSON Schema in the options, or
                    ``schema_field``: each record's own), else 0
``length_penalty``  ``-max(0, completion_tokens - max_tokens) / max_tokens`` (``max_tokens`` required): 0 up to
                    the limit, -1 at twice it
``reward_model``    the score of a ``task: reward`` run (``run: DIR``) for prompt + completion
``judge``           an LLM's score in [0, 1] through an OpenAI-compatible endpoint
                    (:mod:`tuneforge.training.grpo_judge`: ``base_url``, ``model``, a template, the parse rule)
``tool_call``       the completion's tool calls against the record's ``tool_calls``: name, arguments and schema
                    parts, weighted (:mod:`tuneforge.training.grpo_tool_calls`)
=================== =========================================================================================

A reward function may have a ``counts()`` method: the counts it returns (e.g. the judge's failed calls) are
summed over each step and logged as ``rewards/<name>/<key>``.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuneforge.data.tool_formats import FORMATS, HERMES
from tuneforge.errors import RewardError
from tuneforge.training.grpo_judge import JudgeReward
from tuneforge.training.grpo_tool_calls import ToolCallReward

if TYPE_CHECKING:
    from tuneforge.config.run import RewardSpec
    from tuneforge.data.tool_formats import ToolCallFormat

Messages = list[dict[str, Any]]
RewardFn = Callable[..., Sequence[float | None]]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def _extract(completion: str, pattern: str | None) -> str:
    if not pattern:
        return completion
    matches = list(re.finditer(pattern, completion))
    if not matches:
        return ""
    last = matches[-1]
    return last.group(1) if last.groups() else last.group(0)


def exact_match(prompts: list[Messages], completions: list[str], field: str = "answer",
                **fields: Any) -> list[float]:
    return [float(c.strip() == _text(a).strip()) for c, a in zip(completions, fields[field], strict=True)]


def normalized_match(prompts: list[Messages], completions: list[str], field: str = "answer",
                     pattern: str | None = None, **fields: Any) -> list[float]:
    return [float(normalize(_extract(c, pattern)) == normalize(_text(a)))
            for c, a in zip(completions, fields[field], strict=True)]


def label_match(prompts: list[Messages], completions: list[str], field: str = "label",
                labels: list[str] | None = None, **fields: Any) -> list[float]:
    def found(completion: str) -> str:
        if not labels:
            return normalize(completion)
        lowered = completion.lower()
        hits = [(lowered.find(str(label).lower()), str(label)) for label in labels]
        hits = [(i, label) for i, label in hits if i >= 0]
        return normalize(min(hits)[1]) if hits else ""
    return [float(found(c) == normalize(_text(a))) for c, a in zip(completions, fields[field], strict=True)]


def regex(prompts: list[Messages], completions: list[str], pattern: str = "", full: bool = False,
          **fields: Any) -> list[float]:
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.fullmatch if full else compiled.search
    return [float(match(c.strip() if full else c) is not None) for c in completions]


FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL)


def _parse_json(completion: str) -> tuple[bool, Any]:
    fenced = FENCE.search(completion)
    try:
        return True, json.loads(fenced.group(1) if fenced else completion)
    except ValueError:
        return False, None


def json_valid(prompts: list[Messages], completions: list[str], **fields: Any) -> list[float]:
    return [float(_parse_json(c)[0]) for c in completions]


def json_schema(prompts: list[Messages], completions: list[str], schema: dict | None = None,
                schema_field: str | None = None, **fields: Any) -> list[float]:
    from jsonschema.validators import validator_for

    out = []
    schemas = fields[schema_field] if schema_field else [schema] * len(completions)
    for completion, one in zip(completions, schemas, strict=True):
        ok, value = _parse_json(completion)
        one = json.loads(one) if isinstance(one, str) else one
        out.append(float(ok and validator_for(one)(one).is_valid(value)))
    return out


def length_penalty(prompts: list[Messages], completions: list[str], max_tokens: int = 0,
                   completion_tokens: Sequence[int] = (), **fields: Any) -> list[float]:
    return [-max(0, n - max_tokens) / max_tokens for n in completion_tokens]


def _check_options(name: str, options: dict[str, Any]) -> None:
    """The built-in's options that must be there and make sense, checked when the run starts."""
    def need(key: str) -> None:
        if options.get(key) in (None, ""):
            raise RewardError(f"grpo.rewards: {name} needs options.{key}")
    if name == "regex":
        need("pattern")
    for key in ("pattern",):
        if options.get(key):
            try:
                re.compile(options[key])
            except re.error as e:
                raise RewardError(f"grpo.rewards: {name} options.{key} {options[key]!r} is no regex: {e}") from None
    if name == "json_schema":
        if not options.get("schema") and not options.get("schema_field"):
            raise RewardError("grpo.rewards: json_schema needs options.schema (a JSON Schema) or options.schema_field "
                              "(the record field holding each prompt's schema)")
        if options.get("schema"):
            from jsonschema import SchemaError
            from jsonschema.validators import validator_for

            try:
                validator_for(options["schema"]).check_schema(options["schema"])
            except SchemaError as e:
                raise RewardError(f"grpo.rewards: json_schema options.schema is no valid JSON Schema: "
                                  f"{e.message}") from None
    if name == "length_penalty":
        if not isinstance(options.get("max_tokens"), int) or options["max_tokens"] < 1:
            raise RewardError("grpo.rewards: length_penalty needs options.max_tokens (a positive integer)")


BUILTINS: dict[str, RewardFn] = {"exact_match": exact_match, "normalized_match": normalized_match,
                                 "label_match": label_match, "regex": regex, "json_valid": json_valid,
                                 "json_schema": json_schema, "length_penalty": length_penalty}
OTHERS = ("reward_model", "judge", "tool_call")      # built-ins set up by build_rewards itself
# the record field each built-in reads (an option names another)
FIELDS = {"exact_match": ("field", "answer"), "normalized_match": ("field", "answer"),
          "label_match": ("field", "label"), "json_schema": ("schema_field", None)}


@dataclass
class Reward:
    """One configured reward function: its ``name`` (what the logs call it), ``weight``, the callable and its
    options, and the record fields it needs (checked on every prompt record before the first step)."""

    name: str
    weight: float
    fn: RewardFn
    options: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()

    def __call__(self, prompts: list[Messages], completions: list[str], fields: dict[str, list[Any]]) -> list[float]:
        """``n`` scores (NaN for None: does not apply); :class:`RewardError` for a wrong count or a NaN."""
        try:
            scores = list(self.fn(prompts, completions, **fields, **self.options))
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"grpo.rewards: {self.name} failed: {type(e).__name__}: {e}") from e
        if len(scores) != len(completions):
            raise RewardError(f"grpo.rewards: {self.name} returned {len(scores)} scores for {len(completions)} "
                              "completions: return one float (or None) per completion")
        out = []
        for i, s in enumerate(scores):
            if s is None:
                out.append(math.nan)
                continue
            try:
                value = float(s)
            except (TypeError, ValueError):
                raise RewardError(f"grpo.rewards: {self.name} returned {s!r} (a {type(s).__name__}) for completion "
                                  f"{i}: return a float, or None where it does not apply") from None
            if not math.isfinite(value):
                raise RewardError(f"grpo.rewards: {self.name} returned {value} for completion {i} "
                                  f"({completions[i][:60]!r}): return a finite float, or None where it does not apply")
            out.append(value)
        return out


def _import(name: str) -> RewardFn:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise RewardError(f"grpo.rewards: {name!r} is neither a built-in ({', '.join([*BUILTINS, *OTHERS])}) "
                          "nor module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise RewardError(f"grpo.rewards: {name}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                          "put it on PYTHONPATH or next to the config") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"grpo.rewards: {name}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                          f"function {attr!r}")
    return fn


def _reward_model(options: dict[str, Any]) -> RewardFn:
    """The scores of a ``task: reward`` run, computed as :class:`tuneforge.evaluation.reward_model.RewardModel`
    computes them (each prompt + completion rendered as training rendered a pair's side, the run's head read at the
    last token of packed rows). Built here from the layers below the stages (a stage imports no other), and tested
    equal to ``RewardModel.score`` (``tests/test_grpo.py``)."""
    import torch

    from tuneforge.config import load_config
    from tuneforge.data.packing import pack
    from tuneforge.data.preference import tokenize_side
    from tuneforge.methods.reward_head import load_score_head, packed_rewards
    from tuneforge.runs import load_run
    from tuneforge.runs.layout import RunDir

    if not options.get("run"):
        raise RewardError("grpo.rewards: reward_model needs options.run (a task: reward run directory)")
    run = RunDir(options["run"])
    if not run.config.is_file():
        raise RewardError(f"grpo.rewards: reward_model: {run.path} is not a tuneforge run directory (no config.yaml)")
    task = load_config(run.config, check_files=False).task
    if task != "reward":
        raise RewardError(f"grpo.rewards: reward_model: {run.path} is a task: {task} run, not a reward model (train "
                          "one with task: reward)")
    loaded = load_run(run.path, device=options.get("device", "auto"))
    assert loaded.config is not None
    config, model, tokenizer = loaded.config, loaded.model, loaded.tokenizer
    load_score_head(model, run.path)
    model.eval()
    device = next(model.parameters()).device
    per_row = int(options.get("batch_size", 16))

    @torch.no_grad()
    def score(prompts: list[Messages], completions: list[str], **ignored: Any) -> list[float]:
        system = config.data.system_prompt
        sequences = []
        for messages, completion in zip(prompts, completions, strict=True):
            if system and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system}, *messages]
            sequences.append(tokenize_side(messages, {"role": "assistant", "content": completion}, tokenizer,
                                           config.data.train_reasoning))
        out: list[float] = []
        for start in range(0, len(sequences), per_row):
            batch = pack(sequences[start:start + per_row]).to(device)
            out += packed_rewards(model, batch, config.method).tolist()
        return out
    return score


def build_rewards(specs: Sequence[RewardSpec], tool_format: ToolCallFormat | None = None) -> list[Reward]:
    """The configured reward functions, imported and checked (:class:`RewardError` in one line). ``tool_format``:
    the run's tool-call format, which ``tool_call`` reads completions with (unless its ``options.format``; none:
    Hermes)."""
    out = []
    names: dict[str, int] = {}
    for spec in specs:
        options = dict(spec.options)
        names[spec.name] = names.get(spec.name, 0) + 1
        label = spec.name if names[spec.name] == 1 else f"{spec.name}#{names[spec.name]}"
        fn: RewardFn
        needs: tuple[str, ...]
        if spec.name == "judge":
            judge = JudgeReward(options, name=label)     # its messages name it as its metrics do (judge#2)
            fn, needs, options = judge, judge.needs, {}
        elif spec.name == "tool_call":
            name = options.get("format")
            if name is not None and name not in FORMATS:
                raise RewardError(f"grpo.rewards: tool_call options.format is {name!r}; write one of "
                                  f"{', '.join(FORMATS)}, or leave it out for the run's data.tool_call_format")
            tool = ToolCallReward(options, FORMATS[name] if name else tool_format or HERMES)
            fn, needs, options = tool, tool.needs, {}
        elif spec.name in BUILTINS:
            _check_options(spec.name, options)
            fn, needs = BUILTINS[spec.name], ()
            if spec.name in FIELDS:
                key, default = FIELDS[spec.name]
                needs = tuple(f for f in [options.get(key, default)] if f)
        elif spec.name == "reward_model":
            fn, needs, options = _reward_model(options), (), {}
        else:
            fn, needs = _import(spec.name), tuple(options.pop("needs", ()) or ())
        out.append(Reward(label, spec.weight, fn, options, needs))
    return out
