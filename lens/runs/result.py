"""What a run hands back: its folder and what it measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar


class Lines(Protocol):
    def lines(self) -> list[str]: ...


M = TypeVar("M", bound=Lines)


@dataclass
class Measured(Generic[M]):
    """A run's folder and its typed result; the CLI prints ``lines()`` then the folder."""

    run_dir: Path
    evaluation: M

    def lines(self) -> list[str]:
        return self.evaluation.lines()


@dataclass
class Done:
    """The outcome of the small commands (convert, corpus, push): a folder and a few lines."""

    run_dir: Path
    summary: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return self.summary
