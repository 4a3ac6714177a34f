"""Fine-tuning methods behind the ``method:`` config key.

Each method is a folder (``methods/lora/``, ``methods/bottleneck_adapter/``, ...) that registers one
:class:`~tuneforge.methods.registry.Method` record; importing this package registers the built-in ones.
The functions below (``methods/dispatch.py``) are what the trainer, merge and serving call; they look the
method up in the registry and never branch on its name.
"""

from tuneforge.methods import bottleneck_adapter, full, ia3, lora, prefix_tuning, prompt_tuning, qlora  # noqa: F401
from tuneforge.methods.dispatch import (
                                        apply_method,
                                        count_parameters,
                                        load_base_model,
                                        load_trained,
                                        load_weights_into,
                                        mergeable_methods,
                                        method_disabled,
                                        method_forward,
                                        method_generate,
                                        not_mergeable_methods,
                                        save_trained,
                                        saved_method,
)
from tuneforge.methods.errors import NotMergeableError
from tuneforge.methods.registry import Method, get_method, method_names, register_method, unregister_method

__all__ = ["Method", "NotMergeableError", "apply_method", "count_parameters", "get_method", "load_base_model",
           "load_trained", "load_weights_into", "mergeable_methods", "method_disabled", "method_forward",
           "method_generate", "method_names", "not_mergeable_methods", "register_method", "save_trained",
           "saved_method", "unregister_method"]
