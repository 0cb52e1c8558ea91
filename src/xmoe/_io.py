"""Small file helpers shared by every writer: atomic writes and markdown tables."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader (or a crash) sees the old file or the new one, never a half-written one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(path)
    return path


Column = tuple[str, str, "str | Callable[[object], str]"]


def markdown_table(rows: Iterable[dict], columns: Sequence[Column], missing: str = "-") -> str:
    """A markdown table of ``rows``; ``columns`` are ``(key, title, format)``.

    ``format`` is a ``str.format`` spec such as ``"{:.2f}"`` or a callable. ``None`` and NaN
    cells print as ``missing``.
    """
    lines = [
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append(missing)
            else:
                cells.append(fmt(value) if callable(fmt) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
