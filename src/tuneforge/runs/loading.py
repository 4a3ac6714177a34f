"""Load a run directory or a package (base model + trained method) and generate with the chat template of
training (the run's saved tokenizer: ``template:``), stopping at EOS or the template's end-of-turn token; or the
base model alone."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tuneforge.config import RunConfig, load_config
from tuneforge.data.rendering import prompt_ids, set_template_kwargs
from tuneforge.data.templates import end_of_turn_ids
from tuneforge.methods import load_base_model, load_trained, method_generate
from tuneforge.methods.registry import Generates
from tuneforge.models.dtype import pick_device, pick_dtype
from tuneforge.models.loading import load_model, load_tokenizer
from tuneforge.runs.base_model import run_trusts_remote_code, verify_base_model
from tuneforge.runs.layout import RunDir

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    config: RunConfig | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate_batch(self, conversations: list[list[dict]], max_new_tokens: int = 128, temperature: float = 0.0,
                       top_p: float = 1.0, batch_size: int = 16) -> list[str]:
        """Answer each conversation (a list of messages ending with a user turn); greedy when temperature == 0."""
        self.model.eval()
        tok = self.tokenizer
        outputs: list[str] = []
        for start in range(0, len(conversations), batch_size):
            chunk = [prompt_ids(tok, conv) for conv in conversations[start:start + batch_size]]
            width = max(len(ids) for ids in chunk)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=self.device)
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=self.device)
            sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                        else {"do_sample": False})
            out = method_generate(cast(Generates, self.model), self.config, input_ids=input_ids,
                                  attention_mask=attention, max_new_tokens=max_new_tokens,
                                  eos_token_id=end_of_turn_ids(tok), pad_token_id=pad, **sampling)
            for row in out[:, width:]:
                outputs.append(str(tok.decode(row, skip_special_tokens=True)).strip())
        return outputs

    def generate(self, prompt: str | list[dict], system: str | None = None, **kwargs) -> str:
        if isinstance(prompt, str):
            messages = (([{"role": "system", "content": system}] if system else [])
                        + [{"role": "user", "content": prompt}])
        else:
            messages = prompt
        return self.generate_batch([messages], **kwargs)[0]


def load_base(model: str, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """The base model alone, for comparisons and for serving without an adapter."""
    dev = pick_device(device)
    torch_dtype, _ = pick_dtype(dtype, dev)
    return LoadedModel(load_model(model, dtype=torch_dtype, device=dev), load_tokenizer(model))


def load_run(run_dir: str | Path, device: str = "auto") -> LoadedModel:
    """Load the base model of ``run_dir`` (a run or a package) with its trained adapter (or full weights) applied."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"{run.path} is not a tuneforge run directory (no config.yaml); "
                                "train one with `tuneforge train`")
    config = load_config(run.config, check_files=False)
    verify_base_model(run.path, config.model)  # a package (tuneforge.json) refuses another base model
    config.trust_remote_code = run_trusts_remote_code(run.path, config.trust_remote_code)   # the run's own choice
    dev = pick_device(device if device != "auto" else config.device)
    torch_dtype, _ = pick_dtype(config.dtype, dev)
    base = load_base_model(config, dtype=torch_dtype, device=dev)
    model = load_trained(base, run.path, config).to(dev)
    # the tokenizer and chat template used in training (template:), saved with the run
    tokenizer = AutoTokenizer.from_pretrained(run.path, trust_remote_code=config.trust_remote_code)
    if config.template_kwargs:          # saved with the tokenizer too; the config's are the run's
        set_template_kwargs(tokenizer, config.template_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, config)
