"""Numbers as people say them: "4271" -> "four thousand two hundred seventy one", and the
other ways a caller may read it out ("four two seven one", "forty two seventy one").

Why: the offline recognizer hears only the words of its domain model (agent/offline_voice.py),
and a document's "7 3 1 9" or "within 30 days" is written in digits. Each reading becomes
a sentence of that model, so a caller who reads a code digit by digit is heard, and so is
espeak-ng, which says "4271" as a number (the caller's ears decode the agent's voice).

Pure text in, text out: no locale, no currency, no negative numbers (a minus sign is read
as a dash by espeak-ng anyway).
"""

from __future__ import annotations

import re

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
       "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
SCALES = [(10**9, "billion"), (10**6, "million"), (1000, "thousand")]
MAX_CARDINAL_DIGITS = 12  # longer runs are identifiers (phone numbers, IDs): read digit by digit
_ORDINAL = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
            "twelve": "twelfth"}
# A time (9:30), or a number: digit groups with commas (1,000), a decimal part, an ordinal
# suffix (21st), a percent sign.
_NUMBER = re.compile(
    r"(?<![\d,.])(?:(?P<hour>\d{1,2}):(?P<minute>\d\d)(?!\d)"
    r"|(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(?P<frac>\d+))?(?:(?P<ord>st|nd|rd|th)(?![a-z]))?(?P<pct>\s*%)?)"
)


def cardinal(n: int) -> str:
    """0 <= n < 10**12 as words, the American way (no "and"): 4271 -> "four thousand two
    hundred seventy one"."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + cardinal(n % 100))
    for size, name in SCALES:
        if n >= size:
            return cardinal(n // size) + " " + name + ("" if n % size == 0 else " " + cardinal(n % size))
    raise ValueError(n)


def ordinal(n: int) -> str:
    """21 -> "twenty first": the last word of the cardinal, made ordinal."""
    *head, last = cardinal(n).split()
    if last in _ORDINAL:
        last = _ORDINAL[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*head, last])


def digit_by_digit(digits: str, zero: str = "zero") -> str:
    return " ".join(zero if d == "0" else ONES[int(d)] for d in digits)


def _after_pair(n: int) -> str:
    """Two digits said after others, as in "nine oh five" or "forty two seventy one"."""
    return f"oh {ONES[n]}" if n < 10 else cardinal(n)


def readings(digits: str) -> list[str]:
    """The ways a caller reads the digit string ``digits`` aloud, the likeliest first.

    A quantity ("30") is said as a number. A longer one may be a code, said digit by digit
    ("four two seven one", "four oh seven one") or in pairs, as room numbers and years are
    ("four twelve", "forty two seventy one", "forty two hundred seventy one"). A leading
    zero or more than twelve digits make an identifier: digit by digit only."""
    if digits.startswith("0") and len(digits) > 1 or len(digits) > MAX_CARDINAL_DIGITS:
        return [digit_by_digit(digits), digit_by_digit(digits, "oh")]
    found = [cardinal(int(digits))]
    if len(digits) >= 3:
        found.append(digit_by_digit(digits))
    if len(digits) in (3, 4):
        high, low = int(digits[:-2]), int(digits[-2:])
        if low or digits[-3] != "0":  # 412, 407, 2024, 1900; not 2000 ("twenty hundred")
            found.append(f"{cardinal(high)} {_after_pair(low) if low else 'hundred'}")
        if len(digits) == 4 and low and digits[-3] != "0":  # 4271 as "forty two hundred seventy one"
            found.append(f"{cardinal(high)} hundred {cardinal(low)}")
    if len(digits) >= 3 and "0" in digits:
        found.append(digit_by_digit(digits, "oh"))
    return list(dict.fromkeys(found))


def _match_readings(match: re.Match[str]) -> list[str]:
    if match["hour"] is not None:
        hour, minute = int(match["hour"]), int(match["minute"])
        if minute == 0:
            return [f"{cardinal(hour)} o'clock", cardinal(hour)]
        return [f"{cardinal(hour)} {_after_pair(minute)}"]
    digits = match["int"].replace(",", "")
    if match["ord"] and len(digits) <= MAX_CARDINAL_DIGITS:
        found = [ordinal(int(digits))]
    elif match["ord"] or match["frac"] or match["pct"] or "," in match["int"]:
        found = readings(digits)[:1]  # a measure, not a code: said as a number
    else:
        found = readings(digits)
    tail = (f" point {digit_by_digit(match['frac'])}" if match["frac"] else "") + (" percent" if match["pct"] else "")
    return [words + tail for words in found]


def spoken_variants(text: str) -> list[str]:
    """``text`` with every number in words, once per reading: the n-th variant reads each
    number its n-th way (or its likeliest, if it has fewer). Text without digits: itself."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return [text]
    options = [_match_readings(m) for m in matches]
    variants = []
    for k in range(max(len(o) for o in options)):
        pieces, end = [], 0
        for match, option in zip(matches, options, strict=True):
            pieces += [text[end:match.start()], f" {option[k] if k < len(option) else option[0]} "]  # "A4": "A four"
            end = match.end()
        variants.append(" ".join("".join([*pieces, text[end:]]).split()))
    return variants
