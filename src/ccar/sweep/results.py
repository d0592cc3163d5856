"""``results.jsonl``: one JSON line per finished cell, written by the sweep's driver alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List


def read_results(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that cell simply runs again
    return rows
