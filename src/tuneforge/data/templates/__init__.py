"""Chat templates: the built-in ``.jinja`` files (package data) and :mod:`.resolve`, which turns the ``template:``
key into the template a run trains with (see there)."""

from tuneforge.data.templates.resolve import (
    BUILTINS,
    CHOICES,
    Builtin,
    ChosenTemplate,
    apply_template,
    builtin_text,
    check_template_kwargs,
    check_template_value,
    end_of_turn_ids,
    is_template_file,
    read_template_file,
)

__all__ = ["BUILTINS", "CHOICES", "Builtin", "ChosenTemplate", "apply_template", "builtin_text",
           "check_template_kwargs", "check_template_value", "end_of_turn_ids", "is_template_file", "read_template_file"]
