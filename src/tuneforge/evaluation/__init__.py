"""Evaluating models before shipping them."""
