"""Events data: a GENERATED corpus of city service reports, split by template.

No real labelled corpus of city reports ships in any package, so this module generates one,
deterministically: the same seed always yields the same reports, and the manifest records the
seed, the generator version and a SHA-256 of every generated row (`generator_sha256`) so a model
version names exactly the corpus it was trained on. Treat the corpus as a stand-in for real 311
traffic: it tests whether a model generalises to unseen phrasings, not how it fares on real
complaints.

The words the generator draws from (templates, cue phrases, slot values, openers, closers,
connectors and slang) live in the packaged data file `corpus_phrases.json`, beside this module.

How it is made hard:

- **Class mix** anchored to published NYC 311 complaint shares (`CLASS_SHARES`: noise is the
  largest, then illegal parking, heat/hot water, street condition, sanitation), plus the
  low-frequency emergencies the city must route fast (traffic accidents, power outages, fire
  hazards).
- **Templates**: 34 hand-written patterns per class (`TEMPLATES`), each with inline alternatives
  (``[a|b|c]``) and shared slots (``{addr}``, ``{time}``, ``{veh}``, ...). Many patterns carry words
  of another class (a hydrant in a parking complaint, a garbage truck in a noise complaint, a
  tree root in a sidewalk complaint), so single keywords do not decide the class.
- **Style**: shared openers and closers, slang (``pls``, ``u``, ``bc``), typos (swapped, dropped
  and doubled letters), lower/upper case, varied punctuation.
- **Two problems**: `TWO_PROBLEM_RATE` of reports mention a second problem of another class, in
  either order. The rule: **the more urgent class wins** (`URGENCY`, most urgent first: fire
  hazard, traffic accident, power outage, fallen tree, water/sewer, heat/hot water, street
  condition, sanitation, illegal parking, noise: life safety, then hazards to many people, then
  habitability, then nuisances).
- **Template-disjoint splits**: per class, `TEST_SHARE` (at least a quarter) of the templates are
  held out for `test` (the report subset ``template_disjoint``) and `VALID_SHARE` for `valid`
  (``holdout_templates``), so validation, too, measures unseen phrasings. A two-problem report
  draws both templates from its own split.

Priority rule (`priority_of`): a report is at least its classes' `BASE_PRIORITY` (fire hazard
emergency; traffic accident, power outage, fallen tree, water/sewer high; the rest normal); an
emergency cue (sparks, someone trapped or hurt, gas, smoke: `EMERGENCY_CUES`) makes it
`emergency`, a vulnerability or escalation cue (a newborn, an oxygen machine, days without heat:
`HIGH_CUES`) at least `high`. Cue phrasings are shared by all splits; the model must notice them.

A user's own corpus (CSV or Parquet) has the columns `text`, `label` (one of `LABELS`),
`priority` (one of `PRIORITIES`) and `template` (any id grouping reports that share wording, e.g.
the form or campaign they came from); it is split by template the same way.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import DataError
from domains.events.contract import BASE_PRIORITY, LABELS, PRIORITIES
from domains.tables import Kind, masked_in, read_user_file, validate_frame, write_splits

DOMAIN = "events"
URGENCY: tuple[str, ...] = (  # most urgent first: the winner when a report mentions two problems
    "fire_hazard", "traffic_accident", "power_outage", "fallen_tree", "water_sewer",
    "heat_hot_water", "street_condition", "sanitation", "illegal_parking", "noise",
)
# Shares of NYC 311 service requests among these ten kinds (noise of all sorts ~ a quarter,
# illegal parking and blocked driveways next, then heat/hot water ...), rounded; emergencies rare.
CLASS_SHARES: dict[str, float] = {
    "noise": 0.25, "illegal_parking": 0.19, "heat_hot_water": 0.14, "street_condition": 0.10,
    "sanitation": 0.10, "water_sewer": 0.07, "fallen_tree": 0.045, "traffic_accident": 0.04,
    "power_outage": 0.035, "fire_hazard": 0.03,
}

GENERATOR_VERSION = 1
DEFAULT_SEED = 311
SIZES: dict[str, dict[str, int]] = {
    "full": {"train": 6000, "valid": 900, "test": 2000},
    "smoke": {"train": 160, "valid": 60, "test": 80},
}
SPLITS = ("train", "valid", "test")
TEST_SHARE = 0.28  # of each class's templates, held out for `test`: at least a quarter of the phrasings
VALID_SHARE = 0.15  # of each class's templates, held out for `valid`
TWO_PROBLEM_RATE = 0.12
EMERGENCY_CUE_RATE = 0.15  # for classes with emergency cues
HIGH_CUE_RATE = 0.20  # for classes with high cues, when no emergency cue was added
OPENER_RATE, CLOSER_RATE = 0.5, 0.5
SLANG_RATE, TYPO_RATE = 0.2, 0.25
LOWER_RATE, UPPER_RATE = 0.35, 0.05

COLUMNS = ["text", "label", "priority", "template", "second_label", "second_template"]
USER_COLUMNS: dict[str, Kind] = {"text": "str", "label": "str", "priority": "str", "template": "str"}

# ---- the phrases (packaged data) -----------------------------------------------------------------
PHRASES_FILE = "corpus_phrases.json"


def load_phrases() -> dict[str, Any]:
    """The generator's packaged phrases: `templates`, `emergency_cues` and `high_cues` per class,
    `slots` (word lists per slot), `openers`, `closers`, `connectors` and `slang`."""
    text = importlib.resources.files(__package__ or "domains.events").joinpath(PHRASES_FILE).read_text("utf-8")
    phrases: dict[str, Any] = json.loads(text)
    return phrases


def _tuples(groups: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    return {name: tuple(values) for name, values in groups.items()}


_PHRASES = load_phrases()
TEMPLATES: dict[str, tuple[str, ...]] = _tuples(_PHRASES["templates"])
EMERGENCY_CUES: dict[str, tuple[str, ...]] = _tuples(_PHRASES["emergency_cues"])
HIGH_CUES: dict[str, tuple[str, ...]] = _tuples(_PHRASES["high_cues"])
_SLOT_WORDS = _tuples(_PHRASES["slots"])
_STREETS = _SLOT_WORDS["streets"]
_APTS = _SLOT_WORDS["apartments"]
_OPENERS = tuple(_PHRASES["openers"])
_CLOSERS = tuple(_PHRASES["closers"])
_CONNECTORS = tuple(_PHRASES["connectors"])
_SLANG = _tuples(_PHRASES["slang"])
_SLANG_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _SLANG), key=len, reverse=True)) + r")\b")
_ALT_RE = re.compile(r"\[([^\[\]]*)\]")
_SLOT_RE = re.compile(r"\{(\w+)\}")


def _address(rng: random.Random) -> str:
    street, other = rng.sample(_STREETS, 2)
    forms = (
        f"{rng.randint(1, 2999)} {street}", f"{street} near {other}", f"the corner of {street} and {other}",
        f"{rng.randint(1, 999)} {street} {rng.choice(_APTS[:6])}",  # unit-style suffixes only
    )
    return rng.choice(forms)


def _pick(words: tuple[str, ...]) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(words)


_SLOTS: dict[str, Callable[[random.Random], str]] = {
    "addr": _address,
    "street": _pick(_STREETS),
    "street2": _pick(_STREETS),
    "apt": _pick(_APTS),
    "time": _pick(_SLOT_WORDS["times"]),
    "dur": _pick(_SLOT_WORDS["durations"]),
    "veh": _pick(_SLOT_WORDS["vehicles"]),
    "place": _pick(_SLOT_WORDS["places"]),
}


def fill(pattern: str, rng: random.Random) -> str:
    """Expands a template: each ``[a|b]`` picks one alternative, then each ``{slot}`` a value."""
    chosen = _ALT_RE.sub(lambda m: rng.choice(m.group(1).split("|")), pattern)
    return _SLOT_RE.sub(lambda m: _SLOTS[m.group(1)](rng), chosen)


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:  # drop a letter
        return word[:i] + word[i + 1 :]
    return word[: i + 1] + word[i] + word[i + 1 :]  # double a letter


def stylise(text: str, rng: random.Random) -> str:
    """Applies the writing styles of real reports: slang, typos, case and punctuation."""
    if rng.random() < SLANG_RATE:
        text = _SLANG_RE.sub(lambda m: rng.choice(_SLANG[m.group(1).lower()]), text)
    if rng.random() < TYPO_RATE:
        words = text.split(" ")
        long_words = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
        for i in rng.sample(long_words, min(len(long_words), rng.randint(1, 2))):
            words[i] = _typo(words[i], rng)
        text = " ".join(words)
    case = rng.random()
    if case < LOWER_RATE:
        text = text.lower()
    elif case < LOWER_RATE + UPPER_RATE:
        text = text.upper()
    else:
        text = text[:1].upper() + text[1:]
    return text + rng.choice(("", "", ".", "!", "!!!", "??"))


def more_urgent(a: str, b: str) -> str:
    """The class that wins when a report mentions both (`URGENCY`)."""
    return a if URGENCY.index(a) <= URGENCY.index(b) else b


def priority_of(labels: Sequence[str], cue: str | None) -> str:
    """The priority rule: the highest of the mentioned classes' base priorities and the cue's level."""
    levels = [PRIORITIES.index(BASE_PRIORITY[lab]) for lab in labels]
    if cue is not None:
        levels.append(PRIORITIES.index(cue))
    return PRIORITIES[max(levels)]


def split_groups(groups: Mapping[str, Sequence[str]], seed: int) -> dict[tuple[str, str], str]:
    """Assigns each (label, template) group to a split: per label, a seeded shuffle of its sorted
    templates puts the first `TEST_SHARE` in `test`, the next `VALID_SHARE` in `valid`, the rest
    in `train` (each at least one when a label has three or more templates)."""
    out: dict[tuple[str, str], str] = {}
    for label in sorted(groups):
        names = sorted(set(groups[label]))
        random.Random(f"{seed}:{label}").shuffle(names)
        n_test = math.ceil(TEST_SHARE * len(names))
        n_valid = min(math.ceil(VALID_SHARE * len(names)), max(0, len(names) - n_test - 1))
        for i, name in enumerate(names):
            out[(label, name)] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return out


def template_id(label: str, index: int) -> str:
    return f"{label}/{index:02d}"


def generate_corpus(seed: int = DEFAULT_SEED, sizes: Mapping[str, int] | None = None) -> dict[str, pd.DataFrame]:
    """Generates the train/valid/test reports (columns `COLUMNS`); deterministic for a seed.

    Args:
        seed: the generator seed (recorded in the manifest).
        sizes: reports per split; `SIZES["full"]` by default.

    Returns:
        One frame per split of `SPLITS`.
    """
    sizes = dict(sizes or SIZES["full"])
    assignment = split_groups({lab: [template_id(lab, i) for i in range(len(TEMPLATES[lab]))] for lab in LABELS},
                              seed)
    pools = {split: {lab: [i for i in range(len(TEMPLATES[lab])) if assignment[(lab, template_id(lab, i))] == split]
                     for lab in LABELS} for split in SPLITS}
    labels, weights = list(CLASS_SHARES), list(CLASS_SHARES.values())
    frames: dict[str, pd.DataFrame] = {}
    for split in SPLITS:
        rng = random.Random(f"{seed}:{split}")
        rows = []
        for _ in range(sizes[split]):
            label = rng.choices(labels, weights)[0]
            index = rng.choice(pools[split][label])
            body = fill(TEMPLATES[label][index], rng)
            cue = None
            if label in EMERGENCY_CUES and rng.random() < EMERGENCY_CUE_RATE:
                body, cue = f"{body}{rng.choice((', ', '. ', ' - '))}{rng.choice(EMERGENCY_CUES[label])}", "emergency"
            elif label in HIGH_CUES and rng.random() < HIGH_CUE_RATE:
                body, cue = f"{body}{rng.choice((', ', '. ', ' - '))}{rng.choice(HIGH_CUES[label])}", "high"
            second_label, second_template = "", ""
            mentioned = [label]
            if rng.random() < TWO_PROBLEM_RATE:
                others = [lab for lab in labels if lab != label]
                second_label = rng.choices(others, [CLASS_SHARES[lab] for lab in others])[0]
                second_index = rng.choice(pools[split][second_label])
                second_template = template_id(second_label, second_index)
                other_body = fill(TEMPLATES[second_label][second_index], rng)
                first, then = (body, other_body) if rng.random() < 0.5 else (other_body, body)
                body = f"{first}{rng.choice(_CONNECTORS)}{then}"
                mentioned.append(second_label)
            if rng.random() < OPENER_RATE:
                body = rng.choice(_OPENERS) + body
            if rng.random() < CLOSER_RATE:
                body = body.rstrip(".!?") + fill(rng.choice(_CLOSERS), rng)
            rows.append({
                "text": stylise(body, rng),
                "label": more_urgent(label, second_label) if second_label else label,
                "priority": priority_of(mentioned, cue),
                "template": template_id(label, index),
                "second_label": second_label,
                "second_template": second_template,
            })
        frames[split] = pd.DataFrame(rows, columns=COLUMNS)
    return frames


def corpus_sha256(frames: Mapping[str, pd.DataFrame]) -> str:
    """A checksum of the generated rows themselves (independent of the Parquet encoding)."""
    h = hashlib.sha256()
    for split in sorted(frames):
        for row in frames[split].to_dict("records"):
            h.update(json.dumps([split, row], sort_keys=True).encode())
    return h.hexdigest()


def read_user_corpus(path: Path, seed: int = DEFAULT_SEED) -> dict[str, pd.DataFrame]:
    """Reads and validates a user's labelled reports, then splits them by template.

    Raises:
        DataError: the file is unreadable or empty, lacks a column, has a blank text, an unknown
            label or priority (naming the first bad row), or too few templates to split.
    """
    frame = validate_frame(read_user_file(path), str(path), USER_COLUMNS)
    blank = frame["text"].str.strip().eq("")
    if blank.any():
        raise DataError(str(path), "blank text", column="text", row=int(blank.to_numpy().argmax()))
    for column, allowed in (("label", LABELS), ("priority", PRIORITIES)):
        bad = ~frame[column].isin(allowed)
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise DataError(str(path), f"{frame[column].iloc[row]!r} is not one of {list(allowed)}",
                            column=column, row=row)
    frame["text"] = frame["text"].astype(str)
    assignment = split_groups(frame.groupby("label")["template"].apply(list).to_dict(), seed)
    split_of = [assignment[(lab, tpl)] for lab, tpl in zip(frame["label"], frame["template"], strict=True)]
    frame["second_label"], frame["second_template"] = "", ""
    frame["split"] = split_of
    frames = {s: frame[frame["split"] == s].drop(columns="split").reset_index(drop=True) for s in SPLITS}
    empty = [s for s, f in frames.items() if f.empty]
    if empty:
        raise DataError(str(path), f"too few templates to split by template: no rows for {empty}; "
                        "give each label at least three templates", column="template")
    return frames


def prepare(data_dir: Path, *, source: Path | None = None, smoke: bool = False,
            seed: int = DEFAULT_SEED, mask: bool = True) -> dict[str, Any]:
    """Writes `data_dir/events/{train,valid,test}.parquet` and the manifest (atomically).

    Args:
        data_dir: the data root.
        source: a user's own corpus (see the module docstring) instead of the generated one.
        smoke: the tiny generated corpus (`SIZES["smoke"]`) for tests and `--smoke-test`.
        seed: the generator and split seed.
        mask: mask personal data in a user's texts (`core.pii`) before they are written.

    Returns:
        The manifest.
    """
    if source is not None:
        frames = read_user_corpus(Path(source), seed)
        sources = [str(source)]
        extra: dict[str, Any] = {"split_seed": seed, "masked": masked_in(frames.values()) if mask else None}
    else:
        sizes = SIZES["smoke" if smoke else "full"]
        frames = generate_corpus(seed, sizes)
        sources = [f"generated:cityserve-events-v{GENERATOR_VERSION}"]
        extra = {
            "generator": {
                "version": GENERATOR_VERSION,
                "seed": seed,
                "sizes": sizes,
                "generator_sha256": corpus_sha256(frames),
                "templates": {s: int(f["template"].nunique()) for s, f in frames.items()},
                "class_shares": CLASS_SHARES,
                "urgency": list(URGENCY),
                "two_problem_rate": TWO_PROBLEM_RATE,
            },
        }
    extra["subsets"] = {"valid": "holdout_templates", "test": "template_disjoint"}
    return write_splits(data_dir, DOMAIN, frames, sources=sources, extra=extra)
