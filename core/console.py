"""The CLI's one rich console (stderr for logs and progress, stdout for tables)."""

from functools import cache


@cache
def stderr():
    from rich.console import Console

    return Console(stderr=True)


@cache
def stdout():
    from rich.console import Console

    return Console()
