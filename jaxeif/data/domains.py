"""Synthetic fact domains for the language-model logic study (the paper's figures 2 to 6).

Each domain is a list of sentence templates over made-up entity names ({A}, {B}, ...) and a
list of logic probes. `draw(name, seed)` fills the templates with fresh seeded names:

    samples = draw("chain_induces", seed=0)   # list[Sample]: .text, .template, .label
    probes = DOMAINS["chain_induces"].probe_rows   # ProbeRows(train, implied, not_implied, why)

A multi-line sample is ONE sample: its lines are joined with "\\n" and trained on together.
A probe says: after learning the sample of template `train`, that of `implied` should become more
likely than that of `not_implied` (in loss terms: EIF[train, implied] < EIF[train, not_implied]).
Probes name templates by label, so inserting a template never shifts them.
"""

from __future__ import annotations

import dataclasses
import string
from typing import NamedTuple

import numpy as np

# Syllables are onset + nucleus + optional coda; a coda is followed by a single-consonant onset so
# names stay pronounceable ("klarbu", "pimjon", "skimoy").
ONSETS_SINGLE = ("b", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z")
ONSETS_CLUSTER = ("bl", "br", "dr", "fl", "fr", "gl", "gr", "kl", "kr", "pl", "pr", "sk", "sl", "sn", "sp", "st", "tr")
NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "oo", "ee", "oy", "ai")
CODAS = ("", "", "", "n", "r", "m", "l", "k", "s")
SYLLABLE_COUNTS = (2, 3, 4, 5)
SYLLABLE_WEIGHTS = (0.45, 0.3, 0.15, 0.1)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training/eval sample of a logic domain.

    Attributes:
        text: the filled text (a multi-line sample is one sample; `lines` splits it).
        template: the template it was filled from.
        label: the template's label, which the domain's probes name.
    """

    text: str
    template: str
    label: str

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(self.text.split("\n"))


class Probe(NamedTuple):
    """A logic probe: after training on template `train`'s sample, `implied` should gain more likelihood than
    `not_implied`.

    Attributes:
        train: the trained template's label.
        implied: the label of the statement the training implies.
        not_implied: the label of the statement it does not imply (e.g. the reversal).
        why: the probe in words.
    """

    train: str
    implied: str
    not_implied: str
    why: str


class ProbeRows(NamedTuple):
    """A probe as positions of its templates: the rows and columns of the domain's EIF matrices.

    Attributes:
        train: row of the trained sample.
        implied: column of the implied statement.
        not_implied: column of the not-implied statement.
        why: the probe in words.
    """

    train: int
    implied: int
    not_implied: int
    why: str


@dataclasses.dataclass(frozen=True)
class Domain:
    """A logic domain: templates (text, label) over entity slots, and the probes between them.

    Labels are checked when the domain is made.

    Attributes:
        name: the domain's name.
        templates: (text with {slot} fields, label) pairs, in the order of the EIF's rows.
        probes: the logic probes, naming templates by label.

    Raises:
        ValueError: a template label repeats, or a probe names an unknown label.
    """

    name: str
    templates: tuple[tuple[str, str], ...]
    probes: tuple[Probe, ...]

    def __post_init__(self):
        labels = self.labels
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"domain {self.name!r}: template labels {repeated} repeat; give each template its own label"
            )
        for probe in self.probes:
            unknown = [label for label in probe[:3] if label not in labels]
            if unknown:
                raise ValueError(
                    f"domain {self.name!r}: probe {probe.why!r} names unknown template labels {unknown}; "
                    f"valid labels: {list(labels)}"
                )

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for _, label in self.templates)

    @property
    def probe_rows(self) -> tuple[ProbeRows, ...]:
        """The probes as template positions (rows/columns of the EIF of `fill`'s samples)."""
        at = self.labels.index
        return tuple(ProbeRows(at(p.train), at(p.implied), at(p.not_implied), p.why) for p in self.probes)

    @property
    def slots(self) -> tuple[str, ...]:
        names = {f for text, _ in self.templates for _, f, _, _ in string.Formatter().parse(text) if f}
        return tuple(sorted(names))

    def fill(self, names: dict[str, str]) -> list[Sample]:
        """Samples with slots replaced by `names` (capitalised, as proper nouns); lines start upper-case."""
        names = {k: _capitalise(v) for k, v in names.items()}
        out = []
        for template, label in self.templates:
            text = "\n".join(_capitalise(line.format(**names)) for line in template.split("\n"))
            out.append(Sample(text=text, template=template, label=label))
        return out


def _capitalise(line: str) -> str:
    return line[:1].upper() + line[1:]


def _syllable(rng: np.random.Generator, prev_coda: str) -> tuple[str, str]:
    onsets = ONSETS_SINGLE if prev_coda or rng.random() < 0.7 else ONSETS_CLUSTER
    onsets = tuple(o for o in onsets if o != prev_coda)  # no doubled consonant across syllables
    coda = CODAS[rng.integers(len(CODAS))]
    return onsets[rng.integers(len(onsets))] + NUCLEI[rng.integers(len(NUCLEI))] + coda, coda


def random_name(rng: np.random.Generator) -> str:
    """A made-up, pronounceable lower-case name of 2 to 5 syllables (fresh entities the model has not seen).

    Args:
        rng: the numpy random generator to draw from.

    Returns:
        The name.
    """
    count = int(rng.choice(SYLLABLE_COUNTS, p=SYLLABLE_WEIGHTS))
    parts, coda = [], ""
    for _ in range(count):
        syl, coda = _syllable(rng, coda)
        parts.append(syl)
    return "".join(parts)


def random_names(k: int, seed: int) -> list[str]:
    """`k` distinct made-up names, reproducible from `seed`.

    Args:
        k: how many, >= 0.
        seed: the seed.

    Returns:
        The names.

    Raises:
        ValueError: `k` is not a non-negative int.
    """
    if not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"the number of names must be a non-negative int, got {k!r}")
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < k:
        name = random_name(rng)
        if name not in names:
            names.append(name)
    return names


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain(
            "chain_induces",
            (
                ("Whenever {A} happens, it causes {Z} to happen.", "conclusion A->Z"),
                ("Whenever {A} happens, it causes {B} to happen.", "premise A->B"),
                (
                    "Whenever {A} happens, it causes {B} to happen.\nWhenever {B} happens, it causes {Z} to happen.",
                    "chain of 2",
                ),
                (
                    "Whenever {A} happens, it causes {B} to happen.\nWhenever {B} happens, it causes {C} to happen.\n"
                    "Whenever {C} happens, it causes {D} to happen.\nWhenever {D} happens, it causes {Z} to happen.",
                    "chain of 4",
                ),
                ("Whenever {Z} happens, it causes {A} to happen.", "reversed Z->A"),
            ),
            (
                Probe(
                    "chain of 4",
                    "conclusion A->Z",
                    "reversed Z->A",
                    "chain A->B->C->D->Z implies A causes Z, not Z causes A",
                ),
                Probe(
                    "chain of 2", "conclusion A->Z", "reversed Z->A", "chain A->B->Z implies A causes Z, not Z causes A"
                ),
            ),
        ),
        Domain(
            "belongs_to",
            (
                ("{A} belongs to the set of {C}.", "conclusion A in C"),
                ("{A} belongs to the set of {B}.", "premise A in B"),
                ("{B} is a set that contains {A}.", "equivalent B contains A"),
                ("{B} belongs to the set of {A}.", "converse B in A"),
                ("{A} does not belong to the set of {C}.", "negation A not in C"),
                ("{A} might belong to the set of {C}.", "uncertainty A maybe in C"),
                ("{B} belongs to the set of {C}.", "premise B in C"),
                ("{A} belongs to the set of {B} and {B} belongs to the set of {C}.", "composition in one line"),
                ("{A} belongs to the set of {B}.\n{B} belongs to the set of {C}.", "composition in two lines"),
                ("Frogs and toads often hibernate in winter.", "out of domain"),
            ),
            (
                Probe(
                    "premise A in B",
                    "equivalent B contains A",
                    "converse B in A",
                    "A in B implies B contains A, not B in A",
                ),
                Probe(
                    "composition in two lines",
                    "conclusion A in C",
                    "negation A not in C",
                    "A in B, B in C implies A in C, not its negation",
                ),
                Probe(
                    "composition in one line",
                    "conclusion A in C",
                    "negation A not in C",
                    "A in B and B in C implies A in C, not its negation",
                ),
                Probe(
                    "conclusion A in C",
                    "uncertainty A maybe in C",
                    "negation A not in C",
                    "A in C makes 'A might be in C' likelier than 'A is not in C'",
                ),
            ),
        ),
        Domain(
            "transitivity",
            (
                ("a {A} is a {B}.\nall {B}s have a {C}.", "premises in two lines"),
                ("a {A} is a {B}.", "premise A is B"),
                ("all {B}s have a {C}.", "premise Bs have C"),
                ("one example of a {B} is a {A}.", "equivalent A is an example of B"),
                ("a {A} is not a {B}.", "negation A is not B"),
                ("a {A} has a {C}.", "conclusion A has C"),
                ("{A}s have {C}s.", "conclusion, plural"),
                ("a {A} does not have a {C}.", "negated conclusion"),
                ("{A}", "entity A alone"),
                ("{C}", "entity C alone"),
                ("{B}", "entity B alone"),
                ("a {D} is a {E}.", "unrelated entities"),
            ),
            (
                Probe(
                    "premises in two lines",
                    "conclusion A has C",
                    "negated conclusion",
                    "A is B, Bs have C implies A has C, not A lacks C",
                ),
                Probe(
                    "premises in two lines",
                    "conclusion, plural",
                    "negated conclusion",
                    "A is B, Bs have C implies As have Cs, not A lacks C",
                ),
                Probe(
                    "premise A is B",
                    "equivalent A is an example of B",
                    "negation A is not B",
                    "A is B implies 'an example of B is A', not 'A is not B'",
                ),
            ),
        ),
        Domain(
            "squares",
            (
                ("every square is a {B}.", "premise square in B"),
                ("every {B} is a rectangle.", "premise B in rectangle"),
                ("every square is a {B}.\nevery {B} is a rectangle.", "premises in two lines"),
                ("every square is a rectangle.", "conclusion square in rectangle"),
                ("every rectangle is a square.", "converse of the conclusion"),
                ("every {B} is a square.", "converse of premise 1"),
                ("some {B}s are squares.", "weak converse of premise 1"),
            ),
            (
                Probe(
                    "premises in two lines",
                    "conclusion square in rectangle",
                    "converse of the conclusion",
                    "square in B, B in rectangle implies square in rectangle, not the converse",
                ),
                Probe(
                    "premise square in B",
                    "weak converse of premise 1",
                    "converse of premise 1",
                    "every square is a B implies some Bs are squares, not every B is a square",
                ),
            ),
        ),
        Domain(
            "bigger_than",
            (
                ("{A} is bigger than {B}.", "premise A > B"),
                ("{B} is bigger than {C}.", "premise B > C"),
                ("{A} is bigger than {B}.\n{B} is bigger than {C}.", "chain A > B > C"),
                ("{A} is bigger than {C}.", "conclusion A > C"),
                ("{C} is bigger than {A}.", "reversed conclusion C > A"),
                ("{B} is bigger than {A}.", "converse B > A"),
                ("{B} is smaller than {A}.", "equivalent B < A"),
                ("{A} is smaller than {B}.", "contradiction A < B"),
            ),
            (
                Probe(
                    "chain A > B > C",
                    "conclusion A > C",
                    "reversed conclusion C > A",
                    "A > B > C implies A > C, not C > A",
                ),
                Probe("premise A > B", "equivalent B < A", "contradiction A < B", "A > B implies B < A, not A < B"),
                Probe("premise A > B", "equivalent B < A", "converse B > A", "A > B implies B < A, not B > A"),
            ),
        ),
    )
}


def domain(name: str) -> Domain:
    """The domain called `name`.

    Args:
        name: one of `DOMAINS`.

    Returns:
        The domain.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; valid domains: {', '.join(DOMAINS)}")
    return DOMAINS[name]


def draw(name: str, seed: int) -> list[Sample]:
    """The samples of a domain with fresh entity names drawn from `seed`.

    Args:
        name: one of `DOMAINS`.
        seed: the seed of the names (a new seed gives a new repeat of the study).

    Returns:
        One sample per template, in the domain's order.

    Raises:
        ValueError: an unknown domain.
    """
    d = domain(name)
    names = random_names(len(d.slots), seed)
    return d.fill(dict(zip(d.slots, names)))
