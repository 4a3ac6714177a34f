"""Full fine-tuning: ``config.py`` (the ``full:`` section), ``model.py`` (unfreeze, optionally freeze
embeddings or layers). Registered as ``method: full``."""

from tuneforge.methods.full.config import FullConfig
from tuneforge.methods.full.model import apply_full, load_full
from tuneforge.methods.registry import Method, register_method

__all__ = ["FullConfig", "apply_full"]

register_method(Method(
    name="full", summary="all weights (minus frozen ones)",
    settings={"full": FullConfig}, apply=lambda model, config, tokenizer=None: apply_full(model, config.full),
    load_trained=load_full, saved_types=("full",), is_full_model=True,
    not_mergeable_reason="the run saved complete weights: there is no adapter to merge; use the run's model folder",
))
