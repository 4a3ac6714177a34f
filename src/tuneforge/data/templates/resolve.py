"""The ``template:`` key: from ``auto``, a built-in name or a ``.jinja`` file to the chat template a run trains with.

* ``auto``: the tokenizer's own chat template. A tokenizer without one (a base model) is refused, naming the
  choices, when the run needs one (chat or preference records).
* a built-in (:data:`BUILTINS`, the ``.jinja`` files beside this module): the usual formats. Each names the
  special tokens it needs as single tokens of the vocabulary; ``alpaca`` and ``base`` are plain text and fit
  any tokenizer. A built-in starts with ``bos_token`` only for a tokenizer that starts every text with BOS
  (Llama, Gemma, Mistral), as training tokenizes without adding special tokens.
* a path to a Jinja file: checked to parse (``file:line`` of a syntax error) when the config loads.

:func:`apply_template` puts the chosen text in ``tokenizer.chat_template``: everything after it (rendering, the
token cache's key, the tokenizer saved with every checkpoint and the run, and so generate, chat, eval,
package, export and serve) uses that template. A template whose special tokens the vocabulary lacks is refused
in one line before any weights load (tuneforge does not add tokens to a vocabulary).
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError


@dataclass(frozen=True)
class Builtin:
    """A built-in template: its file is ``<name>.jinja`` beside this module."""

    name: str
    summary: str
    special_tokens: tuple[str, ...]      # must each be one token of the vocabulary
    end_of_turn: str                     # what closes an answer ("eos_token": the tokenizer's EOS)


BUILTINS: dict[str, Builtin] = {b.name: b for b in (
    Builtin("chatml", "<|im_start|>role ... <|im_end|> (Qwen, SmolLM, Hermes, Yi)", ("<|im_start|>", "<|im_end|>"),
            "<|im_end|>"),
    Builtin("llama3", "<|start_header_id|>role<|end_header_id|> ... <|eot_id|> (Llama 3.x)",
            ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    Builtin("gemma", "<start_of_turn>user|model ... <end_of_turn> (Gemma 2 and 3)",
            ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    Builtin("mistral", "[INST] ... [/INST] answer + EOS (Mistral/Mixtral Instruct v0.1-v0.2)", (), "eos_token"),
    Builtin("phi3", "<|user|> ... <|end|> <|assistant|> ... <|end|> (Phi-3, Phi-3.5)",
            ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>"),
    Builtin("alpaca", "### Instruction: / ### Response: answer + EOS (plain text, any tokenizer)", (), "eos_token"),
    Builtin("base", "User: ... / Assistant: answer + EOS (plain text, any tokenizer)", (), "eos_token"),
)}
CHOICES = f"auto, {', '.join(BUILTINS)} or a path to a .jinja file"
_BOS_LINE = "{{- bos_token -}}\n"
_TOKEN_LIKE = re.compile(r"<\|[^\s|<>]+\|>|<(?:start|end)_of_turn>")


@dataclass(frozen=True)
class ChosenTemplate:
    """The template a run trains with: the ``template:`` value, where it came from and its text's sha256."""

    name: str
    source: str          # "tokenizer" (auto), "builtin" or "file"; "none" when auto found no template
    sha256: str | None

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "sha256": self.sha256}


def is_template_file(value: str) -> bool:
    """Whether a ``template:`` value names a file rather than a built-in."""
    return value.endswith((".jinja", ".jinja2", ".j2")) or "/" in value or "\\" in value


def check_template_value(value: str) -> str:
    """The config validator: ``auto``, a built-in name, or something that names a file (its existence and syntax
    are checked by :func:`read_template_file` once relative paths are resolved). Raises ValueError otherwise."""
    if value == "auto" or value in BUILTINS or is_template_file(value):
        return value
    close = difflib.get_close_matches(value, ["auto", *BUILTINS], n=1, cutoff=0.4)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown template {value!r}{hint}; write {CHOICES}")


def read_template_file(path: str | Path) -> str:
    """The text of a Jinja template file; :class:`ConfigError` naming ``file:line`` when it does not parse."""
    import jinja2

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"template: file {str(path)!r} not found; write {CHOICES}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"template: {path}: cannot be read as text ({e})") from None
    try:
        _environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: the template does not parse: {e.message}") from None
    return text


def _environment() -> Any:
    """A Jinja environment that parses what transformers renders: loop controls and ``{% generation %}``."""
    import jinja2
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    return jinja2.Environment(trim_blocks=True, lstrip_blocks=True,
                              extensions=["jinja2.ext.loopcontrols", Generation])


def builtin_text(name: str, with_bos: bool = True) -> str:
    """The text of the built-in ``name``; without its leading ``bos_token`` unless ``with_bos``."""
    text = resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")
    return text if with_bos else text.replace(_BOS_LINE, "", 1)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts every text with its BOS token (Llama, Gemma, Mistral; not Qwen, SmolLM)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def missing_tokens(tokenizer: Any, tokens: tuple[str, ...] | list[str]) -> list[str]:
    """The tokens among ``tokens`` that are not one token of ``tokenizer``'s vocabulary."""
    missing = []
    for token in tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
            missing.append(token)
    return missing


def template_tokens(text: str) -> list[str]:
    """Special-token-looking strings (``<|...|>``, ``<start_of_turn>``) a template file writes."""
    return sorted(set(_TOKEN_LIKE.findall(text)))


def apply_template(tokenizer: Any, value: str, model: str = "the model", needs_chat: bool = True) -> ChosenTemplate:
    """Set ``tokenizer.chat_template`` to the template ``value`` names (``auto`` keeps the tokenizer's own).

    Raises :class:`ConfigError` in one line: ``auto`` on a tokenizer without a chat template when
    ``needs_chat`` (chat or preference records), or a template whose special tokens the vocabulary lacks.
    """
    if value == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            if needs_chat:
                raise ConfigError(f"template: auto, but {model}'s tokenizer has no chat template (a base model?): set "
                                  f"template: to {', '.join(BUILTINS)} (alpaca and base fit any tokenizer) or a "
                                  ".jinja file")
            return ChosenTemplate("auto", "none", None)
        if not isinstance(own, str):        # a dict of named templates (tool_use, rag, ...): the default one
            own = own.get("default") if isinstance(own, dict) else None
            if not own:
                raise ConfigError(f"template: auto, but {model}'s tokenizer has no default chat template: set "
                                  f"template: to {CHOICES}")
            tokenizer.chat_template = own
        return ChosenTemplate("auto", "tokenizer", _sha256(own))
    if value in BUILTINS:
        builtin = BUILTINS[value]
        text, source, needed = builtin_text(value, with_bos=adds_bos(tokenizer)), "builtin", builtin.special_tokens
    else:
        text, source = read_template_file(value), "file"
        needed = tuple(template_tokens(text))
    missing = missing_tokens(tokenizer, needed)
    if missing:
        raise ConfigError(f"template: {value} writes {', '.join(missing)}, which {model}'s vocabulary does not hold as "
                          f"single tokens; tuneforge does not add tokens to a vocabulary: use template: auto (the "
                          f"model's own), or alpaca or base, which need no new tokens")
    tokenizer.chat_template = text
    return ChosenTemplate(value, source, _sha256(text))


# arguments apply_chat_template sets itself: a template_kwargs entry may not replace them
_RESERVED_KWARGS = frozenset({"messages", "conversation", "tools", "documents", "add_generation_prompt",
                              "continue_final_message", "tokenize", "chat_template", "return_dict",
                              "return_assistant_tokens_mask", "bos_token", "eos_token"})


def check_template_kwargs(value: Any, key: str = "template_kwargs") -> dict[str, Any]:
    """``value`` as chat template arguments (a mapping of names to JSON values, e.g. ``{enable_thinking: false}``);
    ValueError in one line naming ``key`` otherwise. A name the template does not use is harmless (ignored)."""
    import json

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping of chat template arguments (e.g. {{enable_thinking: false}}), "
                         f"not {type(value).__name__} {value!r:.60}")
    for name, item in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{key}: {name!r} is not a template variable name (letters, digits, _)")
        if name in _RESERVED_KWARGS:
            raise ValueError(f"{key}: {name!r} is set by tuneforge itself; remove it")
        try:
            json.dumps(item, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: {name!r} must be a JSON value (string, number, boolean, list, mapping, "
                             f"null), not {type(item).__name__}") from None
    return dict(value)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token ids that end an answer under the tokenizer's chat template: EOS and every end-of-turn marker the
    template writes that is one token of the vocabulary (``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ...).
    Generation stops at any of them."""
    from tuneforge.data.turn_spans import END_MARKERS

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        for marker in END_MARKERS:
            if marker in template and not missing_tokens(tokenizer, (marker,)):
                token_id = tokenizer.convert_tokens_to_ids(marker)
                if token_id not in ids:
                    ids.append(token_id)
    return ids
