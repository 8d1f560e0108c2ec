"""How every prolongctl command reports bad input: one line on stderr naming the file, the field
and the rule, and exit code 2 (1 is for failures while running). Shared by the main CLI and its
sub-apps (data, eval), so bad input reads the same whichever command met it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from prolong.data.errors import DataError
from prolong.spec import SpecError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
err = Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input (a spec or data error) becomes one line on stderr and exit code 2."""
    try:
        yield
    except SpecError as exc:
        err.print(exc.one_line(), markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except DataError as exc:
        err.print(str(exc), markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
