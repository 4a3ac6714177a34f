"""The quickstart's demo task: route customer-support tickets to one of six queues.

The dataset is generated here, deterministically from a seed, so the project owns it outright. Tickets
combine an opener, a body written for the queue, details (order numbers, products, amounts) and a
closer; bodies for different queues share vocabulary on purpose ("charged" appears in billing and refund
tickets, "app" in bug, login and feature tickets) so that keyword matching is not enough. The model
must answer with the queue name alone, which a base chat model rarely does.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LABELS = ["billing", "shipping", "refund", "login", "bug", "feature"]
SYSTEM_PROMPT = (
    "You route customer support tickets. Reply with exactly one word, the queue: "
    "billing, shipping, refund, login, bug or feature."
)

PRODUCTS = ["the Pro plan", "my Aero headphones", "the smart thermostat", "the photo printer", "my Nimbus laptop",
            "the standing desk", "the espresso machine", "the family subscription", "the fitness tracker",
            "the e-reader", "the webcam", "the mesh router", "the yoga mat bundle", "the gift card", "the robot vacuum"]
APPS = ["the mobile app", "the web dashboard", "the desktop client", "the iPad app", "the browser extension",
        "the Android app", "your website"]
OPENERS = ["Hi,", "Hello,", "Hey there,", "Good morning,", "To whom it may concern,", "Hi team,", "", "", "Urgent:",
           "Quick question.", "Hello support,"]
CLOSERS = ["Thanks.", "Thank you!", "Please help.", "Regards, {name}", "Cheers, {name}", "", "",
           "Any update appreciated.", "This is really frustrating.", "Thanks in advance, {name}"]
NAMES = ["Ana", "Ben", "Chen", "Dana", "Emeka", "Fatima", "Greg", "Hiro", "Ines", "Jonas", "Kemi", "Luca", "Maya",
         "Nils", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]

BODIES = {
    "billing": [
        "I was charged twice for {product} this month, ${amount} each time.",
        "My invoice #{number} shows ${amount} but my plan should cost less.",
        "Can you change the credit card on file? The old one expires next week.",
        "Why did my subscription price go up to ${amount} without notice?",
        "I need a VAT invoice for order {order} for my company's accounts.",
        "The payment for {product} failed but the money left my bank account.",
        "Please switch me from monthly to annual billing.",
        "There is a charge of ${amount} on my statement I don't recognise.",
        "My discount code was not applied to invoice #{number}.",
        "How do I download past invoices for {product}?",
    ],
    "shipping": [
        "My order {order} still hasn't arrived after {days} days.",
        "The tracking for {product} has not updated since {weekday}.",
        "Can I change the delivery address for order {order}? I moved.",
        "The courier says {product} was delivered but nothing is at my door.",
        "When will order {order} ship? It says processing for {days} days.",
        "Do you deliver to Norway? I want to order {product}.",
        "The box for {product} arrived crushed and open.",
        "I paid for express delivery but order {order} is coming by standard post.",
        "Only half of order {order} arrived; the rest is missing.",
        "Where is my package? Order {order}, placed on {weekday}.",
    ],
    "refund": [
        "I returned {product} {days} days ago and still have not got my ${amount} back.",
        "I want my money back for {product}, it stopped working.",
        "Please refund order {order}; I cancelled it within the trial period.",
        "I was charged ${amount} after cancelling, I want that refunded.",
        "How long does a refund to my credit card take for order {order}?",
        "{product} is not as described. I'd like to return it for a full refund.",
        "You refunded ${amount} but I paid more than that for order {order}.",
        "Can I get a refund instead of store credit for {product}?",
        "I never received {product}, so please give me a refund.",
        "I'd like to cancel my subscription and be refunded for the unused months.",
    ],
    "login": [
        "I can't log in to {app}, it says my password is wrong.",
        "The password reset email never arrives.",
        "My account is locked after too many attempts.",
        "I lost my phone and can't get the two-factor code to sign in.",
        "{app} keeps logging me out every few minutes.",
        "I changed my email address and now I can't access my account.",
        "Sign-in with Google fails on {app} with 'account not found'.",
        "Someone else may have logged into my account, I got a login alert from {city}.",
        "The verification code I receive is always expired.",
        "I forgot my username for {app}.",
    ],
    "bug": [
        "{app} crashes every time I open the settings page.",
        "The export button in {app} does nothing.",
        "Since the last update, {product} disconnects from {app} every hour.",
        "Prices show as NaN in {app} on my phone.",
        "{app} freezes when I upload a photo larger than {number} KB.",
        "Dark mode in {app} makes the text invisible.",
        "The search in {app} returns no results even for exact names.",
        "Notifications from {app} arrive twice.",
        "The firmware update for {product} fails at {percent}% with error {number}.",
        "Charts in {app} show the wrong dates, shifted by one day.",
    ],
    "feature": [
        "It would be great if {app} had a dark mode.",
        "Please add an option to export my data as CSV.",
        "Could {product} support Apple Home in a future update?",
        "I'd love a way to share my account with family members.",
        "Can you add keyboard shortcuts to {app}?",
        "Please let us schedule reports to be emailed every {weekday}.",
        "Would you consider adding Portuguese to {app}?",
        "A widget for the home screen would make {app} much more useful.",
        "Suggestion: let me pause my subscription instead of cancelling.",
        "It would help if {app} could sync with my calendar.",
    ],
}
CITIES = ["Lagos", "Lima", "Oslo", "Pune", "Quebec", "Riga", "Seoul", "Tunis"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def make_ticket(rng: random.Random, label: str) -> str:
    body = rng.choice(BODIES[label]).format(
        product=rng.choice(PRODUCTS), app=rng.choice(APPS), amount=f"{rng.randint(5, 400)}.{rng.randint(0, 99):02d}",
        number=rng.randint(1000, 99999), order=f"#{rng.choice('ABCDEFGH')}{rng.randint(10000, 99999)}",
        days=rng.randint(2, 30), weekday=rng.choice(WEEKDAYS), city=rng.choice(CITIES), percent=rng.randint(5, 95),
    )
    name = rng.choice(NAMES)
    parts = [rng.choice(OPENERS), body, rng.choice(CLOSERS).format(name=name)]
    text = " ".join(p for p in parts if p)
    if rng.random() < 0.15:
        text = text.lower()
    return text


def make_record(rng: random.Random) -> dict:
    label = rng.choice(LABELS)
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": make_ticket(rng, label)},
                         {"role": "assistant", "content": label}]}


def generate_splits(n_train: int = 800, n_validation: int = 80, n_test: int = 150,
                    seed: int = 0) -> dict[str, list[dict]]:
    """Train/validation/test records with no ticket text shared between splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for name, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        rows: list[dict] = []
        while len(rows) < n:
            rec = make_record(rng)
            text = rec["messages"][1]["content"]
            if text in seen:
                continue
            seen.add(text)
            rows.append(rec)
        splits[name] = rows
    return splits


def write_splits(out_dir: str | Path, **kwargs) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in generate_splits(**kwargs).items():
        path = out_dir / f"tickets_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = path
    return paths


if __name__ == "__main__":  # regenerate examples/data/
    import sys

    print(write_splits(sys.argv[1] if len(sys.argv) > 1 else "examples/data"))
