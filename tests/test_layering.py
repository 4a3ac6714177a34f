"""The house stays one shape (``scripts/house.py`` draws it): no import circle, no import that runs back up a
floor, the four stages (training, evaluation, export, serving) never import one another, and the layers below
the stages (kernels, methods, runs, data, models, config, errors) import no stage.

Each test names what broke it: the offending import (module -> module) is in the assertion message.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tuneforge"
STAGES = {"training", "evaluation", "export", "serving"}
BELOW_STAGES = {"kernels", "methods", "runs", "data", "models", "config", "errors", "schema", "fileutil",
                "deprecations"}


def _house():
    spec = importlib.util.spec_from_file_location("house", ROOT / "scripts" / "house.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("house", module)
    spec.loader.exec_module(module)
    return module


def _imports():
    house = _house()
    graph = house.module_graph(SRC)
    return house, [(m, t, house.room_of(m), house.room_of(t)) for m, ts in graph.items() for t in ts]


def test_the_measure_sees_what_it_names(tmp_path):
    """The measure itself can fail: a package with a circle, an import that runs back up and a stage that
    imports another is drawn with each of them."""
    house = _house()
    pkg = tmp_path / "tuneforge"
    for folder in ("training", "evaluation", "kernels"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "training" / "a.py").write_text("from tuneforge.training import b\nfrom tuneforge.kernels import k\n")
    (pkg / "training" / "b.py").write_text("def f():\n    from tuneforge.training import a\n")
    (pkg / "evaluation" / "e.py").write_text("from tuneforge.training.a import x\n")
    (pkg / "kernels" / "k.py").write_text("")
    (pkg / "kernels" / "up.py").write_text("def g():\n    from tuneforge.evaluation import e\n")
    drawn = house.house(pkg)
    assert drawn["circles"] == 1 and drawn["circle_modules"] == [["tuneforge.training.a", "tuneforge.training.b"]]
    assert drawn["back_up_imports"] == 1 and drawn["rooms"] == 3 and drawn["floors"] == 3


def test_no_import_circle_and_nothing_runs_back_up():
    house = _house()
    drawn = house.house(SRC)
    assert drawn["circle_modules"] == [], drawn["circle_modules"]
    assert drawn["back_up"] == {}, drawn["back_up"]


def test_stages_stand_side_by_side():
    _, edges = _imports()
    across = [f"{m} -> {t}" for m, t, a, b in edges if a in STAGES and b in STAGES and a != b]
    assert across == [], across


def test_layers_below_the_stages_import_no_stage():
    _, edges = _imports()
    up = [f"{m} -> {t}" for m, t, a, b in edges if a in BELOW_STAGES and b in STAGES | {"estimate", "cli",
                                                                                       "pipeline", "quickstart"}]
    assert up == [], up


def test_no_method_name_is_compared_outside_methods():
    """Serving, estimation, export, engines and the config ask a method's record; they never compare its name
    (``scripts/house.py`` lists each comparison with its file and line)."""
    house = _house()
    found = house.method_name_comparisons(SRC)
    assert found == [], "\n".join(found)


def test_the_method_name_measure_sees_a_comparison(tmp_path):
    house = _house()
    pkg = tmp_path / "tuneforge"
    (pkg / "serving").mkdir(parents=True)
    (pkg / "serving" / "x.py").write_text('def f(m):\n    return m.kind == "lora" or m in ("ia3", "x")\n'
                                          'def g(row):\n    return row["prompt"] == "prompt"\n')
    found = house.method_name_comparisons(pkg)
    assert len(found) == 2 and all("serving/x.py:2" in f for f in found), found   # not the data field "prompt"
