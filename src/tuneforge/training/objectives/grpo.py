"""GRPO (``task: grpo``): online RL with verifiable rewards, on padding-free packed rows.

**A step.** A micro-batch is ``batch_size`` prompts (:mod:`tuneforge.data.grpo`). When the loop first asks for its
normaliser (the loop does so for all of a step's micro-batches of this process before any forward), its rollout is made
(:meth:`GRPOObjective.rollout`): ``G = grpo.num_generations`` completions per prompt sampled with the current
policy (:func:`tuneforge.training.grpo_rollout.sample`: batched, KV-cached, eval mode, no grad, seeded by
``(seed, epoch, micro-batch)``), scored by the reward functions (:mod:`tuneforge.training.grpo_rewards`),
group-normalised into advantages (:func:`tuneforge.training.grpo_losses.group_advantages`), and packed as one row with
only the completion tokens trained: each prompt once, followed by its completions, each attending to the prompt and
itself (``grpo.share_prompt``, :func:`tuneforge.data.packing.pack_shared_prompts`), or, for methods and models that
cannot take that row, one ``prompt + completion`` sequence per completion. With ``grpo.dynamic_sampling`` (on for
``loss_type: dapo``) groups whose rewards are all equal are left out of the row (DAPO's filter; refilled, below).
The reference model's per-token log-probabilities (``beta > 0``: the method disabled, or the ``init_from`` model,
:func:`~tuneforge.training.objectives.reference.reference_model`) and, with ``num_iterations > 1``, the sampling
policy's are computed then, without grad. The loss
(:func:`~tuneforge.training.grpo_losses.per_token_losses`, :func:`~tuneforge.training.grpo_losses.loss_sum`) then
runs on the row with grad; with ``num_iterations == 1`` the "old" log-probabilities are the policy's own, detached
(TRL's shortcut: the ratio is 1 and its gradient the policy gradient).

**Refill.** When the filter leaves fewer than ``batch_size`` groups, up to ``grpo.max_refill_rounds`` more rounds of
``batch_size`` prompts are sampled (DAPO's dynamic sampling; verl's ``max_num_gen_batches``) and their groups with
reward variance added, in order, until the row has ``batch_size`` groups (the last round's surplus is not trained). A
round's prompts are the first of a permutation of the training prompts seeded by ``(seed, epoch, micro-batch,
round)`` that are not yet in this micro-batch (while some remain), and its completions are sampled with a seed of the
same key: a rollout is a function of its key and the policy, so resume needs no more state than without refill.
Advantages are normalised within each round (``scale_rewards: batch``: the round's std). A micro-batch still short
after the last round trains on the groups it has; the first such one is warned about. ``max_refill_rounds: 0``: no
refill.

**num_iterations.** Each block of ``gradient_accumulation_steps`` micro-batches is trained ``num_iterations`` steps
in a row on the same rollouts (an epoch is that many times longer: :meth:`Objective.repeats`), as TRL's
``steps_per_generation x num_iterations``. Every resumable checkpoint keeps the block's rollouts
(:mod:`tuneforge.training.grpo_saved_rollouts`): a run resumed inside a block trains its remaining steps on them, as
the uninterrupted run does, instead of sampling anew with the moved policy.

**Several processes (DDP).** The loop draws every process's micro-batches on each process but asks each for the
normaliser of its own share only (:attr:`Objective.local_normaliser`), summed over the processes: so each process
samples only its own micro-batches, with the seeds one process would use for them (the key), and 2 processes with 1
accumulation step train what 1 process with 2 trains. A block of ``num_iterations`` is a step's micro-batches of
all processes (``gradient_accumulation_steps x processes``). No collective runs inside a rollout (refill rounds
differ between processes): at the step's end (:meth:`GRPOObjective.end_step`) the rollout metrics are gathered and
summed (lengths' min and max: their extremes), and the main process writes every process's samples.jsonl rows in
micro-batch order. Each process checkpoints its own rollouts (:func:`~tuneforge.training.grpo_saved_rollouts.
rollouts_file`); a resumed run reads every process's. Validation: each process samples its share of the batches, the
reward sums added over the processes. FSDP2 and DeepSpeed refuse ``task: grpo`` (their ``check``).

**Metrics** (TRL's names): ``reward``, ``reward_std``, ``rewards/<name>/mean`` and ``/std`` (each function's, over
the completions it scored), ``frac_reward_zero_std`` (share of completions in groups of equal rewards),
``completions/mean_length``, ``/min_length``, ``/max_length``, ``completions/clipped_ratio`` (share that hit
``max_completion_length``) of the rollouts trained in the step (refill rounds' completions included); with refill
on, ``num_gen_batches`` (generation rounds per micro-batch, 1: no refill needed), ``refill/prompts`` (prompts
sampled by refill rounds) and ``refill/missing_groups`` (groups still short after the last round), over the step's
rollouts; counts a reward function hands over (``counts()``: the judge's ``failed`` and ``unparseable`` calls) as
``rewards/<name>/<key>``, summed over the step; ``kl`` (``beta > 0``), ``clip_ratio/low_mean``,
``clip_ratio/high_mean``, ``clip_ratio/region_mean`` over the trained completion tokens. ``samples.jsonl`` in the run
directory gets ``grpo.log_samples`` completions of each generation round with their rewards (``refill_round`` on a
refill round's). Validation: one greedy completion per prompt, ``eval_reward`` (the weighted
reward, higher is better) and each function's mean.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from tuneforge.data.grpo import GRPOPrompt, prepare_prompts
from tuneforge.data.packing import PackedBatch, epoch_order, pack, pack_shared_prompts
from tuneforge.data.rendering import TokenizedExample
from tuneforge.data.tool_formats import resolve, special_marker_ids
from tuneforge.errors import ConfigError
from tuneforge.methods.dispatch import shares_prompts
from tuneforge.training.grpo_losses import group_advantages, loss_sum, nanstd, per_token_losses
from tuneforge.training.grpo_rewards import Reward, build_rewards
from tuneforge.training.grpo_rollout import completion_logps, completion_mask, sample
from tuneforge.training.grpo_saved_rollouts import (
    Groups,
    Rollout,
    load_rollouts,
    rollouts_file,
    rollouts_files,
    save_rollouts,
)
from tuneforge.training.grpo_tool_calls import ToolCallReward
from tuneforge.training.objectives.base import Objective, ObjectiveOutput
from tuneforge.training.objectives.reference import FrozenWeights, reference_model

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.data.dataset import PreparedData

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
STATE_FILE = "grpo_state.json"          # in a resumable checkpoint: samples.jsonl's size then


@dataclass
class _Round:
    """One generation round of a rollout: ``prompts`` (one per group), the ``n = len(prompts) x G`` completions'
    token ids, their ``advantages [n]`` (fp64, normalised within the round), whether each group's rewards vary
    (``varied``), and the round's metric sums."""

    prompts: list[GRPOPrompt]
    ids: list[list[int]]
    advantages: torch.Tensor
    varied: list[bool]
    metrics: dict[str, float]


@dataclass
class GRPOBatch(PackedBatch):
    """A micro-batch of prompts; ``key`` names its rollout (``(epoch, micro-batch)``), made on first use."""

    prompts: list[GRPOPrompt] = field(default_factory=list)
    key: tuple[int, int] = (0, 0)
    rollout: Rollout | None = None
    logged: bool = False

    def to(self, device: torch.device | str) -> GRPOBatch:
        return self            # the rollout is made on the model's device

    @property
    def num_tokens(self) -> int:
        return self.rollout.packed.num_tokens if self.rollout is not None else 0


def _with_ids(row: PackedBatch, prompts: list[GRPOPrompt], key: tuple[int, int], ids: list[int]) -> GRPOBatch:
    batch = GRPOBatch(**{f.name: getattr(row, f.name) for f in fields(PackedBatch)}, prompts=prompts, key=key)
    batch.example_ids = ids
    return batch


def _fields(prompts: Sequence[GRPOPrompt], group: int) -> dict[str, list[Any]]:
    """The prompt records' other fields, one value per completion (None where a record lacks the key)."""
    keys = sorted({k for p in prompts for k in p.fields})
    return {k: [p.fields.get(k) for p in prompts for _ in range(group)] for k in keys}


def score(rewards: list[Reward], prompts: Sequence[GRPOPrompt], texts: list[str], ids: list[list[int]],
          group: int) -> torch.Tensor:
    """``[n, R]`` fp64 scores (NaN: not applicable) of ``n = len(prompts) x group`` completions (``ids``: their
    tokens)."""
    messages = [p.messages for p in prompts for _ in range(group)]
    extra = {**_fields(prompts, group), "completion_ids": ids, "completion_tokens": [len(i) for i in ids]}
    columns = [reward(messages, texts, extra) for reward in rewards]
    return torch.tensor(columns, dtype=torch.float64).T.reshape(len(texts), len(rewards))


def _sums(values: torch.Tensor, key: str) -> dict[str, float]:
    """NaN-free sum, sum of squares and count of ``values`` under ``key``."""
    kept = values[~torch.isnan(values)]
    return {f"{key}/sum": float(kept.sum()), f"{key}/sq": float((kept ** 2).sum()), f"{key}/n": float(kept.numel())}


def _counts(reward: Reward) -> dict[str, int]:
    """The counts a reward function hands over (its ``counts()``, e.g. the judge's failed calls), reset there."""
    counts = getattr(reward.fn, "counts", None)
    return counts() if callable(counts) else {}


def _merge(into: dict[str, float], metrics: dict[str, float]) -> None:
    """Add a rollout's (or round's) metric sums to ``into``: sums added, ``length/min`` and ``/max`` their extreme."""
    for key, value in metrics.items():
        if key in into and key in ("length/min", "length/max"):
            into[key] = min(into[key], value) if key == "length/min" else max(into[key], value)
        else:
            into[key] = into.get(key, 0.0) + value


def _in_order(per_process: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The samples.jsonl rows of a step's processes (each process's in the order it sampled) as one process writes
    them: by micro-batch ``(epoch, micro_batch)``, the rounds of a rollout in their order; a micro-batch two processes
    both sampled (a step holding it twice, at the end of an epoch with ``num_iterations > 1``) once."""
    by_key: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for rows in per_process:
        mine: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for row in rows:
            mine.setdefault((row["epoch"], row["micro_batch"]), []).append(row)
        for key, kept in mine.items():
            by_key.setdefault(key, kept)
    return [row for key in sorted(by_key) for row in by_key[key]]


def _mean_std(sums: dict[str, float], key: str) -> tuple[float, float] | None:
    n = sums.get(f"{key}/n", 0.0)
    if not n:
        return None
    mean = sums[f"{key}/sum"] / n
    var = max(0.0, sums[f"{key}/sq"] / n - mean ** 2) * (n / (n - 1) if n > 1 else 0.0)
    return mean, math.sqrt(var)


class GRPOObjective(Objective):
    """GRPO (module docstring)."""

    eval_metric = "eval_reward"
    higher_is_better = True
    watches_divergence = False       # the loss starts near 0 and changes sign; a zero gradient: nothing to learn yet
    local_normaliser = True          # the normaliser makes the rollout: each process its own micro-batches'

    def __init__(self, task: str) -> None:
        super().__init__(task)
        self.rewards: list[Reward] = []
        self.tokenizer: Any = None
        self.model: torch.nn.Module | None = None
        self.init_weights: FrozenWeights | None = None
        self.rollouts: dict[tuple[int, int], Rollout] = {}
        self.pending: dict[str, float] = {}
        self.autocast: tuple[str, torch.dtype, bool] = ("cpu", torch.bfloat16, False)
        self.samples_path: Path | None = None
        self.sample_rows: list[dict[str, Any]] = []   # samples.jsonl's rows of this step's rollouts (end_step writes)
        self.accumulation = 1            # gradient_accumulation_steps x processes: a block of rollouts (a step's)
        self.repeats_now = 1             # num_iterations (validation batches: 1)
        self.config: RunConfig | None = None
        self.keep: frozenset[int] = frozenset()     # special tokens kept in completion texts (tool-call markers)
        self.share_prompt = False                   # each prompt once in the trained row (before_training decides)
        self.train_prompts: list[GRPOPrompt] = []    # where refill rounds draw from
        self.warned_refill = False

    # ---------------------------------------------------------------- data

    def prepare_data(self, config: RunConfig, tokenizer: Any) -> PreparedData:
        """The reward functions (imported and checked first: a bad one fails before the data is read), then the
        prompts, each checked for the fields the rewards read."""
        fmt = None
        if any(spec.name == "tool_call" for spec in config.grpo.rewards):
            try:
                fmt = resolve(config.data.tool_call_format, tokenizer.chat_template)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.rewards = build_rewards(config.grpo.rewards, fmt)
        called = [r.fn.fmt for r in self.rewards if isinstance(r.fn, ToolCallReward)]
        self.keep = frozenset(special_marker_ids(tokenizer, called[0]).values()) if called else frozenset()
        self.tokenizer, self.config = tokenizer, config
        self.accumulation = config.gradient_accumulation_steps * self.processes.world
        needs = {r.name: r.needs for r in self.rewards if r.needs}
        data = prepare_prompts(config.data, tokenizer, config.seed, needs, config.grpo.max_completion_length)
        self.train_prompts = cast(list[GRPOPrompt], data.train)
        return data

    def repeats(self, config: RunConfig) -> int:
        return config.grpo.num_iterations

    def micro_batches(self, examples: Sequence[Any], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                      start: int = 0) -> Iterator[PackedBatch]:
        """Micro-batches of ``batch_size`` prompts in :func:`epoch_order`; training (``shuffle``) repeats each block of
        ``gradient_accumulation_steps`` of them ``num_iterations`` times (one epoch: that many times longer), from
        micro-batch ``start`` on. Validation (``shuffle=False``): each once."""
        order = list(epoch_order(len(examples), batch_size, seed, epoch, shuffle))
        repeats = self.repeats_now if shuffle else 1
        block = self.accumulation
        for m in range(start, len(order) * repeats):
            g, within = divmod(m, block * repeats)
            size = min(block, len(order) - g * block)
            p = g * block + within % size
            ids = order[p]
            yield _with_ids(pack([TokenizedExample([0], [False])]), [examples[i] for i in ids], (epoch, p), ids)

    # ---------------------------------------------------------------- set-up

    def before_training(self, model: torch.nn.Module, data: PreparedData, config: RunConfig,
                        device: torch.device) -> None:
        """Keep the model (rollouts sample from it) and the run's autocast; the frozen ``init_from`` adapter as the
        reference (``beta > 0``)."""
        self.model, self.config = model, config
        self.repeats_now = config.grpo.num_iterations
        self.accumulation = config.gradient_accumulation_steps * self.processes.world
        kind = device.type
        self.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        if config.init_from and config.grpo.beta > 0:
            self.init_weights = FrozenWeights(model)
        self.samples_path = Path(config.output_dir) / SAMPLES_FILE
        self.share_prompt = config.grpo.share_prompt and shares_prompts(model, config)
        if config.grpo.share_prompt and not self.share_prompt:
            log.info("grpo.share_prompt: each completion trains with its own copy of the prompt (the model's "
                     "attention is not tuneforge's packed attention, or the method re-packs rows)")

    def save_process_state(self, folder: Path) -> None:
        """``num_iterations > 1``: this process's cached rollouts (the current block's) into ``folder``
        (:mod:`tuneforge.training.grpo_saved_rollouts`, one file per process), so that a run resumed inside the block
        trains on them."""
        if self.repeats_now > 1 and self.rollouts:
            save_rollouts(self.rollouts, folder / rollouts_file(self.processes.rank))

    def save_state(self, folder: Path) -> None:
        """How many bytes ``samples.jsonl`` holds, so that a resumed run drops the samples its killed predecessor
        wrote after this checkpoint (it writes them again)."""
        size = self.samples_path.stat().st_size if self.samples_path and self.samples_path.is_file() else 0
        (folder / STATE_FILE).write_text(json.dumps({"samples_bytes": size}))

    def load_state(self, folder: Path, device: torch.device) -> None:
        """Every process's saved rollouts (a rollout is found by its key, so a run may resume on another number of
        processes); the main process cuts ``samples.jsonl`` back to the checkpoint's size."""
        self.rollouts = {}
        for path in rollouts_files(folder):
            self.rollouts.update(load_rollouts(path, device, self._pack))
        state = folder / STATE_FILE
        if (self.processes.is_main and state.is_file() and self.samples_path is not None
                and self.samples_path.is_file()):
            size = int(json.loads(state.read_text())["samples_bytes"])
            if self.samples_path.stat().st_size > size:
                with open(self.samples_path, "r+b") as f:
                    f.truncate(size)

    def _autocast(self) -> Any:
        kind, dtype, enabled = self.autocast
        return torch.autocast(kind, dtype=dtype, enabled=enabled)

    # ---------------------------------------------------------------- rollouts

    def rollout(self, batch: GRPOBatch, config: RunConfig) -> Rollout:
        """``batch``'s rollout (made now, or the one made for its key in this block of steps)."""
        if batch.rollout is not None:
            return batch.rollout
        cached = self.rollouts.get(batch.key)
        if cached is None:
            if self.repeats_now == 1:
                self.rollouts.clear()
            else:       # a new block: the rollouts of the last one are done with
                block = batch.key[1] // self.accumulation
                self.rollouts = {k: v for k, v in self.rollouts.items()
                                 if k[0] == batch.key[0] and k[1] // self.accumulation == block}
            cached = self.rollouts[batch.key] = self._make_rollout(batch, config)
        batch.rollout = cached
        if not batch.logged:
            batch.logged = True
            _merge(self.pending, cached.metrics)
        return cached

    def _seed(self, key: tuple[int, int], round: int, stream: int = 0) -> int:
        """The seed of micro-batch ``key``'s generation round ``round`` (0: its own prompts): ``stream`` 0 its
        sampling, 1 the draw of its refill prompts."""
        assert self.config is not None
        epoch, index = key
        seed = (self.config.seed * 1_000_003 + epoch) * 1_000_033 + index
        if round == 0 and stream == 0:
            return seed
        return (seed * 1_000_037 + 2 * round + stream) % 2 ** 63

    def _sample_round(self, prompts: list[GRPOPrompt], key: tuple[int, int], round: int,
                      config: RunConfig) -> _Round:
        """``G`` completions of each of ``prompts``, sampled with round ``round``'s seed, scored and normalised."""
        assert self.model is not None, "before_training sets the model"
        grpo, group = config.grpo, config.grpo.num_generations
        inputs = [p.input_ids for p in prompts for _ in range(group)]
        with self._autocast():
            samples = sample(self.model, self.tokenizer, inputs, config, self._seed(key, round), keep=self.keep)
        tokens = [len(ids) for ids in samples.ids]
        scores = score(self.rewards, prompts, samples.texts, samples.ids, group)
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float64)
        adv = group_advantages(scores, weights, group, grpo.scale_rewards)
        spread = nanstd(adv.rewards.view(-1, group), dim=1)
        equal = torch.isnan(spread) | torch.isclose(spread, torch.zeros_like(spread))
        metrics = self._rollout_metrics(scores, adv.rewards, adv.zero_std, tokens, samples.stopped)
        self._write_samples(prompts, key, round, samples.texts, scores, adv.rewards, adv.advantages)
        return _Round(prompts, samples.ids, adv.advantages, [not e for e in equal.tolist()], metrics)

    def _refill_prompts(self, batch: GRPOBatch, round: int, used: set[int]) -> list[GRPOPrompt]:
        """Refill round ``round``'s ``batch_size`` prompts: the first of a permutation of the training prompts seeded
        by the micro-batch's key and the round, skipping ``used`` (the micro-batch's and earlier rounds'; added to
        it) while others remain."""
        n = len(self.train_prompts)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self._seed(batch.key, round, 1)))
        fresh = [i for i in order.tolist() if i not in used][:len(batch.prompts)]
        fresh += order.tolist()[:len(batch.prompts) - len(fresh)]
        used.update(fresh)
        return [self.train_prompts[i] for i in fresh]

    def _make_rollout(self, batch: GRPOBatch, config: RunConfig) -> Rollout:
        """Sample, score and pack ``batch``'s rollout (module docstring), refilling filtered groups."""
        assert self.model is not None, "before_training sets the model"
        grpo, model, group = config.grpo, self.model, config.grpo.num_generations
        drops, target = grpo.drops_zero_variance(), len(batch.prompts)
        rounds = [self._sample_round(batch.prompts, batch.key, 0, config)]
        kept = sum(rounds[0].varied) if drops else target
        used = set(batch.example_ids)
        while kept < target and len(rounds) <= grpo.max_refill_rounds:
            more = self._refill_prompts(batch, len(rounds), used)
            rounds.append(self._sample_round(more, batch.key, len(rounds), config))
            kept += sum(rounds[-1].varied)
        groups: Groups = []
        picked: list[torch.Tensor] = []
        for r in rounds:            # the groups with reward variance (all, without dynamic sampling), up to target
            rows: list[int] = []
            for g, prompt in enumerate(r.prompts):
                if drops and (not r.varied[g] or len(groups) == target):
                    continue
                groups.append((prompt.input_ids, r.ids[g * group:(g + 1) * group]))
                rows.extend(range(g * group, (g + 1) * group))
            picked.append(r.advantages[rows])
        metrics: dict[str, float] = {}
        for r in rounds:
            _merge(metrics, r.metrics)
        if drops and grpo.max_refill_rounds:
            metrics.update({"refill/micro_batches": 1.0, "refill/gen_batches": float(len(rounds)),
                            "refill/prompts": float(target * (len(rounds) - 1)),
                            "refill/missing": float(target - len(groups))})
            if len(groups) < target and not self.warned_refill:
                self.warned_refill = True
                log.warning("grpo: micro-batch %d of epoch %d has %d of %d groups with reward variance after "
                            "grpo.max_refill_rounds %d refill rounds; it trains on those (raise max_refill_rounds, "
                            "or look at the rewards in samples.jsonl: they may be equal on most prompts). Warned once",
                            batch.key[1], batch.key[0], len(groups), target, grpo.max_refill_rounds)
        device = next(model.parameters()).device
        packed = self._pack(groups).to(device)
        advantages = torch.cat(picked).to(device=device, dtype=torch.float32)
        ref = old = None
        if groups and grpo.beta > 0:
            with self._autocast(), reference_model(model, config, self.init_weights):
                ref = completion_logps(model, packed, config)
        if groups and grpo.num_iterations > 1:
            with self._autocast(), torch.no_grad():
                old = completion_logps(model, packed, config)
        return Rollout(groups, packed, advantages, ref, old, metrics)

    def _pack(self, groups: Groups) -> PackedBatch:
        """The trained row of ``groups`` (``(prompt, completions)``), only the completions trained: each prompt
        once, followed by its completions (``grpo.share_prompt``, :func:`pack_shared_prompts`), or
        ``prompt + completion`` per completion; no group: a one-token row of 0 examples."""
        if not groups:
            packed = pack([TokenizedExample([0], [False])])
            packed.num_examples = 0
            return packed
        if self.share_prompt:
            return pack_shared_prompts([(prompt, list(completions)) for prompt, completions in groups])
        return pack([TokenizedExample(prompt + ids, [False] * len(prompt) + [True] * len(ids))
                     for prompt, completions in groups for ids in completions])

    def _rollout_metrics(self, scores: torch.Tensor, rewards: torch.Tensor, zero_std: torch.Tensor,
                         tokens: list[int], stopped: list[bool]) -> dict[str, float]:
        out = {**_sums(rewards, "reward"), "zero_std": float(zero_std.sum()), "completions": float(len(tokens)),
               "length/sum": float(sum(tokens)), "length/min": float(min(tokens)), "length/max": float(max(tokens)),
               "clipped": float(sum(not s for s in stopped))}
        for i, reward in enumerate(self.rewards):
            out.update(_sums(scores[:, i], f"rewards/{reward.name}"))
            for key, value in _counts(reward).items():
                out[f"count/rewards/{reward.name}/{key}"] = float(value)
        return out

    def _write_samples(self, prompts: list[GRPOPrompt], key: tuple[int, int], round: int, texts: list[str],
                       scores: torch.Tensor, rewards: torch.Tensor, advantages: torch.Tensor) -> None:
        """Keep ``grpo.log_samples`` rows of a generation round for samples.jsonl (:meth:`end_step` writes them)."""
        count = self.config.grpo.log_samples if self.config is not None else 0
        if not count or self.samples_path is None:
            return
        group = len(texts) // max(1, len(prompts))
        for i in range(min(count, len(texts))):
            prompt = prompts[i // group]
            self.sample_rows.append({
                "epoch": key[0], "micro_batch": key[1], **({"refill_round": round} if round else {}),
                "prompt": prompt.where, "completion": texts[i],
                "reward": None if math.isnan(rewards[i]) else float(rewards[i]), "advantage": float(advantages[i]),
                "rewards": {r.name: None if math.isnan(scores[i, j]) else float(scores[i, j])
                            for j, r in enumerate(self.rewards)}})

    def end_step(self) -> None:
        """Every process, once a step has trained: the rollout metrics of the step summed over the processes
        (``length/min`` and ``/max``: their extremes), and the step's samples.jsonl rows written by the main process
        in micro-batch order (as one process writes them: :func:`_in_order`)."""
        rows, self.sample_rows = self.sample_rows, []
        if self.processes.world > 1:
            gathered = self.processes.all_gather_objects((self.pending, rows))
            self.pending = {}
            for pending, _ in gathered:            # rank order
                _merge(self.pending, pending)
            rows = _in_order([r for _, r in gathered])
        if rows and self.processes.is_main and self.samples_path is not None:
            with open(self.samples_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    # ---------------------------------------------------------------- the loss

    def normaliser(self, batch: PackedBatch) -> float:
        assert isinstance(batch, GRPOBatch), "task 'grpo' trains on GRPOBatch (GRPOObjective.micro_batches)"
        assert self.config is not None
        r = self.rollout(batch, self.config)
        if r.num_sequences == 0:
            return 0.0
        if self.config.grpo.loss_type == "dapo":
            return float(r.packed.num_loss_tokens)
        return float(r.num_sequences)

    def loss(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> ObjectiveOutput:
        assert isinstance(batch, GRPOBatch)
        grpo, r = config.grpo, self.rollout(batch, config)
        logps = completion_logps(model, r.packed, config)
        mask = completion_mask(r.packed)
        old = r.old if r.old is not None else logps.detach()
        tok = per_token_losses(logps, old, r.ref, r.advantages, grpo.beta, grpo.epsilon,
                               grpo.epsilon_high if grpo.epsilon_high is not None else grpo.epsilon)
        total, units = loss_sum(tok.loss, mask, grpo.loss_type, grpo.max_completion_length)
        metrics = {"tokens": float(mask.sum()), "clip/low": float((tok.low_clipped * mask).sum()),
                   "clip/high": float((tok.high_clipped * mask).sum())}
        if tok.kl is not None:
            metrics["kl"] = float((tok.kl.detach() * mask).sum())
        return ObjectiveOutput(total, units, metrics)

    def mean_metrics(self, sums: dict[str, float], normaliser: float) -> dict[str, float]:
        """The step's metrics (module docstring): the loss's, over its trained tokens, and the rollouts' trained
        in this step (then cleared)."""
        out: dict[str, float] = {}
        tokens = sums.get("tokens", 0.0)
        if tokens:
            out["clip_ratio/low_mean"] = sums["clip/low"] / tokens
            out["clip_ratio/high_mean"] = sums["clip/high"] / tokens
            out["clip_ratio/region_mean"] = (sums["clip/low"] + sums["clip/high"]) / tokens
            if "kl" in sums:
                out["kl"] = sums["kl"] / tokens
        out.update(self._rollout_means(self.pending))
        self.pending = {}
        return out

    def _rollout_means(self, sums: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        n = sums.get("completions", 0.0)
        if not n:
            return out
        reward = _mean_std(sums, "reward")
        if reward is not None:
            out["reward"], out["reward_std"] = reward
        for r in self.rewards:
            stats = _mean_std(sums, f"rewards/{r.name}")
            if stats is not None:
                out[f"rewards/{r.name}/mean"], out[f"rewards/{r.name}/std"] = stats
        out["frac_reward_zero_std"] = sums["zero_std"] / n
        out["completions/mean_length"] = sums["length/sum"] / n
        out["completions/min_length"] = sums["length/min"]
        out["completions/max_length"] = sums["length/max"]
        out["completions/clipped_ratio"] = sums["clipped"] / n
        out.update({key.removeprefix("count/"): value for key, value in sums.items() if key.startswith("count/")})
        if sums.get("refill/micro_batches"):         # dynamic sampling with refill (verl's num_gen_batches)
            out["num_gen_batches"] = sums["refill/gen_batches"] / sums["refill/micro_batches"]
            out["refill/prompts"] = sums["refill/prompts"]
            out["refill/missing_groups"] = sums["refill/missing"]
        return out

    # ---------------------------------------------------------------- validation

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: list[PackedBatch], device: torch.device,
                 config: RunConfig) -> dict[str, float]:
        """One greedy completion per validation prompt: ``eval_reward`` (the weighted reward's mean) and each
        function's mean. Several processes: each samples its share of the batches (``rank::world``) and the sums
        are added over the processes (every process gets the same metrics)."""
        totals: dict[str, float] = {}
        processes = self.processes
        for batch in batches[processes.rank::processes.world]:
            assert isinstance(batch, GRPOBatch)
            samples = sample(model, self.tokenizer, [p.input_ids for p in batch.prompts], config, seed=0, greedy=True,
                             keep=self.keep)
            scores = score(self.rewards, batch.prompts, samples.texts, samples.ids, 1)
            for reward in self.rewards:
                _counts(reward)             # validation's failed judge calls are not the next step's
            weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float64)
            rewards = (scores * weights).nansum(dim=1)
            rewards[torch.isnan(scores).all(dim=1)] = torch.nan
            for key, values in [("reward", rewards)] + [(f"rewards/{r.name}", scores[:, i])
                                                        for i, r in enumerate(self.rewards)]:
                for k, v in _sums(values, key).items():
                    totals[k] = totals.get(k, 0.0) + v
        if processes.world > 1:
            parts, totals = processes.all_gather_objects(totals), {}
            for part in parts:                     # rank order
                for k, v in part.items():
                    totals[k] = totals.get(k, 0.0) + v
        out = {}
        for key in ["reward"] + [f"rewards/{r.name}" for r in self.rewards]:
            stats = _mean_std(totals, key)
            name = "eval_reward" if key == "reward" else f"eval_{key}/mean"
            out[name] = stats[0] if stats is not None else 0.0
        return out
