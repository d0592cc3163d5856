"""Readable class names from a file the user gives: ``classes.txt`` (one name per line, in class-id order, or
``key name`` lines such as ImageNet's ``n01440764 tench, Tinca tinca``) or a JSON list or mapping (WordNet ids ->
names). The names replace the dataset's own (folder names, CSV labels, integer ids) wherever a class is shown:
``data.json`` (so ``ccar predict`` writes them), text-initialised heads (``head.init=text`` fills them into its
prompt) and the reports.

The file is named by the ``class_names`` config key, or found beside your own data: ``classes.txt`` or
``classes.json`` in ``data_root`` (datasets ``folder``, ``csv``, ``features``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import DataError

DISCOVERED = ("classes.json", "classes.txt")  # looked for in data_root of your own data
OWN_DATA = ("folder", "csv", "features")


def _from_mapping(mapping: Dict[str, object], current: Sequence[str], where: str) -> List[str]:
    missing = [c for c in current if c not in mapping]
    if missing:
        raise DataError(f"{where}: no name for class {missing[0]!r} (the mapping's keys are the data's own class "
                        f"names: {', '.join(list(current)[:5])}{' ...' if len(current) > 5 else ''})")
    return [str(mapping[c]).strip() or c for c in current]


def _from_lines(lines: List[str], current: Sequence[str], where: str) -> List[str]:
    """``key name`` lines whose keys are the data's class names (extra keys allowed), else one name per class."""
    keyed = {}
    for line in lines:
        key, _, rest = line.partition(" ") if " " in line else line.partition("\t")
        keyed.setdefault(key.strip(), rest.strip())
    if len(lines) != len(current) and not set(current) <= set(keyed):
        raise DataError(f"{where}: {len(lines)} names for {len(current)} classes (give one name per line, in class-id "
                        f"order, or 'key name' lines whose keys are the data's class names)")
    if set(current) <= set(keyed) and any(keyed[c] for c in current) and list(current) != lines:
        return [keyed[c] or c for c in current]
    return list(lines)


def read_class_names(path: Path, current: Sequence[str]) -> List[str]:
    """The display name of each class of a dataset whose own class names are ``current`` (in class-id order).

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> _ = Path(d, "c.json").write_text('{"n01": "tench", "n02": "goldfish", "n03": "shark"}')
    >>> read_class_names(Path(d, "c.json"), ["n02", "n01"])
    ['goldfish', 'tench']
    >>> _ = Path(d, "c.txt").write_text("ankle boot\\nbag\\n")
    >>> read_class_names(Path(d, "c.txt"), ["0", "1"])
    ['ankle boot', 'bag']
    """
    where = f"class names {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: cannot read it as UTF-8 text ({exc.__class__.__name__})") from exc
    if Path(path).suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg}, line {exc.lineno})") from exc
        if isinstance(doc, dict):
            names = _from_mapping({str(k): v for k, v in doc.items()}, current, where)
        elif isinstance(doc, list) and len(doc) == len(current):
            names = [str(n).strip() for n in doc]
        else:
            raise DataError(f"{where}: expected a list of {len(current)} names or a mapping from the data's class "
                            f"names to names")
    else:
        names = _from_lines([ln.strip() for ln in text.splitlines() if ln.strip()], current, where)
    return _checked(names, where)


def _checked(names: List[str], where: str) -> List[str]:
    seen = set()
    for n in names:
        if not n:
            raise DataError(f"{where}: an empty class name")
        if n in seen:
            raise DataError(f"{where}: the name {n!r} is given to two classes; predictions could not tell them apart")
        seen.add(n)
    return names


def names_file(dataset: str, data_root: Optional[str], given: Optional[str]) -> Optional[Path]:
    """The class-names file of a dataset: ``given`` (the ``class_names`` key), else ``classes.json`` or
    ``classes.txt`` in the data_root of your own data, else None."""
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise DataError(f"class_names: {path} is not a file (classes.txt, one name per line, or a JSON mapping)")
        return path
    if dataset in OWN_DATA and data_root:
        for name in DISCOVERED:
            candidate = Path(data_root).expanduser() / name
            if candidate.is_file():
                return candidate
    return None
