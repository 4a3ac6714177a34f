"""The run config: one YAML file (or dict) validated into a :class:`RunConfig`, the contract every stage reads.

``run.py`` is the config itself and its loading (unknown keys with the closest valid one, ``--set``
overrides, renamed keys through :mod:`tuneforge.deprecations`); ``eval.py`` is its ``eval:`` section;
``trackers.py`` the ``report_to:`` check. The ``data:`` section lives with the data stage
(:mod:`tuneforge.data.settings`) and each method's section with its method; the run config composes them.
"""

from tuneforge.config.eval import EvalSettings, JudgeSettings
from tuneforge.config.run import (
    PreferenceConfig,
    RunConfig,
    dump_config,
    format_validation_error,
    load_config,
    parse_overrides,
)

__all__ = ["EvalSettings", "JudgeSettings", "PreferenceConfig", "RunConfig", "dump_config",
           "format_validation_error", "load_config", "parse_overrides"]
