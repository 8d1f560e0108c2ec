"""Files generated from the code (the CRD, the Grafana dashboard) and committed to charts/.

Each generator module's ``main`` writes its file through :func:`write_generated`; tests compare
the committed file with a fresh rendering so the two cannot drift.
"""

from __future__ import annotations

import sys
from pathlib import Path


def write_generated(text: str, default: Path, argv: list[str] | None = None) -> int:
    """Write ``text`` to the path given on the command line, or to ``default``."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0
