"""Collecting every configuration problem of one pass, to report them all at once."""

from __future__ import annotations

from types import TracebackType

from objfs.errors import ConfigError


class _Collect:
    """``with problems.collect():`` records a ConfigError raised in the block and carries on
    after it (its ``__exit__`` says so to type checkers: statements after the block may run
    with the block's assignments not made)."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if isinstance(exc, ConfigError):
            self.problems.found.extend(exc.problems)
            return True
        return False


class Problems:
    """Every problem found in one pass, so that one run of `objfs config check` (or a failed
    start) lists them all."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, message: str) -> None:
        self.found.append(message)

    def collect(self) -> _Collect:
        """Record a ConfigError raised in the block and carry on after it."""
        return _Collect(self)

    def raise_any(self) -> None:
        if self.found:
            raise ConfigError(*self.found)
