"""Errors the methods raise."""


class NotMergeableError(ValueError):
    """The method cannot be folded into the base weights; serve the base model plus the adapter instead."""
