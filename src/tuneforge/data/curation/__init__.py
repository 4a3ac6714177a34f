"""Check, clean, describe and split data files before training (``tuneforge data check|clean|stats|split``).

* ``config.py``: the checks (:data:`~tuneforge.data.curation.config.CHECKS`) and :class:`CurationConfig`;
* ``validation.py``: structural and quality checks of one record; ``quality.py``: the heuristics and PII patterns;
* ``dedup.py``: exact and MinHash near-duplicate index;
* ``clean.py``: :func:`~tuneforge.data.curation.clean.curate`, the streaming pass behind ``check`` and ``clean``;
* ``stats.py``: length/turn/label statistics; ``split.py``: train/validation split;
* ``commands.py``: the ``tuneforge data`` sub-commands over these.

Reading files (:mod:`tuneforge.data.loaders`), formats (:mod:`tuneforge.data.formats`) and the rejects schema
(:mod:`tuneforge.data.rejects`) are shared with training and live one level up.
"""
