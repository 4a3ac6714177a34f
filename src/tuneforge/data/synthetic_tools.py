"""The tool-use example's data: requests for five tools, generated deterministically from a seed.

Tools (:data:`TOOLS`, shipped as ``recipes/data/tools.json``): ``get_weather(city, unit?)``,
``calculator(a, op, b)``, ``convert_units(value, from_unit, to_unit)``, ``add_calendar_event(title, date, time)``
and ``web_search(query)``. Requests are phrasing templates filled with slots (cities, numbers, units, dates,
topics); the arguments follow from the slots, so every reference call is exact. Record kinds, in fixed shares
per split: :data:`NO_TOOL_SHARE` requests that need no tool (a plain answer), :data:`PARALLEL_SHARE` requests
that need two calls in one turn, the rest one call.

* train / validation records are whole exchanges in OpenAI's shape: user request, assistant ``tool_calls``,
  ``tool`` results (from :func:`run_tool`, fake but deterministic), the assistant's final answer;
* test records end at the decision ``tuneforge eval`` scores: the reference is the assistant's calls (or its
  plain answer), and the templates marked held out (the last of each list) appear in test only, each drawn with
  :data:`HELD_OUT_SHARE` of its list's test requests.

``python -m tuneforge.data.synthetic_tools DIR`` writes ``tools_{train,validation,test}.jsonl`` and ``tools.json``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SYSTEM_PROMPT = "You are a helpful assistant. Use a tool when the request needs one; otherwise answer directly."
NO_TOOL_SHARE = 0.15
PARALLEL_SHARE = 0.10
HELD_OUT_SHARE = 0.5  # of each test request's template list, how often its held-out (last) phrasing is drawn
SIZES = {"train": 600, "validation": 100, "test": 150}

UNITS = ["celsius", "fahrenheit"]
OPS = ["add", "subtract", "multiply", "divide"]
CONVERSIONS = {  # (from, to): factor; to-value = value * factor
    ("kilometers", "miles"): 0.621371, ("miles", "kilometers"): 1.609344, ("kilograms", "pounds"): 2.204623,
    ("pounds", "kilograms"): 0.453592, ("meters", "feet"): 3.280840, ("feet", "meters"): 0.3048,
    ("liters", "gallons"): 0.264172, ("gallons", "liters"): 3.785412, ("inches", "centimeters"): 2.54,
    ("centimeters", "inches"): 0.393701,
}


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TOOLS = [
    _function("get_weather", "Current weather in a city",
              {"city": {"type": "string"}, "unit": {"type": "string", "enum": UNITS}}, ["city"]),
    _function("calculator", "Apply one arithmetic operation to two numbers",
              {"a": {"type": "number"}, "op": {"type": "string", "enum": OPS}, "b": {"type": "number"}},
              ["a", "op", "b"]),
    _function("convert_units", "Convert a value between units of length, weight or volume (plural names)",
              {"value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
              ["value", "from_unit", "to_unit"]),
    _function("add_calendar_event", "Add an event to the calendar; date YYYY-MM-DD, time HH:MM (24-hour)",
              {"title": {"type": "string"}, "date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
               "time": {"type": "string", "pattern": "^\\d{2}:\\d{2}$"}}, ["title", "date", "time"]),
    _function("web_search", "Search the web", {"query": {"type": "string"}}, ["query"]),
]

CITIES = ["Paris", "Oslo", "Lima", "Tokyo", "Nairobi", "Toronto", "Sydney", "Madrid", "Cairo", "Seoul", "Berlin",
          "Mumbai", "Chicago", "Lisbon", "Bangkok", "Dublin", "Mexico City", "Cape Town", "Vienna", "Reykjavik"]
CONDITIONS = ["sunny", "cloudy", "light rain", "clear", "windy", "foggy", "snowing", "overcast"]
EVENTS = ["Dentist", "Team standup", "Lunch with Maya", "Yoga class", "Call mom", "Project review", "Haircut",
          "Book club", "Flight to Lisbon", "Parent-teacher meeting", "Gym", "Car service", "Piano lesson",
          "Coffee with Ben", "Quarterly planning"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
TOPICS = {  # query: the snippet the fake search returns
    "the height of Mount Everest": "Mount Everest is 8,849 metres tall.",
    "who invented the telephone": "Alexander Graham Bell patented the telephone in 1876.",
    "the population of Canada": "Canada has about 40 million people.",
    "the release date of the next Olympics": "The next Summer Olympics open in Los Angeles in July 2028.",
    "how long to boil an egg": "A soft-boiled egg takes about 6 minutes; hard-boiled about 10.",
    "the best time to visit Japan": "Spring (March to May) and autumn (October to November) are the favourites.",
    "the distance from the Earth to the Moon": "The Moon is on average 384,400 km from the Earth.",
    "who wrote Pride and Prejudice": "Pride and Prejudice was written by Jane Austen, published in 1813.",
    "the speed of sound": "Sound travels at about 343 metres per second in air.",
    "the tallest building in the world": "The Burj Khalifa in Dubai is the tallest building, at 828 metres.",
    "how many bones are in the human body": "An adult human has 206 bones.",
    "the boiling point of water at altitude": "Water boils at about 90 C at 3,000 metres.",
    "the latest Python release": "The latest Python release is listed on python.org/downloads.",
    "vegetarian lasagna recipes": "Popular vegetarian lasagna recipes use spinach, ricotta and mushrooms.",
    "the opening hours of the Louvre": "The Louvre opens 9:00 to 18:00, closed on Tuesdays.",
    "how to repot a cactus": "Repot a cactus in spring with gloves and a fast-draining soil mix.",
    "the largest desert on Earth": "Antarctica is the largest desert; the Sahara is the largest hot desert.",
    "when the Eiffel Tower was built": "The Eiffel Tower was built from 1887 to 1889.",
    "the deepest lake in the world": "Lake Baikal in Siberia is the deepest lake, at 1,642 metres.",
    "how to remove a red wine stain": "Blot the stain, then cover it with salt or baking soda before washing.",
    "the rules of pickleball": "Pickleball is played to 11 points, serving underhand, with a non-volley zone.",
    "symptoms of dehydration": "Thirst, dark urine, tiredness and dizziness are common signs of dehydration.",
    "the history of the printing press": "Johannes Gutenberg built his printing press around 1440.",
    "cheap flights to Lisbon": "Fares to Lisbon are usually lowest from November to February.",
    "how solar panels work": "Solar cells turn sunlight into electricity through the photovoltaic effect.",
    "the plot of Hamlet": "Prince Hamlet seeks revenge on his uncle, who murdered Hamlet's father.",
    "the fastest land animal": "The cheetah is the fastest land animal, reaching about 110 km/h.",
    "how to start a sourdough starter": "Mix equal weights of flour and water and feed it daily for a week.",
    "the number of moons of Jupiter": "Jupiter has 95 officially recognised moons.",
    "the capital of Australia": "Canberra is the capital of Australia.",
}

# Phrasings per tool; the last entry of each list is held out of train and validation (test only).
# The training lists vary the verb, the word order and how directly the tool is asked for (issue #26: a 135M model
# trained on "add" / "schedule" alone did not carry "book" over to the calendar, nor "do I need a jacket" to the
# weather); none of them copies a held-out phrasing or a hand-written request.
WEATHER = ["What's the weather in {city}?", "How is the weather in {city} right now?",
           "Is it raining in {city}?", "weather {city}", "Can you check the weather for {city}?",
           "Tell me the current weather in {city}.", "Will it rain in {city} later?",
           "Is it umbrella weather in {city}?", "How hot is it in {city} at the moment?",
           "Is it cold outside in {city}?", "Is it sunny in {city} today?", "Any snow in {city} right now?",
           "How are conditions outside in {city}?", "Forecast for {city}?",
           "Going for a run in {city}: what are the conditions?", "Is it a good beach day in {city}?",
           "Heading out in {city} soon. How warm is it?", "Do I need a jacket in {city} today?"]
WEATHER_UNIT = ["What's the temperature in {city} in {unit}?", "Weather in {city}, in {unit} please.",
                "How warm is it in {city}? Give it in {unit}.", "Temperature in {city}, {unit}?",
                "In {unit}, how hot is it in {city}?", "Is it cold in {city}? Answer in {unit}.",
                "Give me the {city} weather in {unit}.", "Check {city}'s weather in {unit} for me."]
OP_WORDS = {
    "add": ["What is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} = ?", "Sum of {a} and {b}?",
            "Increase {a} by {b}.", "What do {a} and {b} add up to?", "I have {a} and get {b} more. How many now?",
            "Calculate {a} plus {b}, please.", "Could you total {a} and {b} for me?"],
    "subtract": ["What is {a} minus {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?", "Take {b} away from {a}.",
                 "Reduce {a} by {b}.", "Deduct {b} from {a}.", "{a} less {b} is what?",
                 "Work out {a} minus {b} for me.", "How much is left if I take {b} from {a}?"],
    "multiply": ["What is {a} times {b}?", "Multiply {a} by {b}.", "{a} * {b} = ?",
                 "What's the product of {a} and {b}?", "Compute {a} times {b} for me.",
                 "I need {b} groups of {a}: how many in total?", "What do you get if you multiply {a} and {b}?",
                 "How much is {a} multiplied by {b}?"],
    "divide": ["What is {a} divided by {b}?", "Divide {a} by {b}.", "{a} / {b} = ?", "How many times does {b} go "
               "into {a}?", "What is {a} over {b}?", "What's the quotient of {a} and {b}?",
               "Work out {a} divided by {b}.", "Split {a} into {b} equal parts: how much is each?"],
}
CONVERT = ["Convert {value} {from_unit} to {to_unit}.", "How many {to_unit} is {value} {from_unit}?",
           "{value} {from_unit} in {to_unit}?", "What is {value} {from_unit} in {to_unit}?",
           "Turn {value} {from_unit} into {to_unit}.", "Could you change {value} {from_unit} to {to_unit}?",
           "{value} {from_unit} equals how many {to_unit}?", "Express {value} {from_unit} in {to_unit}, please.",
           "What's {value} {from_unit} when written in {to_unit}?",
           "I have {value} {from_unit}. How much is that in {to_unit}?"]
CALENDAR = ["Add '{title}' to my calendar on {date} at {time}.", "Schedule {title} for {date} at {time}.",
            "Put {title} in my calendar, {date}, {time}.", "Create an event called {title} on {date} at {time}.",
            "Remind me: {title}, {date} at {time}. Put it in the calendar.", "Reserve {date} at {time} for {title}.",
            "Please reserve a slot on {date}, {time}, for {title}.",
            "Set up an appointment: {title}, {date}, {time}.", "I need a slot for {title} on {date} at {time}.",
            "Block off {date} at {time} for {title}, please.", "Make a calendar entry: {title} on {date} at {time}.",
            "Could you note {title} in my diary for {date} at {time}?", "New event: {title}, {date}, {time}.",
            "{title} on {date} at {time} - please add it to my schedule.", "Arrange {title} on {date} at {time}.",
            "At {time} on {date} I have {title}; put it in my calendar.",
            "Can you put {title} on my schedule for {date} at {time}?",
            "Can you book {title} for {time} on {date}?"]
SEARCH = ["Search the web for {query}.", "Look up {query}.", "Can you google {query}?",
          "Find information about {query}.", "search: {query}", "Do a web search on {query}.",
          "What does the internet say about {query}?", "Please find {query} online.",
          "Can you look into {query} for me?", "Browse the web for {query}.", "Research {query} on the internet.",
          "Quick search: {query}", "Find me some pages on {query}.",
          "I'd like to know {query}; please search online."]
PARALLEL = {
    "weather2": ["What's the weather in {city} and in {city2}?", "Compare the weather in {city} and {city2}.",
                 "Weather for {city} and {city2}, please.", "Check {city} first, then {city2}: what's the weather?",
                 "I'm travelling from {city} to {city2}. How's the weather in both?",
                 "How are {city} and {city2} doing weather-wise?"],
    "weather_convert": ["What's the weather in {city}, and how many {to_unit} is {value} {from_unit}?",
                        "Check the weather in {city} and convert {value} {from_unit} to {to_unit}.",
                        "Two things: weather in {city}, and {value} {from_unit} in {to_unit}.",
                        "Is it raining in {city}? And turn {value} {from_unit} into {to_unit}.",
                        "Tell me the weather in {city}; also, what is {value} {from_unit} in {to_unit}?"],
    "calc2": ["What is {a} plus {b}, and {c} times {d}?", "Compute {a} + {b} and {c} * {d}.",
              "Two sums for me: {a} plus {b}; {c} multiplied by {d}.", "Add {a} to {b}, then multiply {c} by {d}.",
              "Work out {a} plus {b} as well as {c} times {d}.", "I need {a} + {b} and also {c} x {d}."],
}
NO_TOOL = [  # (request, answer); each list's last entry is held out for test
    [("Translate '{word}' into {language}.", "'{word}' in {language} is '{translation}'."),
     ("How do you say '{word}' in {language}?", "You say '{translation}'."),
     ("{language} for '{word}'?", "'{translation}'."),
     ("What's the {language} word for '{word}'?", "The {language} word for '{word}' is '{translation}'.")],
    [("Is {n} even or odd?", "{n} is {parity}."), ("Is {n} an even number?", "{n} is {parity}."),
     ("Odd or even: {n}?", "{n} is {parity}.")],
    [("Give me a synonym for '{adjective}'.", "A synonym for '{adjective}' is '{synonym}'."),
     ("Another word for '{adjective}'?", "You could say '{synonym}'."),
     ("What's a word that means '{adjective}'?", "'{synonym}' means much the same as '{adjective}'.")],
    [("Hi! How are you?", "I'm doing well, thanks for asking. How can I help you today?"),
     ("Thanks, that's all for now.", "You're welcome! Have a great day."),
     ("Good morning!", "Good morning! What can I do for you?"),
     ("Hello there", "Hello! How can I help?")],
    [("Spell '{adjective}' backwards.", "'{adjective}' backwards is '{backwards}'."),
     ("How many letters are in the word '{adjective}'?", "'{adjective}' has {letters} letters."),
     ("What is the first letter of '{adjective}'?", "The first letter of '{adjective}' is '{first}'.")],
    [("Thanks for adding {title} to my calendar.", "You're welcome! Anything else I can help with?"),  # a tool's
     ("I just got back from {city}, what a trip!", "Welcome back! I hope you had a great time in {city}."),  # topic,
     ("What's your favourite kind of weather?", "I have no favourite, but many people love a mild sunny day."),  # no
     ("{city} is such a lovely city.", "It is! {city} has a lot to offer.")],  # tool needed
]
TRANSLATIONS = {  # word: (Spanish, French)
    "thank you": ("gracias", "merci"), "good night": ("buenas noches", "bonne nuit"), "cat": ("gato", "chat"),
    "house": ("casa", "maison"), "water": ("agua", "eau"), "friend": ("amigo", "ami"), "book": ("libro", "livre"),
    "apple": ("manzana", "pomme"), "dog": ("perro", "chien"), "bread": ("pan", "pain"), "cheese": ("queso", "fromage"),
    "tree": ("árbol", "arbre"), "sun": ("sol", "soleil"), "car": ("coche", "voiture"), "school": ("escuela", "école"),
}
SYNONYMS = {"happy": "cheerful", "fast": "quick", "big": "large", "tired": "weary", "smart": "clever",
            "angry": "furious", "small": "tiny", "brave": "courageous", "calm": "peaceful", "rich": "wealthy",
            "cold": "chilly", "funny": "amusing", "quiet": "silent", "strong": "powerful", "pretty": "lovely"}


# --- the fake tools (shared by the data and examples/tool_agent.py) ----------------------------------------------

def _stable(text: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(text))


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(x, 2)


def run_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """The fake tool ``name``'s result for ``arguments`` (deterministic; the same in the data and the agent)."""
    if name == "get_weather":
        city, unit = str(arguments.get("city", "")), arguments.get("unit", "celsius")
        celsius = _stable(city.lower()) % 35 - 5
        temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
        return {"city": city, "temperature": temperature, "unit": unit,
                "conditions": CONDITIONS[_stable(city) % len(CONDITIONS)]}
    if name == "calculator":
        a, op, b = arguments.get("a", 0), arguments.get("op"), arguments.get("b", 0)
        if op == "divide" and b == 0:
            return {"error": "division by zero"}
        result = {"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a / b if b else 0}.get(op)
        return {"result": _number(result)} if result is not None else {"error": f"unknown op {op!r}"}
    if name == "convert_units":
        factor = CONVERSIONS.get((arguments.get("from_unit"), arguments.get("to_unit")))
        if factor is None:
            return {"error": "unsupported conversion"}
        return {"value": _number(round(arguments.get("value", 0) * factor, 2)), "unit": arguments["to_unit"]}
    if name == "add_calendar_event":
        return {"status": "created", "event_id": f"evt_{_stable(json.dumps(arguments, sort_keys=True)) % 100000}"}
    if name == "web_search":
        query = str(arguments.get("query", ""))
        snippet = TOPICS.get(query, f"Several pages discuss {query}.")
        return {"results": [{"title": query[:1].upper() + query[1:], "snippet": snippet}]}
    return {"error": f"unknown tool {name!r}"}


def final_answer(name: str, arguments: dict[str, Any], result: dict[str, Any]) -> str:
    """The assistant's sentence about one tool result."""
    if "error" in result:
        return f"Sorry, that did not work: {result['error']}."
    if name == "get_weather":
        mark = "F" if result["unit"] == "fahrenheit" else "C"
        return f"In {result['city']} it is {result['temperature']}°{mark} and {result['conditions']}."
    if name == "calculator":
        sign = {"add": "+", "subtract": "-", "multiply": "×", "divide": "÷"}[arguments["op"]]
        return f"{_number(arguments['a'])} {sign} {_number(arguments['b'])} = {result['result']}."
    if name == "convert_units":
        return f"{_number(arguments['value'])} {arguments['from_unit']} is {result['value']} {result['unit']}."
    if name == "add_calendar_event":
        return f"Added '{arguments['title']}' to your calendar on {arguments['date']} at {arguments['time']}."
    return result["results"][0]["snippet"]


# --- requests ----------------------------------------------------------------------------------------------------

def _pick(rng: random.Random, templates: list, held_out: bool):
    """A template: from all but the last (train, validation); in test the last with :data:`HELD_OUT_SHARE`, else
    one of the others (a fixed share, so that more training phrasings do not thin out the held-out ones)."""
    if held_out and rng.random() < HELD_OUT_SHARE:
        return templates[-1]
    return rng.choice(templates[:-1])


def _date(rng: random.Random) -> tuple[str, str]:
    """(how the user writes the date, YYYY-MM-DD)."""
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    iso = f"2026-{month:02d}-{day:02d}"
    said = rng.choice([f"{MONTHS[month - 1]} {day}, 2026", f"{day} {MONTHS[month - 1]} 2026", iso,
                       f"{MONTHS[month - 1][:3]} {day} 2026"])
    return said, iso


def _time(rng: random.Random) -> tuple[str, str]:
    hour, minute = rng.randint(7, 20), rng.choice([0, 0, 15, 30, 45])
    iso = f"{hour:02d}:{minute:02d}"
    twelve = f"{(hour - 1) % 12 + 1}{':%02d' % minute if minute else ''}{'am' if hour < 12 else 'pm'}"
    return rng.choice([twelve, iso, twelve.replace("am", " AM").replace("pm", " PM")]), iso


def _value(rng: random.Random) -> int | float:
    return rng.choice([rng.randint(1, 500), round(rng.uniform(0.5, 100), 1)])


def _conversion(rng: random.Random) -> tuple[dict, dict]:
    from_unit, to_unit = rng.choice(sorted(CONVERSIONS))
    value = _value(rng)
    return {"value": value, "from_unit": from_unit, "to_unit": to_unit}, {"value": value, "from_unit": from_unit,
                                                                          "to_unit": to_unit}


def single_call(rng: random.Random, held_out: bool) -> tuple[str, list[tuple[str, dict]]]:
    """A request that needs one call: (text, [(tool, arguments)])."""
    tool = rng.choice(["get_weather", "calculator", "convert_units", "add_calendar_event", "web_search"])
    if tool == "get_weather":
        city = rng.choice(CITIES)
        if rng.random() < 0.35:
            unit = rng.choice(UNITS)
            return _pick(rng, WEATHER_UNIT, held_out).format(city=city, unit=unit), [
                (tool, {"city": city, "unit": unit})]
        return _pick(rng, WEATHER, held_out).format(city=city), [(tool, {"city": city})]
    if tool == "calculator":
        op = rng.choice(OPS)
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        return _pick(rng, OP_WORDS[op], held_out).format(a=a, b=b), [(tool, {"a": a, "op": op, "b": b})]
    if tool == "convert_units":
        slots, args = _conversion(rng)
        return _pick(rng, CONVERT, held_out).format(**slots), [(tool, args)]
    if tool == "add_calendar_event":
        (date_said, date), (time_said, time) = _date(rng), _time(rng)
        title = rng.choice(EVENTS)
        return _pick(rng, CALENDAR, held_out).format(title=title, date=date_said, time=time_said), [
            (tool, {"title": title, "date": date, "time": time})]
    query = rng.choice(sorted(TOPICS))
    return _pick(rng, SEARCH, held_out).format(query=query), [(tool, {"query": query})]


def parallel_calls(rng: random.Random, held_out: bool) -> tuple[str, list[tuple[str, dict]]]:
    """A request that needs two calls in one turn."""
    kind = rng.choice(sorted(PARALLEL))
    template = _pick(rng, PARALLEL[kind], held_out)
    if kind == "weather2":
        city, city2 = rng.sample(CITIES, 2)
        return template.format(city=city, city2=city2), [("get_weather", {"city": city}),
                                                         ("get_weather", {"city": city2})]
    if kind == "weather_convert":
        city = rng.choice(CITIES)
        slots, args = _conversion(rng)
        return template.format(city=city, **slots), [("get_weather", {"city": city}), ("convert_units", args)]
    a, b, c, d = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 99)
    return template.format(a=a, b=b, c=c, d=d), [("calculator", {"a": a, "op": "add", "b": b}),
                                                 ("calculator", {"a": c, "op": "multiply", "b": d})]


def no_tool(rng: random.Random, held_out: bool) -> tuple[str, str]:
    """A request answered without a tool: (text, answer)."""
    request, answer = _pick(rng, rng.choice(NO_TOOL), held_out)
    word, adjective, n = rng.choice(sorted(TRANSLATIONS)), rng.choice(sorted(SYNONYMS)), rng.randint(1, 300)
    city, title = rng.choice(CITIES), rng.choice(EVENTS)
    language = rng.choice(["Spanish", "French"])
    slots = {"word": word, "language": language, "translation": TRANSLATIONS[word][language == "French"],
             "adjective": adjective, "synonym": SYNONYMS[adjective], "backwards": adjective[::-1],
             "letters": len(adjective), "first": adjective[0], "n": n, "parity": "odd" if n % 2 else "even",
             "city": city, "title": title}
    return request.format(**slots), answer.format(**slots)


def make_record(rng: random.Random, kind: str, held_out: bool, whole: bool) -> dict:
    """One record of ``kind`` (``single``, ``parallel``, ``none``); ``whole``: with results and the final answer,
    else ending at the assistant's calls."""
    messages: list[dict] = [{"role": "system", "content": SYSTEM_PROMPT}]
    if kind == "none":
        text, answer = no_tool(rng, held_out)
        return {"messages": messages + [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]}
    text, calls = (parallel_calls if kind == "parallel" else single_call)(rng, held_out)
    ids = [f"call_{i + 1}" for i in range(len(calls))]
    messages += [{"role": "user", "content": text},
                 {"role": "assistant", "content": "", "tool_calls": [
                     {"id": i, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
                     for i, (name, args) in zip(ids, calls, strict=True)]}]
    if whole:
        results = [run_tool(name, args) for name, args in calls]
        messages += [{"role": "tool", "tool_call_id": i, "content": json.dumps(r)}
                     for i, r in zip(ids, results, strict=True)]
        messages.append({"role": "assistant", "content": " ".join(
            final_answer(name, args, r) for (name, args), r in zip(calls, results, strict=True))})
    return {"messages": messages}


def kinds(n: int, rng: random.Random) -> list[str]:
    """``n`` record kinds in the fixed shares, shuffled."""
    n_none, n_parallel = round(n * NO_TOOL_SHARE), round(n * PARALLEL_SHARE)
    out = ["none"] * n_none + ["parallel"] * n_parallel + ["single"] * (n - n_none - n_parallel)
    rng.shuffle(out)
    return out


def generate_splits(sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """Train / validation / test records, no request text shared between splits (see the module docstring)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for name, n in (sizes or SIZES).items():
        rows: list[dict] = []
        for kind in kinds(n, rng):
            for _ in range(1000):
                rec = make_record(rng, kind, held_out=name == "test", whole=name != "test")
                text = rec["messages"][1]["content"]
                if text.lower() not in seen:
                    break
            else:
                raise ValueError(f"{name}: too few distinct {kind} requests for {n} records")
            seen.add(text.lower())
            rows.append(rec)
        splits[name] = rows
    return splits


def write_splits(out_dir: str | Path, **kwargs: Any) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in generate_splits(**kwargs).items():
        path = out_dir / f"tools_{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths[name] = path
    paths["tools"] = out_dir / "tools.json"
    paths["tools"].write_text(json.dumps(TOOLS, indent=1) + "\n", encoding="utf-8")
    return paths


if __name__ == "__main__":  # regenerate src/tuneforge/recipes/data/
    import sys

    print(write_splits(sys.argv[1] if len(sys.argv) > 1 else "examples/data"))
