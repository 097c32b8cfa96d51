"""The language of a request's text, so that a text model is never asked to read a language it was
not trained on: both text models fine-tune an English encoder on English data, and a report in
Chinese or Spanish would otherwise get a confident answer that means nothing.

Two rules, in order:
- script: when at least `FOREIGN_SCRIPT_SHARE` of a text's letters are not Latin (Han, kana,
  Hangul, Cyrillic, Arabic, ...), the text is in that script's language, however short it is
  ("停电" is two characters and unmistakable);
- Latin letters: the `py3langid` identifier (BSD-3, its model ships in the package) gives each
  language a probability; a text of at least `MIN_LETTERS` letters whose English probability is
  under `ENGLISH_FLOOR` is in its most probable language.

A shorter Latin text ("no power", "ok") is not judged: the identifier cannot tell on so little
(it calls "no power" Polish), and refusing a resident's terse report would be worse than reading
it. The thresholds, and what they refuse of the English evaluation sets and the hand-written
reports in other languages (`other_languages.jsonl`), are in docs/models.md.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import Any

SERVED = ("en",)  # the languages the text models read
CODE = "unsupported_language"  # the error code a refused text's 422 carries
MIN_LETTERS = 12
ENGLISH_FLOOR = 0.005
FOREIGN_SCRIPT_SHARE = 0.3
# The scripts whose language needs no identifier (unicodedata's first word of a letter's name).
SCRIPT_LANGUAGE = {"HIRAGANA": "ja", "KATAKANA": "ja", "HANGUL": "ko", "CJK": "zh"}


@functools.cache
def identifier() -> Any:
    """py3langid's identifier with probabilities (loads its 28 MB model once, ~0.8 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def script(char: str) -> str:
    """The script of a letter as its Unicode name begins: LATIN, CJK, HANGUL, CYRILLIC, ..."""
    return unicodedata.name(char, "UNKNOWN").split(" ", 1)[0]


def language_of(text: str) -> str | None:
    """The language `text` is surely in (an ISO 639 code), or None when there is too little Latin
    text to tell."""
    letters = [c for c in text if c.isalpha()]
    foreign = [name for c in letters if not c.isascii() and (name := script(c)) != "LATIN"]
    if letters and len(foreign) >= FOREIGN_SCRIPT_SHARE * len(letters):
        # kana marks Japanese even among kanji; else the script names the language or the identifier does
        for name in ("HIRAGANA", "KATAKANA", "HANGUL", "CJK"):
            if name in foreign:
                return SCRIPT_LANGUAGE[name]
        return str(identifier().classify(text)[0])
    if len(letters) < MIN_LETTERS:
        return None
    top, _ = identifier().classify(text)
    if top == "en":  # most texts, and the cheaper call (English then has the highest probability)
        return "en"
    ranked = identifier().rank(text)
    return "en" if dict(ranked)["en"] >= ENGLISH_FLOOR else str(ranked[0][0])


def unsupported(text: str) -> str | None:
    """The language of `text` when no model here reads it, else None."""
    language = language_of(text)
    return language if language is not None and language not in SERVED else None
