"""Quality heuristics and PII patterns for one training example.

Each function looks at plain strings (the prompt: user/system turns joined; the answer: assistant
turns joined) and returns short messages; :mod:`tuneforge.data.curation.validation` turns them into named,
counted issues. Every regex has bounded repetition so a 10 MB field costs linear time, not quadratic.

PII kinds: ``email``, ``phone`` (international ``+..`` or 10-digit numbers written with separators or
parentheses; bare digit runs are not reported), ``card`` (13-19 digits that pass the Luhn check).
``mask_pii`` replaces each match with ``[EMAIL]``, ``[PHONE]`` or ``[CARD]``.
"""

from __future__ import annotations

import re

# Each pattern (matched on lower-cased text) contains one of REFUSAL_KEYWORDS: a text without any of
# them is skipped with a few substring searches instead of a regex scan (~1 µs instead of ~80 µs).
REFUSAL_PATTERNS = (
    r"as an ai(?: language)? model",
    r"as a (?:large )?language model",
    r"as an ai(?: assistant| developed by| created by)",
    r"i(?: am|'m|’m) (?:just |only )?an ai\b",
    r"i(?: am|'m|’m) sorry,? but (?:as an ai|i (?:can ?not|can't|can’t|am unable to|'m unable to))",
    r"i can ?not (?:fulfill|comply with|assist with) (?:this|that|your) request",
    r"my (?:knowledge )?cut-?off date",
)
REFUSAL_KEYWORDS = ("an ai", "language model", "sorry", "request", "off date")
PLACEHOLDER_PATTERNS = (                     # matched on lower-cased text
    r"lorem ipsum",
    r"<\s*(?:placeholder|insert[^<>\n]{0,40})\s*>",
    r"\[\s*(?:placeholder|insert[^\[\]\n]{0,40}|your [a-z ]{1,30} here)\s*\]",
    r"\{\{\s*placeholder\s*\}\}",
)
PLACEHOLDER_KEYWORDS = ("lorem", "placeholder", "insert", " here]")
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS))
_PLACEHOLDER = re.compile("|".join(PLACEHOLDER_PATTERNS))
_TODO = re.compile(r"\b(?:TODO|FIXME)\b")                       # case-sensitive: "todo list" is fine
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
_NOT_LETTER = re.compile(r"[\W\d_]+")
_ASCII_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}"                               # local part
    r"@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}\b"  # domain
)
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){2,4}"       # +44 20 7946 0958, +1-555-010-9999
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"                                          # (555) 010-9999
    r"|\d{3}[.-]\d{3}[.-]\d{4}"                                                 # 555-010-9999
    r")(?!\w)", re.ASCII)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?!\d)", re.ASCII)

_MASKS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]"}


def normalise_text(text: str) -> str:
    """Lower-case and collapse whitespace: the form duplicate and echo checks compare."""
    return " ".join(text.lower().split())


def is_refusal(answer: str, low: str | None = None) -> bool:
    """True when the answer contains boilerplate refusal / 'As an AI language model' text.

    ``low``: ``answer.lower()`` when the caller has it already.
    """
    low = answer.lower() if low is None else low
    if not any(k in low for k in REFUSAL_KEYWORDS):
        return False
    return _REFUSAL.search(low.replace("’", "'")) is not None


def find_placeholder(text: str, low: str | None = None) -> str | None:
    """The first placeholder-looking span (lorem ipsum, TODO, <placeholder>, [insert ...]) or None.

    ``low``: ``text.lower()`` when the caller has it already.
    """
    if "TODO" in text or "FIXME" in text:
        m = _TODO.search(text)
        if m:
            return m.group(0)
    low = text.lower() if low is None else low
    if not any(k in low for k in PLACEHOLDER_KEYWORDS):
        return None
    m = _PLACEHOLDER.search(low)
    return m.group(0) if m else None


def repeats_prompt(prompt: str, answer: str, min_chars: int = 20) -> bool:
    """True when the answer is the prompt again, starts by echoing the whole prompt, or is copied out of it.

    Only prompts/answers of at least ``min_chars`` normalised characters count as echoes, so a short
    answer like "yes" that happens to appear in the prompt is not reported.
    """
    # cheap exit: an echo starts like the prompt, or is shorter than it
    head_a, head_p = normalise_text(answer[:80])[:min_chars], normalise_text(prompt[:80])[:min_chars]
    if head_a != head_p and len(answer) > len(prompt) + 8:
        return False
    p, a = normalise_text(prompt), normalise_text(answer)
    if not p or not a:
        return False
    if a == p:
        return True
    if len(p) >= min_chars and a.startswith(p):
        return True
    return len(a) >= min_chars and a in p


_CONTROL_BYTES = bytes(c for c in range(32) if c not in (9, 10, 13)) + b"\x7f"


def control_char(text: str) -> str | None:
    """The first control character (other than tab/newline/CR) or U+FFFD in ``text``, or None."""
    if text.isascii():
        b = text.encode()
        if len(b.translate(None, _CONTROL_BYTES)) == len(b):
            return None
    m = _CONTROL.search(text)
    return m.group(0) if m else None


def letter_fraction(text: str) -> float:
    """Share of the characters of ``text`` that are letters (any script)."""
    if not text:
        return 0.0
    if text.isascii():
        b = text.encode()
        return (len(b) - len(b.translate(None, _ASCII_LETTERS))) / len(b)
    return len(_NOT_LETTER.sub("", text)) / len(text)


def non_text_reason(text: str, min_letter_fraction: float = 0.25, min_chars: int = 32,
                    sample_chars: int = 4096) -> str | None:
    """Why ``text`` looks like mostly non-text content (few letters), or None.

    Looks at the first ``sample_chars`` characters only; texts shorter than ``min_chars`` pass (a short
    numeric answer is fine).
    """
    sample = text[:sample_chars]
    if len(sample) < min_chars:
        return None
    fraction = letter_fraction(sample)
    if fraction < min_letter_fraction:
        return f"only {fraction:.0%} of the characters are letters"
    return None


_ZERO = bytes(48 if 48 <= c <= 57 else c for c in range(256))    # every ASCII digit -> b"0"


def _digit_shape(text: str) -> tuple[bool, bool]:
    """(may hold a phone number, may hold a card number): substring tests on the text with digits as '0'.

    A C-speed prefilter (~1 µs for 1 KB) so the phone/card regexes only run where their shapes occur.
    """
    b = text.encode("utf-8", "surrogatepass").translate(_ZERO)
    if b"000" not in b:
        return False, False
    phone = b"+0" in b or b"(000)" in b or b"000-000" in b or b"000.000" in b
    card = b"00000000" in b or b"0000 0000" in b or b"0000-0000" in b
    return phone, card


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers (``digits``: only 0-9)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_matches(text: str) -> list[re.Match]:
    out = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group(0))
        if 13 <= len(digits) <= 19 and luhn_valid(digits) and len(set(digits)) > 1:
            out.append(m)
    return out


def find_pii(text: str) -> dict[str, int]:
    """Counts of PII matches in ``text`` by kind (only kinds that occur)."""
    found: dict[str, int] = {}
    if "@" in text:
        n = len(_EMAIL.findall(text))
        if n:
            found["email"] = n
    phone, card = _digit_shape(text)
    if phone:
        n = len(_PHONE.findall(text))
        if n:
            found["phone"] = n
    if card:
        n = len(_card_matches(text))
        if n:
            found["card"] = n
    return found


def mask_pii(text: str) -> str:
    """``text`` with emails, phone numbers and Luhn-valid card numbers replaced by
    ``[EMAIL]``/``[PHONE]``/``[CARD]``."""
    if "@" in text:
        text = _EMAIL.sub(_MASKS["email"], text)
    phone, card = _digit_shape(text)
    if card:
        for m in reversed(_card_matches(text)):
            text = text[:m.start()] + _MASKS["card"] + text[m.end():]
    if phone:
        text = _PHONE.sub(_MASKS["phone"], text)
    return text
