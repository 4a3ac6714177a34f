"""The Train tab's form, generated from the run-config schema: one field per key of :class:`RunConfig` and of its
sections (``data:``, the task sections and every registered method's section, from the method registry), each
with its description and default; the values back into a run config, validated by the same code as a YAML file
(:func:`tuneforge.config.load_config`), each message placed beside the key it names.

A value is YAML text (``3`` an int, ``true`` a bool, ``[q_proj, v_proj]`` a list, ``null`` or empty: None), a
checkbox for a bool and a choice for a ``Literal``. Only the keys whose value differs from the default go into the
config, so an untouched key keeps the schema's default (and its meaning, e.g. a method's default learning rate).
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tuneforge.config import RunConfig, load_config
from tuneforge.errors import ConfigError

SKIPPED = {"eval", "output_dir"}        # eval: the Evaluate tab's; output_dir: the studio's runs folder + run name
TASK_SECTIONS = ("preference", "kto", "reward", "grpo")


@dataclass(frozen=True)
class FormField:
    """One key of the form: ``key`` dotted (``lora.r``), ``section`` ("" top level), ``kind`` ``bool``,
    ``choice`` (``choices``) or ``text`` (YAML), ``default`` as the form shows it."""

    key: str
    section: str
    kind: Literal["bool", "choice", "text"]
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    required: bool = False


def _literal_choices(annotation: Any) -> tuple[str, ...] | None:
    if typing.get_origin(annotation) is Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    return None


def _yaml_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _fields_of(model: type[BaseModel], section: str) -> list[FormField]:
    out = []
    for name, info in model.model_fields.items():
        key = f"{section}.{name}" if section else name
        if not section and name in SKIPPED:
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue                                # a section: its own group of fields
        if info.default is not PydanticUndefined:
            default = info.default
        elif info.default_factory is not None:
            default = info.default_factory()       # type: ignore[call-arg]
        else:
            default = None
        description = info.description or ""
        choices = _literal_choices(annotation)
        required = info.is_required()
        if key == "method":                         # the registered methods, each with its own section below
            from tuneforge.methods.registry import method_names

            out.append(FormField(key, section, "choice", str(default), description, tuple(method_names())))
        elif annotation is bool:
            out.append(FormField(key, section, "bool", bool(default), description))
        elif choices and all(not c.isdigit() for c in choices):
            out.append(FormField(key, section, "choice", str(default), description, choices))
        else:
            out.append(FormField(key, section, "text", _yaml_text(default), description, required=required))
    return out


def schema_fields() -> list[FormField]:
    """Every key of the form, top level first, then ``data``, the method sections and the task sections."""
    from tuneforge.data.settings import DataConfig
    from tuneforge.methods.registry import settings_sections

    sections: dict[str, type[BaseModel]] = {"data": DataConfig, **settings_sections()}
    for name in TASK_SECTIONS:
        annotation = RunConfig.model_fields[name].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections[name] = annotation
    out = _fields_of(RunConfig, "")
    for name, model in sections.items():
        out += _fields_of(model, name)
    return out


def _parse(text: Any, field: FormField) -> Any:
    if field.kind != "text":
        return text
    text = "" if text is None else str(text)
    if text.strip() == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def config_tree(fields: list[FormField], values: list[Any]) -> dict[str, Any]:
    """The run config's mapping of the form's ``values`` (one per field): only keys that differ from the default."""
    tree: dict[str, Any] = {}
    for field, value in zip(fields, values, strict=True):
        if field.kind == "text" and (value or "") == field.default and not field.required:
            continue
        if field.kind != "text" and value == field.default:
            continue
        node = tree
        *parents, last = field.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = _parse(value, field)
    return tree


_KEY = re.compile(r"^config: '([\w.]+)': (.*)$")


def validate(fields: list[FormField], values: list[Any], output_dir: str) -> tuple[RunConfig | None, dict[str, str]]:
    """The run config of the form, or the messages of what is wrong: ``{dotted key: message}`` (``""``: a message
    that names no key of the form)."""
    tree = config_tree(fields, values)
    tree["output_dir"] = output_dir
    try:
        return load_config(data=tree), {}
    except ConfigError as e:
        errors: dict[str, str] = {}
        known = {f.key for f in fields}
        for line in str(e).splitlines():
            m = _KEY.match(line)
            key = m.group(1) if m else ""
            key = key if key in known else next((k for k in known if key.startswith(k + ".")), "")
            message = m.group(2) if m and key else line.removeprefix("config: ")
            errors[key] = f"{errors[key]}; {message}" if key in errors else message
        return None, errors
