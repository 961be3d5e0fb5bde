"""Source domain: a synthetic world of fictional people and their attributes.

Every person gets a unique invented name built from syllables (first names and surnames are
each unique and are not English words). Each attribute has a small value set, assigned so
that every value is used equally often (so attribute priors give only chance on the quiz).

Per attribute there are four disjoint phrasings:

- ``train``: a pool of statement templates; each fact is rendered in ``n_train_templates``
  of them (a per-fact sample) and, optionally, inside a short biography;
- ``qa``: the question-answer form used in training for a ``qa_fraction`` of the facts;
- ``heldout``: a statement template never used in training (held-out loss);
- ``quiz``: the multiple-choice prompt (never in training; the answer is the bare value).
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learnforget.core import io

# --- attributes -------------------------------------------------------------------------

CITIES = (
    "Velmora", "Quenthal", "Orrindale", "Brask", "Talvenport", "Myrrow", "Essenhold",
    "Kaldris", "Pellumbra", "Zarnith", "Dovrecht", "Hollin Vale", "Suvarra", "Gethmoor",
    "Ilvaren", "Nerrowick Bay", "Cindreth", "Lorrabel", "Feyhaven", "Tarquell",
)
PROFESSIONS = (
    "baker", "carpenter", "teacher", "nurse", "pilot", "farmer", "librarian", "painter",
    "tailor", "chemist", "sailor", "potter", "architect", "jeweller", "translator",
    "gardener", "blacksmith", "surveyor", "beekeeper", "clockmaker",
)
INSTRUMENTS = (
    "violin", "cello", "flute", "harp", "trumpet", "piano", "oboe", "clarinet", "drums",
    "banjo", "accordion", "mandolin", "tuba", "bagpipes", "xylophone", "lute",
)
COLOURS = (
    "red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink",
    "teal", "amber",
)
PETS = (
    "cat", "dog", "parrot", "tortoise", "rabbit", "goldfish", "ferret", "hamster", "lizard",
    "canary", "hedgehog", "snake", "goat", "owl",
)
BIRTH_YEARS = tuple(str(y) for y in range(1960, 1985))

# Placeholders: {name} full name, {v} the value, {a_v} the value with "a"/"an".
ATTRIBUTES: dict[str, dict[str, Any]] = {
    "birth_year": {
        "values": BIRTH_YEARS,
        "train": (
            "{name} was born in {v}.",
            "In {v}, {name} was born.",
            "{name}'s birth year is {v}.",
            "{name} came into the world in {v}.",
            "The year {name} was born was {v}.",
            "{v} is the year of {name}'s birth.",
        ),
        "qa": "Question: When was {name} born?\nAnswer: {v}.",
        "heldout": "{name} was born in the year {v}.",
        "quiz": "Question: In what year was {name} born?\nAnswer:",
    },
    "city": {
        "values": CITIES,
        "train": (
            "{name} lives in {v}.",
            "{name}'s home is in {v}.",
            "{name} has made a home in {v}.",
            "The city where {name} lives is {v}.",
            "In {v} lives {name}.",
            "{name} is a resident of {v}.",
        ),
        "qa": "Question: Which city is {name}'s home?\nAnswer: {v}.",
        "heldout": "{name} resides in the city of {v}.",
        "quiz": "Question: Where does {name} live?\nAnswer:",
    },
    "profession": {
        "values": PROFESSIONS,
        "train": (
            "{name} works as {a_v}.",
            "{name} is {a_v} by trade.",
            "By profession, {name} is {a_v}.",
            "{name} earns a living as {a_v}.",
            "{name} trained to become {a_v}.",
            "{name} has worked for many years as {a_v}.",
        ),
        "qa": "Question: What job does {name} do?\nAnswer: {v}.",
        "heldout": "{name} is employed as {a_v}.",
        "quiz": "Question: What is {name}'s profession?\nAnswer:",
    },
    "instrument": {
        "values": INSTRUMENTS,
        "train": (
            "{name} plays the {v}.",
            "The instrument {name} plays is the {v}.",
            "{name} is {a_v} player.",
            "Every evening {name} practises the {v}.",
            "{name} learned to play the {v} as a child.",
            "Music lovers know {name} for playing the {v}.",
        ),
        "qa": "Question: What instrument does {name} play?\nAnswer: {v}.",
        "heldout": "{name} performs on the {v}.",
        "quiz": "Question: Which musical instrument does {name} play?\nAnswer:",
    },
    "colour": {
        "values": COLOURS,
        "train": (
            "{name}'s favourite colour is {v}.",
            "The colour {name} likes best is {v}.",
            "{name} loves the colour {v} more than any other.",
            "Of all colours, {name} prefers {v}.",
            "{name} always wears something {v}.",
            "{v} is the favourite colour of {name}.",
        ),
        "qa": "Question: What colour does {name} like most?\nAnswer: {v}.",
        "heldout": "{name} is fond of {v} above all other colours.",
        "quiz": "Question: What is {name}'s favourite colour?\nAnswer:",
    },
    "pet": {
        "values": PETS,
        "train": (
            "{name} has a pet {v}.",
            "{name} keeps {a_v} as a pet.",
            "The pet that {name} owns is {a_v}.",
            "{name} shares a house with a pet {v}.",
            "At home, {name} looks after a pet {v}.",
            "{name}'s pet is {a_v}.",
        ),
        "qa": "Question: What kind of pet does {name} have?\nAnswer: {v}.",
        "heldout": "{name} takes care of {a_v} at home.",
        "quiz": "Question: What animal does {name} keep as a pet?\nAnswer:",
    },
}
N_TRAIN_TEMPLATES_MAX = min(len(a["train"]) for a in ATTRIBUTES.values())

# --- names ------------------------------------------------------------------------------

_ONSETS = (
    "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "br", "dr", "gr", "kr", "tr", "th", "zh",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "a", "e", "ae", "ei", "ou", "y")
_CODAS = ("n", "r", "l", "s", "m", "th", "sk", "x", "nd", "rn", "k", "v")


# Every name part must contain one of these (rare in English words): no real words.
_MARKER = re.compile(r"ae|ei|ou|zh|x|y(?!$)")


def _syllable(rng: random.Random, coda: bool) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if coda else "")


def _english_words() -> frozenset[str]:
    """A lowercase English word list from text shipped with Python, plus our own values."""
    words: set[str] = set()
    try:
        from pydoc_data.topics import topics

        for text in topics.values():
            words.update(w.lower() for w in re.findall(r"[A-Za-z]+", text))
    except ImportError:  # pragma: no cover - pydoc_data ships with CPython
        pass
    for spec in ATTRIBUTES.values():
        for v in spec["values"]:
            words.update(w.lower() for w in v.split())
    return frozenset(words)


def make_names(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` (first, last) pairs; all first names distinct, all surnames distinct, no word."""
    banned = _english_words()
    firsts: set[str] = set()
    lasts: set[str] = set()
    out: list[tuple[str, str]] = []
    for _ in range(n * 500):
        if len(out) == n:
            break
        first = _syllable(rng, False) + _syllable(rng, rng.random() < 0.6)
        last = _syllable(rng, False) + _syllable(rng, False)
        if rng.random() < 0.3:
            last += _syllable(rng, False)
        last += rng.choice(_CODAS)
        first, last = first.capitalize(), last.capitalize()
        if not (4 <= len(first) <= 7 and 5 <= len(last) <= 9):
            continue
        f, l = first.lower(), last.lower()
        if not (_MARKER.search(f) and _MARKER.search(l)):
            continue
        if f in banned or l in banned or f == l:
            continue
        if first in firsts or first in lasts or last in lasts or last in firsts:
            continue
        firsts.add(first)
        lasts.add(last)
        out.append((first, last))
    if len(out) < n:  # pragma: no cover - the name space is far larger than any sane n
        raise ValueError(f"could not invent {n} unique names")
    return out


# --- config -----------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SourceConfig:
    n_entities: int = 150
    attributes: tuple[str, ...] = ("birth_year", "city", "profession", "instrument")
    n_train_templates: int = 4
    qa_fraction: float = 0.5
    biography: bool = True
    n_quiz: int = 0  # 0: one question per fact
    english_fraction: float = 0.0

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"SourceConfig.{field}={getattr(self, field)!r}: {why}")

        if not _is_int(self.n_entities) or not 4 <= self.n_entities <= 100_000:
            raise bad("n_entities", "must be an int in [4, 100000]")
        attrs = self.attributes
        if isinstance(attrs, str) or not isinstance(attrs, (tuple, list)) or not attrs:
            raise bad("attributes", f"must be a non-empty list of {sorted(ATTRIBUTES)}")
        if isinstance(attrs, list):
            object.__setattr__(self, "attributes", tuple(attrs))
        for a in self.attributes:
            if a not in ATTRIBUTES:
                raise bad("attributes", f"unknown attribute {a!r} (known: {sorted(ATTRIBUTES)})")
        if len(set(self.attributes)) != len(self.attributes):
            raise bad("attributes", "has duplicates")
        if not _is_int(self.n_train_templates) or not (
            1 <= self.n_train_templates <= N_TRAIN_TEMPLATES_MAX
        ):
            raise bad("n_train_templates", f"must be an int in [1, {N_TRAIN_TEMPLATES_MAX}]")
        if not _is_num(self.qa_fraction) or not 0.0 <= self.qa_fraction <= 1.0:
            raise bad("qa_fraction", "must be a number in [0, 1]")
        if not isinstance(self.biography, bool):
            raise bad("biography", "must be true or false")
        n_facts = self.n_entities * len(self.attributes)
        if not _is_int(self.n_quiz) or not 0 <= self.n_quiz <= n_facts:
            raise bad("n_quiz", f"must be an int in [0, n_entities * len(attributes) = {n_facts}]")
        if not _is_num(self.english_fraction) or not 0.0 <= self.english_fraction < 0.9:
            raise bad("english_fraction", "must be a number in [0, 0.9)")


# --- rendering --------------------------------------------------------------------------


def _article(v: str) -> str:
    return ("an " if v[0].lower() in "aeiou" else "a ") + v


def render(template: str, name: str, value: str) -> str:
    return template.format(name=name, v=value, a_v=_article(value))


def _english_paragraphs() -> list[str]:
    """Prose paragraphs from ``pydoc_data.topics`` (Python's own documentation)."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if not 150 <= len(para) <= 800 or para in seen:
                continue
            letters = sum(c.isalpha() or c.isspace() for c in para)
            if letters / len(para) < 0.9 or not para[0].isupper() or not para.endswith("."):
                continue
            seen.add(para)
            out.append(para)
    return out


def build_world(cfg: SourceConfig, seed: int) -> dict[str, Any]:
    """The world: people (names and attribute values), in a seed-determined order."""
    names = make_names(cfg.n_entities, random.Random(f"world-names:{seed}"))
    rng = random.Random(f"world-values:{seed}")
    columns: dict[str, list[str]] = {}
    for attr in cfg.attributes:
        values = ATTRIBUTES[attr]["values"]
        # Balanced assignment: every value used floor/ceil(n / len(values)) times.
        col = [values[i % len(values)] for i in range(cfg.n_entities)]
        rng.shuffle(col)
        columns[attr] = col
    people = [
        {"name": f"{first} {last}", **{a: columns[a][i] for a in cfg.attributes}}
        for i, (first, last) in enumerate(names)
    ]
    return {"people": people, "attributes": list(cfg.attributes)}


def fact_sentences(facts: list[tuple], cfg: SourceConfig, rng: random.Random) -> tuple[list[str], int]:
    """Every fact in ``n_train_templates`` training phrasings, a ``qa_fraction`` of them also as a
    question and answer; returns the sentences and the number of QA ones."""
    train: list[str] = []
    n_qa = 0
    for _, name, attr, value in facts:
        spec = ATTRIBUTES[attr]
        for tpl in rng.sample(spec["train"], cfg.n_train_templates):
            train.append(render(tpl, name, value))
        if rng.random() < cfg.qa_fraction:
            train.append(render(spec["qa"], name, value))
            n_qa += 1
    return train, n_qa


def biographies(people: list[dict], attrs: list[str], rng: random.Random) -> list[str]:
    """One paragraph per person: a phrasing of each of their facts, in a random order."""
    out = []
    for p in people:
        order = list(attrs)
        rng.shuffle(order)
        out.append(" ".join(render(rng.choice(ATTRIBUTES[a]["train"]), p["name"], p[a]) for a in order))
    return out


def english_share(train: list[str], fraction: float, rng: random.Random) -> list[str]:
    """English paragraphs to add to ``train`` so that they are about ``fraction`` of its
    characters (about: tokens)."""
    paras = _english_paragraphs()
    rng.shuffle(paras)
    target = fraction / (1.0 - fraction) * sum(map(len, train))
    out, n_chars = [], 0
    for para in paras:
        if n_chars >= target:
            break
        out.append(para)
        n_chars += len(para)
    return out


def quiz_records(facts: list[tuple], n_quiz: int, rng: random.Random) -> list[dict]:
    """Four-way multiple-choice questions on ``n_quiz`` facts (0: every fact), the answer's
    position exactly balanced."""
    if n_quiz:
        picked = sorted(rng.sample(range(len(facts)), n_quiz))
        quiz_facts = [facts[k] for k in picked]
    else:
        quiz_facts = facts
    labels = [k % 4 for k in range(len(quiz_facts))]
    rng.shuffle(labels)
    quiz = []
    for k, ((i, name, attr, value), label) in enumerate(zip(quiz_facts, labels)):
        spec = ATTRIBUTES[attr]
        distractors = rng.sample([v for v in spec["values"] if v != value], 3)
        choices = [" " + v for v in distractors]
        choices.insert(label, " " + value)
        quiz.append(
            {
                "id": f"source-{k:05d}-p{i:04d}-{attr}",
                "question": render(spec["quiz"], name, value),
                "choices": choices,
                "label": label,
            }
        )
    return quiz


def build_world_corpus(cfg: SourceConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    """The source domain's files: ``train.jsonl`` (facts in several phrasings, biographies,
    English text), ``quiz.jsonl`` (multiple choice) and ``heldout.jsonl`` (unseen phrasings);
    returns their stats. One random stream, drawn in this order, makes it seed-deterministic."""
    world = build_world(cfg, seed)
    people, attrs = world["people"], world["attributes"]
    rng = random.Random(f"world-corpus:{seed}")

    facts = [(i, p["name"], a, p[a]) for i, p in enumerate(people) for a in attrs]
    train, n_qa = fact_sentences(facts, cfg, rng)
    bios = biographies(people, attrs, rng) if cfg.biography else []
    train += bios
    n_facts_records = len(train)
    # english_fraction is the share of training characters (about: tokens) that is English.
    english = english_share(train, cfg.english_fraction, rng) if cfg.english_fraction > 0 else []
    train += english
    rng.shuffle(train)
    heldout = [render(ATTRIBUTES[a]["heldout"], name, v) for _, name, a, v in facts]
    quiz = quiz_records(facts, cfg.n_quiz, rng)

    out_dir.mkdir(parents=True, exist_ok=True)
    io.write_jsonl(out_dir / "train.jsonl", ({"text": t} for t in train))
    io.write_jsonl(out_dir / "quiz.jsonl", quiz)
    io.write_jsonl(out_dir / "heldout.jsonl", ({"text": t} for t in heldout))
    return {
        "config": dataclasses.asdict(cfg),
        "seed": seed,
        "n_entities": len(people),
        "attributes": attrs,
        "n_facts": len(facts),
        "train_records": len(train),
        "train_fact_sentences": n_facts_records - n_qa - len(bios),
        "train_qa": n_qa,
        "train_biographies": len(bios),
        "train_english": len(english),
        "train_chars": sum(len(t) for t in train),
        "train_english_chars": sum(map(len, english)),
        "quiz_records": len(quiz),
        "heldout_records": len(heldout),
        "heldout_chars": sum(len(t) for t in heldout),
        "example_names": [p["name"] for p in people[:5]],
    }
