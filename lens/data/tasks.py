"""Word-pair tasks for in-context learning and function vectors (antonyms, capitals, plural -> singular).

The lists in ``lens/data/tasks/*.json`` were written for this project (not taken from a data set):
common single words where possible, each file one object ``{"task", "description", "source",
"input", "output", "pairs": [[input, output], ...]}``. A prompt is ``N`` demonstrations and a query,
one pair per line, ``"hot: cold\\nbig: small\\nfast:"``; the answer is ``" slow"`` (a leading space,
as the word follows ``": "`` in running text).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, get_args

from lens.config import IclTask, InputError, PromptTemplate

TASK_DIR = Path(__file__).resolve().parent / "tasks"
TASK_NAMES: tuple[str, ...] = get_args(IclTask)
MIN_PAIRS = 20
"""Fewest pairs a task may have: enough for demonstrations plus validation and test words."""

Pair = tuple[str, str]


@dataclass(frozen=True)
class WordTask:
    """A validated word-pair list."""

    name: str
    description: str
    source: str
    pairs: tuple[Pair, ...]


@dataclass(frozen=True)
class TaskSplit:
    """Disjoint parts of one task's pairs: demonstrations and head statistics come from ``train``,
    the injection layer is chosen on ``val``, accuracy is reported on ``test``."""

    train: tuple[Pair, ...]
    val: tuple[Pair, ...]
    test: tuple[Pair, ...]


def load_task(name_or_path: str | Path) -> WordTask:
    """A shipped task by name (``antonyms``...) or a JSON file in the same format, validated."""
    path = TASK_DIR / f"{name_or_path}.json" if str(name_or_path) in TASK_NAMES else Path(name_or_path)
    if not path.is_file():
        raise InputError(f"no task file {path}: give one of {list(TASK_NAMES)} or a JSON file of word pairs")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"task file {path} is not valid UTF-8 JSON: {err}") from err
    return parse_task(data, str(path))


def parse_task(data: Any, origin: str) -> WordTask:
    """Check every field and pair, naming the file, the pair and the fix."""
    if not isinstance(data, dict):
        raise InputError(f"{origin}: the top level must be an object with a 'pairs' list, got {type(data).__name__}")
    for key in ("task", "description", "source"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise InputError(f"{origin}: needs a non-empty text field {key!r} (say where the pairs come from in 'source')")
    pairs = data.get("pairs")
    if not isinstance(pairs, list):
        raise InputError(f"{origin}: 'pairs' must be a list of [input, output] pairs")
    checked: list[Pair] = []
    seen: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(w, str) for w in pair)):
            raise InputError(f"{origin}: pair {i} is {pair!r}; each pair is a list of two strings [input, output]")
        for word in pair:
            if not word.strip() or word != word.strip() or "\n" in word:
                raise InputError(
                    f"{origin}: pair {i} {pair!r} has an empty word, a newline or spaces at either end; "
                    "prompts put one pair per line as 'input: output'"
                )
        if pair[0] in seen:
            raise InputError(f"{origin}: input {pair[0]!r} appears in pairs {seen[pair[0]]} and {i}; each input has one answer")
        seen[pair[0]] = i
        checked.append((pair[0], pair[1]))
    if len(checked) < MIN_PAIRS:
        raise InputError(f"{origin}: {len(checked)} pairs, need at least {MIN_PAIRS} (demonstrations, validation and test words)")
    return WordTask(data["task"], data["description"], data["source"], tuple(checked))


def split_task(task: WordTask, val_fraction: float, test_fraction: float, seed: int) -> TaskSplit:
    """A seeded shuffle cut into train / val / test; every part gets at least two pairs."""
    pairs = list(task.pairs)
    random.Random(seed).shuffle(pairs)
    n_val, n_test = round(len(pairs) * val_fraction), round(len(pairs) * test_fraction)
    n_train = len(pairs) - n_val - n_test
    if min(n_val, n_test, n_train) < 2:
        raise InputError(
            f"task {task.name}: {len(pairs)} pairs split {n_train}/{n_val}/{n_test} (train/val/test); "
            "every part needs at least 2: change val_fraction / test_fraction"
        )
    return TaskSplit(tuple(pairs[:n_train]), tuple(pairs[n_train : n_train + n_val]), tuple(pairs[n_train + n_val :]))


TEMPLATES: dict[str, tuple[str, str]] = {
    "colon": ("{x}: {y}\n", "{x}:"),
    "qa": ("Q: {x}\nA: {y}\n\n", "Q: {x}\nA:"),
}
"""Per template: one demonstration, and the query the model answers (Todd et al. default to ``qa``)."""


def format_prompt(demonstrations: Sequence[Pair], query: str, template: PromptTemplate = "colon") -> str:
    """``colon``: ``"a: b\\nc: d\\nquery:"``; ``qa``: ``"Q: a\\nA: b\\n\\nQ: query\\nA:"``. With no
    demonstrations, the zero-shot prompt (``"query:"``, ``"Q: query\\nA:"``)."""
    shot, ask = TEMPLATES[template]
    return "".join(shot.format(x=x, y=y) for x, y in demonstrations) + ask.format(x=query)


def answer_text(output: str) -> str:
    """The continuation that answers a prompt: the output word after the separator's space."""
    return f" {output}"
