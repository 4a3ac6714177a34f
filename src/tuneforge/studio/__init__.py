"""``tuneforge ui``: a local web studio (Gradio) over the same Python API as the command line.

One module per tab, each with its plain functions (tested without a browser) and a ``build`` that lays out its
Gradio components: :mod:`~tuneforge.studio.runs_tab` (every run in a folder and its status),
:mod:`~tuneforge.studio.data_tab` (preview with the trained tokens marked, the curation report),
:mod:`~tuneforge.studio.train_tab` (a form from the run-config schema, the memory plan, Start / Stop / Resume and the
live loss curve), :mod:`~tuneforge.studio.chat_tab` (base and adapters side by side, streaming, through the serving
engine), :mod:`~tuneforge.studio.evaluate_tab` and :mod:`~tuneforge.studio.ship_tab`. Training, evaluation and
serving run as their own processes (``tuneforge train``, ``tuneforge eval``, ``tuneforge serve``:
:mod:`~tuneforge.studio.process`), so the page never competes with them and can close and reopen. No training or
evaluation logic lives here. :mod:`~tuneforge.studio.app` assembles the tabs and refuses a non-local host without
a login.
"""
