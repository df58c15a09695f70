"""Attribute sets for value-space directions among ROME edits: subjects, relations whose objects
carry one binary attribute (a male or a female role noun), and probes that read it back (pronouns).

A set is one JSON object (``lens/data/attributes/gender.json`` ships with the package, written for
this project) with exactly these keys:

- ``attribute``, ``source``: what the attribute is and where the words come from;
- ``labels``: the two values of the attribute, e.g. ``["male", "female"]``;
- ``subjects``: given names used for people of any gender, so an edit's label is not in the name;
- ``relations``: ``{"prompt": "{} works as a", "pairs": [[" waiter", " waitress"], ...]}``, one
  object per label in each pair, in the order of ``labels``;
- ``probes``: ``{"prompt": "{} said that", "targets": [" he", " she"]}``, the continuation that
  shows each label, in the order of ``labels``.

Every object continues its prompt, so it starts with a space. Loading checks all of it and names
the fix (``InputError``); whether the model tokenises a subject on token boundaries is checked
when the edits are made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens.config import InputError

SHIPPED = Path(__file__).with_name("attributes") / "gender.json"
"""The attribute set that ships with the package."""

KEYS = ("attribute", "source", "labels", "subjects", "relations", "probes")


@dataclass(frozen=True)
class Relation:
    """A prompt with one ``{}`` for the subject and the object pairs that continue it, one object per label."""

    prompt: str
    pairs: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Probe:
    """A prompt with one ``{}`` for the subject and the continuation that shows each label."""

    prompt: str
    targets: tuple[str, ...]


@dataclass(frozen=True)
class AttributeSet:
    """A checked attribute set (see the module docstring for the file format)."""

    attribute: str
    source: str
    labels: tuple[str, ...]
    subjects: tuple[str, ...]
    relations: tuple[Relation, ...]
    probes: tuple[Probe, ...]
    path: str


class _Checker:
    """Builds the error messages of one file: each names the file, the field and the fix."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> InputError:
        return InputError(f"attribute set {self.path}: {where} {what}")

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"must be a non-empty string, got {value!r}")
        return value

    def template(self, value: Any, where: str) -> str:
        prompt = self.text(value, where)
        if prompt.count("{}") != 1 or "{" in prompt.replace("{}", "") or "}" in prompt.replace("{}", ""):
            raise self.fail(where, f"= {prompt!r} needs exactly one {{}} (where the subject goes) and no other braces, e.g. '{{}} works as a'")
        if prompt.endswith(" "):
            raise self.fail(where, f"= {prompt!r} ends with a space: end at the last word; the objects carry their leading space")
        return prompt

    def objects(self, value: Any, where: str, n: int) -> tuple[str, ...]:
        if not isinstance(value, list) or len(value) != n:
            raise self.fail(where, f"must list {n} objects, one per label in the order of 'labels', got {value!r}")
        words = tuple(self.text(word, f"{where}[{i}]") for i, word in enumerate(value))
        for i, word in enumerate(words):
            if not word.startswith(" ") or word.startswith("  "):
                raise self.fail(f"{where}[{i}]", f"= {word!r} must start with exactly one space, as it continues the prompt (e.g. ' waiter')")
        if len(set(words)) != n:
            raise self.fail(where, f"= {list(words)} repeats an object: each label needs its own")
        return words

    def listed(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"must be a non-empty list, got {value!r}")
        return value

    def items(self, value: Any, where: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
        for i, item in enumerate(self.listed(value, where)):
            if not isinstance(item, dict) or set(item) != set(keys):
                got = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise self.fail(f"{where}[{i}]", f"must be an object with exactly the keys {list(keys)}, got {got}")
        return value


def load_attributes(path: str | Path | None = None) -> AttributeSet:
    """The attribute set at ``path`` (None: the shipped gender set), checked."""
    file = Path(path).expanduser() if path is not None else SHIPPED
    if not file.is_file():
        raise InputError(f"attribute set {file} does not exist: give attributes_path=FILE.json, or leave it empty for the shipped set")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"attribute set {file} is not valid UTF-8 JSON: {err}") from err
    check = _Checker(file)
    if not isinstance(raw, dict) or set(raw) != set(KEYS):
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise InputError(f"attribute set {file} must be one JSON object with exactly the keys {list(KEYS)}, got {got}")
    labels = raw["labels"]
    if not isinstance(labels, list) or len(labels) != 2 or len({check.text(x, 'labels[]') for x in labels}) != 2:
        raise check.fail("labels", f"must list two different values of the attribute (a logistic regression separates two), got {labels!r}")
    subjects = raw["subjects"]
    if not isinstance(subjects, list) or len(subjects) < 4:
        raise check.fail("subjects", f"must list at least 4 names (train and held-out subjects both need 2), got {subjects!r}")
    for i, subject in enumerate(subjects):
        name = check.text(subject, f"subjects[{i}]")
        if name != name.strip() or "{" in name or "}" in name:
            raise check.fail(f"subjects[{i}]", f"= {name!r} must have no surrounding spaces and no braces")
    repeated = sorted({s for s in subjects if subjects.count(s) > 1})
    if repeated:
        raise check.fail("subjects", f"repeat {repeated}: a subject on both sides of the train/held-out split would leak")
    relations = tuple(
        Relation(
            check.template(item["prompt"], f"relations[{i}].prompt"),
            tuple(check.objects(pair, f"relations[{i}].pairs[{j}]", 2) for j, pair in enumerate(check.listed(item["pairs"], f"relations[{i}].pairs"))),
        )
        for i, item in enumerate(check.items(raw["relations"], "relations", ("prompt", "pairs")))
    )
    probes = tuple(
        Probe(check.template(item["prompt"], f"probes[{i}].prompt"), check.objects(item["targets"], f"probes[{i}].targets", 2))
        for i, item in enumerate(check.items(raw["probes"], "probes", ("prompt", "targets")))
    )
    return AttributeSet(
        check.text(raw["attribute"], "attribute"), check.text(raw["source"], "source"), tuple(labels), tuple(subjects), relations, probes, str(file)
    )
