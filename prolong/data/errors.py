"""The one exception the data pipeline raises for bad input."""

from __future__ import annotations


class DataError(Exception):
    """Bad data input: names the stream (domain), the path and what is wrong. The CLI prints it on
    one line and exits 2. Never raise it for a bug in our own code."""

    def __init__(self, message: str, *, domain: str | None = None, path: str | None = None):
        self.domain, self.path = domain, path
        where = ", ".join(x for x in (f"stream {domain}" if domain else "", path or "") if x)
        super().__init__(f"{where}: {message}" if where else message)
