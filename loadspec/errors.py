"""Errors a user can act on. The CLI prints them without a traceback."""
from __future__ import annotations

import difflib

import attrs


class LoadspecError(Exception):
    """A failure the user can fix; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(LoadspecError):
    """The user asked for something that cannot work (bad spec, bad name, bad combination)."""

    exit_code = 2


@attrs.frozen
class Problem:
    """One thing wrong in a spec: where, what, and how to fix it."""

    key: str
    message: str
    line: int | None = None
    fix: str = ""

    def render(self, path: str) -> str:
        where = f"{path}:{self.line}" if self.line else path
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


class SpecError(UsageError):
    """Every problem found in one spec file, reported together."""

    def __init__(self, path: str, problems: list[Problem]):
        self.path = path
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.key))
        count = len(self.problems)
        head = f"{path}: {count} problem{'s' if count != 1 else ''} in the spec"
        super().__init__("\n".join([head, *(p.render(path) for p in self.problems)]))


def did_you_mean(word: str, choices) -> str:
    """' Did you mean X?' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
