"""Run configs that ship with tuneforge, with their data: ``quickstart.yaml`` and ``data/tickets_*.jsonl``;
``tools.yaml`` (the tool-use example) and ``data/tools_*.jsonl`` with ``data/tools.json``.

They are package data, so a non-editable install (``pip install .``, a wheel) has them too; find them
with ``importlib.resources.files("tuneforge.recipes")`` or :func:`tuneforge.quickstart.quickstart_config`.
This folder is their only copy: the repository's ``examples/quickstart.yaml`` and ``examples/data`` are
links to it. Regenerate the data with ``python -m tuneforge.data.synthetic_tickets src/tuneforge/recipes/data`` (and
``python -m tuneforge.data.synthetic_tools src/tuneforge/recipes/data``).
"""
