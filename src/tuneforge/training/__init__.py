"""The training loop and what it writes into a run directory."""
