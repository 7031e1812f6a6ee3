"""Text normalisation and word error rate (WER) for spoken questions.

A recogniser writes "Super Bowl 50." where the reference says "Super Bowl 50?" and a
sphinx grammar needs "super bowl fifty"; WER is only meaningful once both sides are put in
one canonical form. :func:`normalize_text` does that, in this order:

1. Unicode compatibility form, accents folded to ASCII ("Beyoncé" -> "beyonce"), lowercase.
2. Dotted acronyms joined ("U.S." -> "us"); thousands separators dropped ("1,000" -> "1000").
3. Numbers written as words, the way they are said: "50" -> "fifty", "3.5" -> "three point
   five", "21st" -> "twenty first", "1990s" and "1990's" -> "nineteen nineties", "%" ->
   "percent". Four-digit numbers from 1100 to 2099 (outside 2000-2009) are read as years:
   "1990" -> "nineteen ninety", "1905" -> "nineteen oh five", "2015" -> "twenty fifteen".
   "and" is never inserted ("one hundred fifty"); :func:`spoken_variants` lists the other
   readings a speaker may use.
   Words, not digits, because a grammar decoder (pocketsphinx) only knows words, and a digit
   string can be turned into words unambiguously while the reverse cannot.
4. Punctuation removed (hyphens and slashes become spaces; apostrophes inside words are kept:
   "what's", "o'neil"), whitespace collapsed.

WER is corpus-level: total substitutions + deletions + insertions over total reference
words, computed by jiwer on the normalised words. :func:`word_edit_distance` is a small
independent Levenshtein implementation the tests check jiwer against.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import jiwer

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}
_MAX_CARDINAL = 10**15  # longer digit strings are read digit by digit

_NUMBER_RE = re.compile(r"(?<![\w.])(\d+)(?:\.(\d+))?(st|nd|rd|th|'?s)?(?!\w)")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_ACRONYM_RE = re.compile(r"\b(?:[a-z]\.){2,}")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "`": "'"})


def int_to_words(n: int, *, use_and: bool = False) -> str:
    """Cardinal number in words: 1205 -> "one thousand two hundred five" ("one thousand two
    hundred and five" with `use_and`, the British reading espeak-ng also uses)."""
    if n < 0:
        return "minus " + int_to_words(-n, use_and=use_and)
    if n >= _MAX_CARDINAL:
        return " ".join(_ONES[int(d)] for d in str(n))
    if n < 1000:
        return _below_thousand(n, use_and)
    words = []
    for scale, name in _SCALES:
        if n >= scale:
            words.append(f"{_below_thousand(n // scale, use_and)} {name}")
            n %= scale
    if n:
        words.append(("and " if use_and and n < 100 else "") + _below_thousand(n, use_and))
    return " ".join(words)


def _below_thousand(n: int, use_and: bool = False) -> str:
    hundreds, rest = divmod(n, 100)
    words = [f"{_ONES[hundreds]} hundred"] if hundreds else []
    if hundreds and rest and use_and:
        words.append("and")
    if rest or not hundreds:
        if rest < 20:
            words.append(_ONES[rest])
        else:
            tens, ones = divmod(rest, 10)
            words.append(_TENS[tens] + (f" {_ONES[ones]}" if ones else ""))
    return " ".join(words)


YEAR_STYLES = ("spoken", "hundred", "cardinal")


def year_to_words(n: int, style: str = "spoken", *, use_and: bool = False) -> str:
    """A four-digit year in words. "spoken" (the canonical form): 1990 -> "nineteen ninety",
    1905 -> "nineteen oh five", 1900 -> "nineteen hundred", 2005 -> "two thousand five";
    "hundred": 1990 -> "nineteen hundred ninety"; "cardinal": "one thousand nine hundred ninety"."""
    if style not in YEAR_STYLES:
        raise ValueError(f"unknown year style {style!r}; choose one of {YEAR_STYLES}")
    if style == "cardinal" or not 1100 <= n <= 2099 or 2000 <= n <= 2009:
        return int_to_words(n, use_and=use_and)
    high, low = divmod(n, 100)
    if low == 0:
        return f"{int_to_words(high)} hundred"
    if style == "hundred":
        return f"{int_to_words(high)} hundred {'and ' if use_and else ''}{int_to_words(low)}"
    if low < 10:
        return f"{int_to_words(high)} oh {_ONES[low]}"
    return f"{int_to_words(high)} {int_to_words(low)}"


def _ordinal(words: str) -> str:
    head, _, last = words.rpartition(" ")
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return f"{head} {last}" if head else last


def _plural(words: str) -> str:
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _number_to_words(match: re.Match, years: str, use_and: bool) -> str:
    digits, decimals, suffix = match.groups()
    suffix = "s" if suffix == "'s" else suffix  # "the 1700's" = "the 1700s"
    value = int(digits)
    if decimals is not None:
        spoken = int_to_words(value, use_and=use_and) + " point " + " ".join(_ONES[int(d)] for d in decimals)
    elif len(digits) == 4 and suffix in (None, "s"):
        spoken = year_to_words(value, years, use_and=use_and)
    else:
        spoken = int_to_words(value, use_and=use_and)
    if suffix == "s":
        spoken = _plural(spoken)
    elif suffix:
        spoken = _ordinal(spoken)
    return f" {spoken} "


def normalize_text(text: str, *, years: str = "spoken", use_and: bool = False) -> str:
    """Canonical lowercase words for WER and grammars (see the module docstring for the rules).
    `years` and `use_and` pick other readings of numbers (for :func:`spoken_variants`)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower().translate(_QUOTES)
    text = _ACRONYM_RE.sub(lambda m: m.group(0).replace(".", "") + " ", text)
    text = _THOUSANDS_RE.sub("", text)
    text = text.replace("%", " percent ")
    text = _NUMBER_RE.sub(lambda m: _number_to_words(m, years, use_and), text)
    text = re.sub(
        r"\d+", lambda m: f" {int_to_words(int(m.group()))} ", text
    )  # digits glued to letters: "mp3"
    text = re.sub(r"[^\w\s']|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)  # quotes and possessive plurals, not "what's"
    return " ".join(text.split())


def spoken_variants(text: str) -> list[str]:
    """The ways `text` may be read aloud, canonical form first: numbers with and without "and"
    after hundred/thousand, years as "nineteen ninety", "nineteen hundred ninety" or cardinals.
    One entry when the text has no number above 99."""
    variants = [normalize_text(text, years=y, use_and=a) for y in YEAR_STYLES for a in (False, True)]
    return list(dict.fromkeys(variants))


def normalized_words(text: str) -> list[str]:
    return normalize_text(text).split()


@dataclass(frozen=True)
class WerCounts:
    """Edit counts of one or more hypothesis/reference pairs (after normalisation)."""

    substitutions: int
    deletions: int
    insertions: int
    hits: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def reference_words(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def wer(self) -> float:
        return self.errors / self.reference_words if self.reference_words else float("nan")

    def __add__(self, other: WerCounts) -> WerCounts:
        return WerCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.hits + other.hits,
        )


def wer_counts(
    references: str | Sequence[str], hypotheses: str | Sequence[str], *, normalize: bool = True
) -> WerCounts:
    """Substitutions, deletions, insertions and hits over all pairs, computed by jiwer.

    An empty reference (after normalisation) is an error: its WER is undefined and a corpus
    WER would silently count its hypothesis words as insertions against nothing.
    """
    refs = [references] if isinstance(references, str) else list(references)
    hyps = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no reference/hypothesis pairs to score")
    if normalize:
        refs = [normalize_text(r) for r in refs]
        hyps = [normalize_text(h) for h in hyps]
    else:
        refs = [" ".join(r.split()) for r in refs]
        hyps = [" ".join(h.split()) for h in hyps]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"reference(s) {empty[:5]} have no words (after normalisation); WER is undefined")
    out = jiwer.process_words(refs, hyps)
    return WerCounts(out.substitutions, out.deletions, out.insertions, out.hits)


def word_error_rate(
    references: str | Sequence[str], hypotheses: str | Sequence[str], *, normalize: bool = True
) -> float:
    """Corpus WER: all edits over all reference words (not a mean of per-sentence WERs)."""
    return wer_counts(references, hypotheses, normalize=normalize).wer


def word_edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (unit costs), independent of jiwer."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]
