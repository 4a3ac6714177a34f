"""Merge a LoRA / DoRA / IA3 / QLoRA adapter into its base model, save it, and prove the merge.

For LoRA the merged weight is ``W = W0 + (alpha / r) B A`` (DoRA: ``m * (W0 + s B A) / ||W0 + s B A||``
row-wise; IA3: ``W0`` scaled by ``l`` on its output rows or feed-forward input columns), computed by
peft's ``merge_and_unload`` in fp32 and only then cast to the requested dtype. QLoRA adapters merge into
the *unquantized* base (the original weights, never the 4-bit ones).

Every merge is checked before the folder is published: the saved merged weights are loaded back and
their logits on a few prompts are compared with the unmerged model (base + adapter, fp32). The check
fails (:class:`MergeCheckError`) when the max absolute logit difference exceeds a dtype-appropriate
tolerance, or when the greedy next token differs where the unmerged model's top-2 margin is larger than
that tolerance (a real disagreement, not a near-tie). The tolerance is measured, not guessed: ``2 * noise +
1e-4 * max(1, max|logit|)``, where ``noise`` is the logit change caused by rounding the (fp32-merged)
weights to the requested dtype, i.e. the error that dtype alone must cause. Separately, the fp32 merge
itself must match the unmerged model within ``1e-4 * max(1, max|logit|)``. The merge is written to
``<out>.partial`` and renamed to ``<out>`` only after the check passes.

On CPU the merged weights are checked in fp32 (upcast after rounding to the saved dtype): CPUs without
native bf16 emulate bf16 matmuls ~150x slower; the rounding of the saved weights is still measured.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tuneforge.methods.dispatch import mergeable_methods, saved_method
from tuneforge.methods.errors import NotMergeableError
from tuneforge.methods.registry import get_method
from tuneforge.methods.reward_head import is_reward_model, not_generative
from tuneforge.models.registry import base_terms_files

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NOISE_FACTOR = 2.0       # allowed multiple of the dtype's own rounding error on the base model
RELATIVE_FLOOR = 1e-4    # fp32 floor, relative to max(1, max |reference logit|)
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
)


class MergeCheckError(RuntimeError):
    """The merged model does not reproduce the unmerged one; the message holds the report."""


@dataclass
class PromptCheck:
    prompt: str
    max_abs_diff: float
    greedy_unmerged: list[int]
    greedy_merged: list[int]

    @property
    def agreeing_tokens(self) -> int:
        n = 0
        for a, b in zip(self.greedy_unmerged, self.greedy_merged, strict=False):
            if a != b:
                break
            n += 1
        return n


@dataclass
class MergeReport:
    """What was merged, where, in which dtype, and how closely it matches the unmerged model."""

    method: str
    dtype: str
    out_dir: str
    tolerance: float = 0.0
    max_abs_diff: float = 0.0
    checks: list[PromptCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"merge {self.method} -> {self.out_dir} ({self.dtype}): max |logit diff| {self.max_abs_diff:.3g} "
                 f"(tolerance {self.tolerance:.3g}) {'OK' if self.passed else 'FAILED'}"]
        for c in self.checks:
            lines.append(f"  {c.prompt[:40]!r}: max diff {c.max_abs_diff:.3g}, greedy agreement "
                         f"{c.agreeing_tokens}/{len(c.greedy_unmerged)} tokens")
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@dataclass
class _Reference:
    prompts: list[str]
    input_ids: list[torch.Tensor]
    logits: list[torch.Tensor]          # [T, V] fp32, unmerged
    greedy: list[list[int]]
    merge_error: float = 0.0            # fp32 merged vs unmerged
    noise: float = 0.0                  # fp32 merged vs merged with weights rounded to the dtype


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


def refuse_reward_model(folder: str | Path, action: str) -> None:
    """:class:`NotMergeableError` in one line when ``folder`` holds a reward model (its head is not in the LM)."""
    if is_reward_model(folder):
        raise NotMergeableError(not_generative(folder, action))


def _refuse(method_name: str) -> None:
    """Raise :class:`NotMergeableError` with the method's own reason unless its registry record says mergeable."""
    try:
        method = get_method(method_name)
    except ValueError:
        raise NotMergeableError(f"method {method_name!r} is not one tuneforge can merge "
                                f"({', '.join(mergeable_methods())})") from None
    if method.mergeable:
        return
    if method.is_full_model:
        raise NotMergeableError(f"method '{method.name}': {method.not_mergeable_reason}")
    raise NotMergeableError(f"method '{method.name}' cannot be merged into the base weights: "
                            f"{method.not_mergeable_reason}. Serve the base model with the adapter instead "
                            "(tuneforge.methods.load_trained).")


def _load_tokenizer(model_spec: str, tokenizer_dir: str | Path | None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from tuneforge.models.loading import load_tokenizer

    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        from tuneforge.models.remote_code import check_remote_code

        check_remote_code(str(tokenizer_dir), tokenizer_dir, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return load_tokenizer(model_spec, trust_remote_code=trust_remote_code)


def _encode(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        from tuneforge.data.rendering import prompt_ids

        ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])     # with the run's template_kwargs
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([list(ids)])


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, tokenizer, max_new_tokens: int) -> list[int]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def _merge_and_reference(model_spec: str, adapter_dir: str | Path, tokenizer, prompts: list[str], dtype: str,
                         max_new_tokens: int, trust_remote_code: bool = False) -> tuple[torch.nn.Module, _Reference]:
    """Merge in fp32 and measure it: returns the merged model (in ``dtype``) and the reference numbers.

    1. unmerged = base (fp32) + adapter: reference logits and greedy tokens;
    2. merged in fp32: ``merge_error`` = max |logits - reference|;
    3. the merged weights rounded to ``dtype`` (still computed in fp32 on CPU): ``noise`` = the change that
       rounding causes, the yardstick for the check of the saved folder.
    """
    from peft import PeftModel

    from tuneforge.models.loading import load_model

    base = load_model(model_spec, dtype=torch.float32, trust_remote_code=trust_remote_code)
    unmerged = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = [_encode(tokenizer, p) for p in prompts]
    ref = [unmerged(input_ids=i, use_cache=False).logits[0].float() for i in ids]
    greedy = [_greedy(unmerged, i, tokenizer, max_new_tokens) for i in ids]
    merged = unmerged.merge_and_unload()
    merged_fp32 = [merged(input_ids=i, use_cache=False).logits[0].float() for i in ids]
    merge_error = max((m - r).abs().max().item() for m, r in zip(merged_fp32, ref, strict=True))
    torch_dtype = _torch_dtype(dtype)
    compute = torch_dtype if torch.cuda.is_available() else torch.float32
    for p in merged.parameters():
        p.data = p.data.to(torch_dtype).to(compute)
    noise = max((merged(input_ids=i, use_cache=False).logits[0].float() - m).abs().max().item()
                for i, m in zip(ids, merged_fp32, strict=True))
    merged = merged.to(torch_dtype)
    return merged, _Reference(list(prompts), ids, ref, greedy, merge_error, noise)


def _saved_dtypes(folder: Path) -> set[torch.dtype]:
    from safetensors import safe_open

    dtypes = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                dtypes.add(st.get_slice(key).get_dtype())
    return dtypes


@torch.no_grad()
def _check(merged_dir: Path, reference: _Reference, method: str, dtype: str, tokenizer,
           max_new_tokens: int, out_name: str, trust_remote_code: bool = False) -> MergeReport:
    from transformers import AutoModelForCausalLM

    report = MergeReport(method=method, dtype=dtype, out_dir=out_name)
    expected = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}[dtype]
    found = _saved_dtypes(merged_dir)
    if found != {expected}:
        report.problems.append(f"saved weights have dtypes {sorted(found)}, expected only {expected}")
    compute = _torch_dtype(dtype) if torch.cuda.is_available() else torch.float32
    scale = max(1.0, max(r.abs().max().item() for r in reference.logits))
    report.tolerance = NOISE_FACTOR * reference.noise + RELATIVE_FLOOR * scale
    if reference.merge_error > RELATIVE_FLOOR * scale:
        report.problems.append(f"the fp32 merge differs from the unmerged model by {reference.merge_error:.3g} "
                               f"(> {RELATIVE_FLOOR * scale:.3g}): peft's merge is wrong for this adapter")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=compute,
                                                  trust_remote_code=trust_remote_code).eval()
    for prompt, ids, ref, ref_greedy in zip(reference.prompts, reference.input_ids, reference.logits, reference.greedy,
                                            strict=True):
        logits = merged(input_ids=ids, use_cache=False).logits[0].float()
        diff = (logits - ref).abs().max().item()
        report.max_abs_diff = max(report.max_abs_diff, diff)
        check = PromptCheck(prompt, diff, ref_greedy, _greedy(merged, ids, tokenizer, max_new_tokens))
        report.checks.append(check)
        top2 = ref[-1].topk(2).values
        if logits[-1].argmax() != ref[-1].argmax() and (top2[0] - top2[1]) > 2 * report.tolerance:
            report.problems.append(f"{prompt[:40]!r}: greedy next token differs although the unmerged model's "
                                   f"margin is {(top2[0] - top2[1]).item():.3g}")
    if report.max_abs_diff > report.tolerance:
        report.problems.append(f"merged logits differ from the unmerged model by {report.max_abs_diff:.3g} "
                               f"> tolerance {report.tolerance:.3g} for {dtype}")
    return report


def _fix_generation_config(model, tokenizer) -> None:
    """EOS/PAD/BOS of the saved model are the tokenizer's (SmolLM2: eos ``<|im_end|>`` = 2), so generation stops;
    with the end-of-turn token of the run's chat template when that is another token (``<|eot_id|>``, ...)."""
    from tuneforge.data.templates import end_of_turn_ids

    ends = end_of_turn_ids(tokenizer)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = ends if len(ends) > 1 else tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            cfg.bos_token_id = tokenizer.bos_token_id


def merge_adapter(model_spec_or_path: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bf16",
                  method: str | None = None, check_prompts: list[str] | None = None,
                  tokenizer_dir: str | Path | None = None, max_new_tokens: int = 8,
                  trust_remote_code: bool = False) -> MergeReport:
    """Fold the adapter in ``adapter_dir`` into the base ``model_spec_or_path``; save to ``out_dir``; check it.

    Args:
        model_spec_or_path: the base model as in the run config's ``model:``.
        adapter_dir: folder with ``adapter_config.json`` + ``adapter_model.safetensors``.
        out_dir: the merged transformers model folder to create (weights, tokenizer, chat template,
            generation config).
        dtype: ``bf16``, ``fp16`` or ``fp32``: the dtype of the saved weights.
        method: the run's method (read from the adapter files when omitted); ``adapter``, ``prefix``,
            ``prompt`` and ``full`` are refused with :class:`NotMergeableError`.
        check_prompts: prompts for the check (default: three short questions, chat-formatted).
        tokenizer_dir: where the run saved its tokenizer (default: the base model's).
        trust_remote_code: the run's own setting (``run.json``); a base model with its own code is refused
            without it.

    Returns the :class:`MergeReport`; raises :class:`MergeCheckError` (leaving ``<out_dir>.partial``) if the
    merged model does not match the unmerged one.
    """
    method = method or saved_method(adapter_dir)
    _refuse(method)
    torch_dtype = _torch_dtype(dtype)  # fail on a bad dtype before any work
    model_spec = str(model_spec_or_path)
    out_dir = Path(out_dir)
    tokenizer = _load_tokenizer(model_spec, tokenizer_dir, trust_remote_code)

    merged, reference = _merge_and_reference(model_spec, adapter_dir, tokenizer,
                                             list(check_prompts or DEFAULT_PROMPTS), dtype, max_new_tokens,
                                             trust_remote_code)
    merged.config.dtype = torch_dtype
    _fix_generation_config(merged, tokenizer)

    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    merged.save_pretrained(str(partial), safe_serialization=True)
    tokenizer.save_pretrained(str(partial))
    for terms in base_terms_files(model_spec):      # the base model's licence and terms travel with the merge
        shutil.copy2(terms, partial / terms.name)
    template = Path(tokenizer_dir or "", "chat_template.jinja")
    if tokenizer_dir is not None and template.is_file() and not (partial / "chat_template.jinja").is_file():
        shutil.copy(template, partial / "chat_template.jinja")
    del merged

    report = _check(partial, reference, method, dtype, tokenizer, max_new_tokens, str(out_dir), trust_remote_code)
    (partial / "merge_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    log.info("%s", report)
    if not report.passed:
        raise MergeCheckError(f"{report}\nthe merged folder was left at {partial} for inspection")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return report


def verify_merge(merged_dir: str | Path, model_spec_or_path: str | Path, adapter_dir: str | Path,
                 dtype: str | None = None, check_prompts: list[str] | None = None,
                 max_new_tokens: int = 8, trust_remote_code: bool = False) -> MergeReport:
    """Re-run the merge check on an existing merged folder; raise :class:`MergeCheckError` if it fails."""
    merged_dir = Path(merged_dir)
    if dtype is None:
        names = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
        found = _saved_dtypes(merged_dir)
        dtype = names.get(next(iter(found)), "fp32") if len(found) == 1 else "fp32"
    tokenizer = _load_tokenizer(str(model_spec_or_path), merged_dir, trust_remote_code)
    _, reference = _merge_and_reference(str(model_spec_or_path), adapter_dir, tokenizer,
                                        list(check_prompts or DEFAULT_PROMPTS), dtype, max_new_tokens,
                                        trust_remote_code)
    report = _check(merged_dir, reference, saved_method(adapter_dir), dtype, tokenizer, max_new_tokens, str(merged_dir),
                    trust_remote_code)
    log.info("%s", report)
    if not report.passed:
        raise MergeCheckError(str(report))
    return report


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "bf16",
              check_prompts: list[str] | None = None) -> MergeReport:
    """Merge the adapter of a finished run or a package (``config.yaml``, adapter files, tokenizer at its top)."""
    from tuneforge.config import load_config
    from tuneforge.runs import RunDir, run_trusts_remote_code, verify_base_model

    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: is it a tuneforge run folder?")
    config = load_config(run.config, check_files=False)
    refuse_reward_model(run_dir, "merging")
    _refuse(config.method)
    verify_base_model(run_dir, config.model)  # a package (tuneforge.json) refuses another base model
    if not run.adapter_config.is_file():
        raise FileNotFoundError(f"{run_dir} has no adapter_config.json: the run did not save an adapter")
    return merge_adapter(config.model, run_dir, out_dir, dtype=dtype, method=config.method,
                         check_prompts=check_prompts, tokenizer_dir=run_dir,
                         trust_remote_code=run_trusts_remote_code(run_dir, config.trust_remote_code))
