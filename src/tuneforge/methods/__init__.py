"""Fine-tuning methods behind the ``method:`` config key.

:func:`apply_method` turns a loaded base model into the model that trains; each method lives in its
own module (``methods/lora.py``, ``methods/bottleneck_adapter/``, ...). The training loop never branches
on the method: it calls :func:`method_forward` for the logits of a packed row.
"""

from tuneforge.methods.registry import (MERGEABLE, NOT_MERGEABLE, NotMergeableError, apply_method, count_parameters, load_base_model,
                                        load_trained, method_forward, method_generate, save_trained, saved_method)

__all__ = ["MERGEABLE", "NOT_MERGEABLE", "NotMergeableError", "apply_method", "count_parameters", "load_base_model", "load_trained",
           "method_forward", "method_generate", "save_trained", "saved_method"]
