"""How the own-data defaults (``tuneforge train --data FILE``) were chosen: held-out quality against training cost
on two tasks unlike the quickstart's tickets.

* ``tools`` (structured output, generated here): a shared ~170-word system prompt describing six tools, a
  question in one of many phrasings, and the answer as JSON ``{"tool": ..., "arguments": {...}}``; 3,000
  training records, 100 held-out. Quality: the share of held-out answers that name the right tool (the issue's
  measure), and the share that are valid JSON with exactly the right arguments.
* ``roleplay`` (free text, real): GPTeacher role-play (``../shared/data/gpteacher_roleplay.json``, MIT);
  the last 150 records held out. Quality: token-weighted held-out loss of the answers.

Each grid point trains with the own-data config (:func:`tuneforge.own_data.own_data_config`) and the
point's overrides, then scores the run. Cost is counted in trained tokens (the quality reached for a number
of tokens does not depend on how busy the machine is), and converted to seconds with ``--tokens-per-s`` (this
machine's measured throughput for the default recipe, ``benchmarks/train_throughput.py``), plus the run's
measured validation time share.

    python benchmarks/own_data_defaults.py --task tools --grid "learning_rate=2e-4,1e-3,2e-3" --steps 100
    python benchmarks/own_data_defaults.py --task roleplay --grid "batch_size=4,8" --steps 50,100,200

Prints a table and appends the rows to ``benchmarks/results/own_data_defaults.jsonl``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "own_data_defaults.jsonl"

TOOLS_SYSTEM = (
    "You are an assistant that answers by calling exactly one tool. Reply with one JSON object "
    '{"tool": NAME, "arguments": {...}} and nothing else. The tools: calculator(expression): evaluates an '
    "arithmetic expression with numbers, + - * / and parentheses, powers written as **, and returns the result. "
    "search(query): searches an encyclopedia for facts about people, places, events, history and science and "
    "returns a summary. weather(city, day): returns the forecast for a city on a day (today, tomorrow or a "
    "weekday). translate(text, language): translates a short text into the named language. convert(value, "
    "from_unit, to_unit): converts a quantity between units of length, mass, temperature or volume. "
    "reminder(task, time): sets a reminder for a task at a time of day. Choose the tool that can answer the "
    "request; never answer it yourself."
)
_CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Denver", "Nairobi", "Madrid", "Seoul", "Quito", "Perth",
           "Dublin", "Hanoi", "Accra", "Lyon", "Bergen"]
_DAYS = ["today", "tomorrow", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_TOPICS = ["Albert Einstein", "the Eiffel Tower", "Marie Curie", "the French Revolution", "photosynthesis",
           "the Great Wall of China", "penicillin", "the Roman Empire", "black holes", "Ada Lovelace",
           "the Amazon rainforest", "the printing press", "volcanoes", "the Moon landing", "Mount Kilimanjaro"]
_LANGS = ["French", "Spanish", "German", "Japanese", "Italian", "Swahili", "Portuguese"]
_PHRASES = ["good morning", "where is the station", "thank you very much", "I am lost", "the bill, please",
            "how much does this cost", "see you tomorrow", "I love this city"]
_UNITS = [("km", "miles"), ("kg", "pounds"), ("celsius", "fahrenheit"), ("liters", "gallons"), ("feet", "meters")]
_TASKS = ["call mom", "take the medicine", "water the plants", "submit the report", "book the dentist",
          "buy groceries", "feed the cat"]
_TIMES = ["7:00", "8:30", "12:15", "15:00", "18:45", "21:00"]


def _tool_example(rng: random.Random) -> tuple[str, dict]:
    tool = rng.choice(["calculator", "search", "weather", "translate", "convert", "reminder"])
    if tool == "calculator":
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        op, word = rng.choice([("+", "plus"), ("-", "minus"), ("*", "times"), ("/", "divided by")])
        q = rng.choice([f"What is {a} {word} {b}?", f"Calculate {a} {op} {b}.", f"How much is {a} {word} {b}",
                        f"Can you work out {a} {op} {b} for me?", f"I need {a} {word} {b}, quickly."])
        return q, {"expression": f"{a} {op} {b}"}
    if tool == "search":
        t = rng.choice(_TOPICS)
        q = rng.choice([f"Tell me about {t}.", f"Provide information about {t}.", f"Who or what is {t}?",
                        f"Give me a short history of {t}.", f"I'd like to learn about {t}."])
        return q, {"query": t}
    if tool == "weather":
        c, d = rng.choice(_CITIES), rng.choice(_DAYS)
        q = rng.choice([f"What's the weather in {c} {d}?", f"Will it rain in {c} on {d}?",
                        f"Forecast for {c}, {d}, please.", f"Do I need an umbrella in {c} {d}?",
                        f"How warm will {c} be {d}?"])
        return q, {"city": c, "day": d}
    if tool == "translate":
        p, lang = rng.choice(_PHRASES), rng.choice(_LANGS)
        q = rng.choice([f"Translate '{p}' into {lang}.", f"How do you say '{p}' in {lang}?",
                        f"What is '{p}' in {lang}?", f"Say '{p}' in {lang} for me."])
        return q, {"text": p, "language": lang}
    if tool == "convert":
        v, (u1, u2) = rng.randint(1, 500), rng.choice(_UNITS)
        q = rng.choice([f"Convert {v} {u1} to {u2}.", f"How many {u2} is {v} {u1}?", f"{v} {u1} in {u2}?",
                        f"What is {v} {u1} expressed in {u2}?"])
        return q, {"value": v, "from_unit": u1, "to_unit": u2}
    task, at = rng.choice(_TASKS), rng.choice(_TIMES)
    q = rng.choice([f"Remind me to {task} at {at}.", f"Set a reminder at {at} to {task}.",
                    f"Don't let me forget to {task} at {at}.", f"At {at}, remind me: {task}."])
    return q, {"task": task, "time": at}


def tools_data(folder: Path, n_train: int = 3000, n_test: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """Write the tool-use task (train and held-out test, messages format) into ``folder``."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_test:
        q, args = _tool_example(rng)
        if q in seen:
            continue
        seen.add(q)
        tool = next(t for t in ("calculator", "search", "weather", "translate", "convert", "reminder")
                    if set(args) == set(_ARGS[t]))
        rows.append({"messages": [{"role": "system", "content": TOOLS_SYSTEM}, {"role": "user", "content": q},
                                  {"role": "assistant", "content": json.dumps({"tool": tool, "arguments": args})}]})
    folder.mkdir(parents=True, exist_ok=True)
    train, test = folder / "tools_train.jsonl", folder / "tools_test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return train, test


_ARGS = {"calculator": ("expression",), "search": ("query",), "weather": ("city", "day"),
         "translate": ("text", "language"), "convert": ("value", "from_unit", "to_unit"), "reminder": ("task", "time")}


def roleplay_data(folder: Path, n_test: int = 150) -> tuple[Path, Path]:
    rows = json.loads((SHARED / "gpteacher_roleplay.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    train, test = folder / "roleplay_train.jsonl", folder / "roleplay_test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:-n_test]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[-n_test:]))
    return train, test


def score_tools(run_dir: Path, test: Path) -> dict:
    from tuneforge.serving.inference import load_run

    rows = [json.loads(x) for x in test.read_text().splitlines()]
    loaded = load_run(run_dir)
    answers = loaded.generate_batch([r["messages"][:-1] for r in rows], max_new_tokens=40, batch_size=50)
    tool_ok = exact = 0
    for row, answer in zip(rows, answers, strict=True):
        ref = json.loads(row["messages"][-1]["content"])
        try:
            got = json.loads(answer)
        except ValueError:
            got = None
        tool_ok += isinstance(got, dict) and got.get("tool") == ref["tool"]
        exact += got == ref
    return {"tool_accuracy": tool_ok / len(rows), "exact_json": exact / len(rows)}


def score_loss(run_dir: Path, test: Path, config) -> dict:
    from tuneforge.data.dataset import load_examples, tokenize_examples
    from tuneforge.data.packing import micro_batches
    from tuneforge.serving.inference import load_run
    from tuneforge.methods.loss import evaluate_loss

    loaded = load_run(run_dir)
    examples, _ = tokenize_examples(load_examples(str(test), config.data), loaded.tokenizer, config.data, [])
    batches = list(micro_batches(examples, 16, 0, 0, shuffle=False))
    loss = evaluate_loss(loaded.model, batches, loaded.device, config.method, config.chunked_loss)
    return {"heldout_loss": loss, "perplexity": math.exp(loss)}


def run_point(task: str, train: Path, test: Path, overrides: dict, out: Path, config_file: str | None = None) -> dict:
    from tuneforge.config import load_config
    from tuneforge.own_data import own_data_config
    from tuneforge.training.trainer import train as run_train

    recipe = Path(config_file).stem if config_file else "own-data"
    name = "-".join([recipe] + [f"{k}={v}" for k, v in overrides.items()])
    sets = [f"{k}={v}" for k, v in overrides.items()] + [f"output_dir={out / task / name}", "progress=false"]
    if config_file:       # what `tuneforge train CONFIG --data FILE` runs: the file's recipe on the user's data
        config = load_config(config_file, [f"data.train={train}", "data.validation=null", "eval=null", *sets])
    else:
        config = own_data_config(train, sets)
    started = time.time()
    result = run_train(config)
    record = json.loads((result.run_dir / "run.json").read_text())
    # scored on the same held-out records whatever the recipe (a recipe's shorter max_length must not drop
    # long test records from the score)
    scores = score_tools(result.run_dir, test) if task == "tools" else score_loss(result.run_dir, test,
                                                                                  own_data_config(train, sets))
    return {"task": task, "recipe": recipe, **overrides, "steps": result.steps, "train_tokens": record["train_tokens_seen"],
            "wall_s": round(time.time() - started, 1), "eval_time_s": record["eval_time_s"],
            "train_wall_s": record["wall_time_s"], "best_step": record["best_step"], **scores}


def rescore(run_dir: Path, task: str, out: Path) -> dict:
    """Score a finished run again on the task's held-out records (``--rescore RUN_DIR``)."""
    from tuneforge.own_data import own_data_config

    train, test = tools_data(out / "data") if task == "tools" else roleplay_data(out / "data")
    if task == "tools":
        return score_tools(run_dir, test)
    return score_loss(run_dir, test, own_data_config(train, [f"output_dir={out / 'rescore'}"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["tools", "roleplay"], required=True)
    p.add_argument("--grid", action="append", default=[], help="key=v1,v2 (repeatable; the product is run)")
    p.add_argument("--steps", default="100", help="max_steps values, comma-separated")
    p.add_argument("--out", default="/tmp/own_data_defaults")
    p.add_argument("--config", help="train with this run config (e.g. examples/quickstart.yaml) on the task's "
                   "data instead of the own-data defaults, as `tuneforge train CONFIG --data FILE` does")
    p.add_argument("--tokens-per-s", type=float, default=None, help="this machine's training throughput for "
                   "the default recipe (quiet machine); converts trained tokens into training seconds")
    p.add_argument("--rescore", help="score this finished run directory on the task's held-out records, and exit")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.rescore:
        print(json.dumps({"task": args.task, "run": args.rescore, **rescore(Path(args.rescore), args.task, out)}))
        return 0
    train, test = tools_data(out / "data") if args.task == "tools" else roleplay_data(out / "data")
    axes = [(k, v.split(",")) for k, v in (g.split("=", 1) for g in args.grid)]
    if args.steps:
        axes.append(("max_steps", args.steps.split(",")))
    rows = []
    for values in itertools.product(*(v for _, v in axes)):
        overrides = dict(zip((k for k, _ in axes), values, strict=True))
        row = run_point(args.task, train, test, overrides, out, args.config)
        if args.tokens_per_s:
            row["est_train_s"] = round(row["train_tokens"] / args.tokens_per_s, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
    keys = ["recipe"] + [k for k, _ in axes] + ["train_tokens", "eval_time_s", "train_wall_s"] + (
        ["tool_accuracy", "exact_json"] if args.task == "tools" else ["heldout_loss"])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k)) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
