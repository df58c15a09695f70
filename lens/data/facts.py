"""Subject-relation-object facts for causal tracing and fact edits (ROME), with the prompts that
measure an edit: paraphrases (does the edit generalise?) and neighbourhood prompts (other subjects
whose answer is the same object: does it stay specific?).

A fact file is JSON Lines, one object per line with exactly the fields of ``Fact``. The shipped set
(``lens/data/facts/facts.jsonl``, described in docs/facts.md) was written for this project from
common knowledge; which facts a model actually knows is decided at run time
(``lens.analysis.known_facts``), never cached here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence, TypeVar

from lens.config import InputError

SHIPPED = Path(__file__).with_name("facts") / "facts.jsonl"
"""The fact set that ships with the package."""

T = TypeVar("T")


@dataclass(frozen=True)
class Fact:
    """One fact and its evaluation prompts; construction checks it (``InputError`` naming the fix)."""

    id: str
    """Stable id, e.g. ``"capital-france"``; unique within a file."""
    relation: str
    """The relation, e.g. ``"capital of"``."""
    subject: str
    """The subject as written in the prompts, e.g. ``"France"``."""
    prompt: str
    """Template with exactly one ``{}`` for the subject, ending where the object comes: ``"The capital of {} is"``."""
    target_true: str
    """The true object as the model would continue the prompt, with its leading space: ``" Paris"``."""
    target_new: str
    """A counterfactual object of the same relation, the target of an edit: ``" Rome"``."""
    paraphrases: tuple[str, ...]
    """Full prompts (subject written in) asking for the same object another way."""
    neighbourhood: tuple[str, ...]
    """Full prompts about other subjects whose true object is ``target_true``."""
    source: str
    """Where the fact comes from."""

    def __post_init__(self) -> None:
        for name in ("id", "relation", "subject", "prompt", "target_true", "target_new", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"fact {self.id!r}: {name} must be a non-empty string, got {value!r}")
        if self.prompt.count("{}") != 1 or re.search(r"[{}]", self.prompt.replace("{}", "")):
            raise InputError(
                f"fact {self.id!r}: prompt {self.prompt!r} must contain exactly one '{{}}' (where the subject goes) "
                "and no other braces, e.g. 'The capital of {} is'"
            )
        if self.target_true.strip() == self.target_new.strip():
            raise InputError(
                f"fact {self.id!r}: target_new {self.target_new!r} equals target_true: give a different object of the same relation"
            )
        for name in ("paraphrases", "neighbourhood"):
            prompts = getattr(self, name)
            if not isinstance(prompts, tuple) or not prompts:
                raise InputError(f"fact {self.id!r}: {name} must be a non-empty list of prompts, got {prompts!r}")
            for text in prompts:
                if not isinstance(text, str) or not text.strip():
                    raise InputError(f"fact {self.id!r}: every entry of {name} must be a non-empty string, got {text!r}")
        for text in self.paraphrases:
            if not mentions(text, self.subject):
                raise InputError(
                    f"fact {self.id!r}: paraphrase {text!r} does not mention the subject {self.subject!r}: write the subject into it"
                )
        for text in self.neighbourhood:
            if mentions(text, self.subject):
                raise InputError(
                    f"fact {self.id!r}: neighbourhood prompt {text!r} mentions the subject {self.subject!r}: "
                    "neighbourhood prompts are about other subjects with the same true object"
                )

    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)


FIELDS = tuple(f.name for f in fields(Fact))


def mentions(text: str, subject: str) -> bool:
    """Whether ``subject`` occurs in ``text`` as whole words, ignoring case (a sentence may capitalise "the")."""
    return re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", text, flags=re.IGNORECASE) is not None


def fact_from_json(row: object) -> Fact:
    """A ``Fact`` from one decoded JSON line (lists become tuples); wrong keys fail naming them."""
    if not isinstance(row, dict):
        raise InputError(f"a fact must be a JSON object with the keys {', '.join(FIELDS)}, got {type(row).__name__}")
    missing = [name for name in FIELDS if name not in row]
    extra = sorted(set(row) - set(FIELDS))
    if missing or extra:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])
        raise InputError(f"fact {row.get('id')!r}: {'; '.join(problems)}: a fact has exactly the keys {', '.join(FIELDS)}")
    values = dict(row)
    for name in ("paraphrases", "neighbourhood"):
        if isinstance(values[name], list):
            values[name] = tuple(values[name])
    return Fact(**values)


def load_facts(path: str | Path | None = None) -> list[Fact]:
    """Read and check a JSON Lines fact file (``None``: the shipped set). Errors name the file and line."""
    path = SHIPPED if path is None else Path(path)
    if not path.is_file():
        raise InputError(f"fact file {path} does not exist: give a .jsonl file of facts, or None for the shipped set")
    facts: list[Fact] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}): write one JSON object per line") from err
        try:
            fact = fact_from_json(row)
        except InputError as err:
            raise InputError(f"{path}, line {number}: {err}") from err
        if fact.id in first_line:
            raise InputError(
                f"{path}, line {number}: duplicate id {fact.id!r} (first on line {first_line[fact.id]}): give every fact its own id"
            )
        first_line[fact.id] = number
        facts.append(fact)
    if not facts:
        raise InputError(f"fact file {path} holds no facts: write one JSON object per line")
    return facts


def evenly_spaced(items: Sequence[T], count: int) -> list[T]:
    """``count`` items (all when there are fewer) spread evenly through ``items``, the first included:
    the shipped facts are grouped by relation, so the first ``count`` would all be of one relation,
    while evenly spaced ones give every relation its share."""
    if count < 0:
        raise InputError(f"count must be >= 0, got {count}")
    n = min(count, len(items))
    return [items[i * len(items) // n] for i in range(n)]
