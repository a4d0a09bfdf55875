r"""The results file: JSON, rewritten after every row, always valid.

Layout: ``{"meta": {...}, "rows": [record, ...], "targets": {workload: {order: [...]}}}``
with one record per line. A record is a workload's description (``kind: "workload"``), a
measured or skipped row (``kind: "row"``) or a scaling point (``kind: "scaling"``).

Every append writes the whole file to ``<name>.tmp<pid>`` next to it and renames it over the
file (``os.replace`` is atomic on POSIX), so a run killed at any moment leaves the last
complete file. ``--resume`` reads it back and skips every record whose :func:`key` is
already there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["Results", "key"]

_KEY_FIELDS = ("kind", "workload", "library", "curvature", "structure", "order", "axis", "value")


def key(record: dict[str, Any]) -> tuple:
    """The identity of a record (what ``--resume`` compares)."""
    return tuple(record.get(k) for k in _KEY_FIELDS)


class Results:
    """The results file at ``path``, held in memory and rewritten on every change."""

    def __init__(self, path: str | Path, data: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data = data
        self.data.setdefault("rows", [])
        self.data.setdefault("targets", {})
        self._keys = {key(r) for r in self.data["rows"]}

    @classmethod
    def new(cls, path: str | Path, meta: dict[str, Any]) -> Results:
        out = cls(path, {"meta": meta, "rows": [], "targets": {}})
        out.write()
        return out

    @classmethod
    def load(cls, path: str | Path) -> Results:
        """Read ``path``.

        Raises
        ------
        ValueError
            If it does not exist or is not a results file.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path} does not exist (nothing to resume)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(data, dict) or "meta" not in data or "rows" not in data:
            raise ValueError(f"{path} is not a benchmark results file (no 'meta' and 'rows')")
        return cls(path, data)

    def has(self, record: dict[str, Any]) -> bool:
        return key(record) in self._keys

    def get(self, record: dict[str, Any]) -> dict[str, Any]:
        """The stored record with the key of ``record``."""
        k = key(record)
        return next(r for r in self.data["rows"] if key(r) == k)

    def rows(self, workload: str | None = None, kind: str = "row") -> list[dict[str, Any]]:
        return [
            r
            for r in self.data["rows"]
            if r.get("kind") == kind and (workload is None or r.get("workload") == workload)
        ]

    def workload_meta(self, workload: str) -> dict[str, Any] | None:
        found = self.rows(workload, kind="workload")
        return found[0] if found else None

    def append(self, record: dict[str, Any]) -> None:
        """Add ``record`` (replacing one with the same key) and rewrite the file."""
        k = key(record)
        if k in self._keys:
            self.data["rows"] = [r for r in self.data["rows"] if key(r) != k]
        self.data["rows"].append(record)
        self._keys.add(k)
        self.write()

    def write(self) -> None:
        """Write to a temporary file next to ``path`` and rename it over ``path``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        body = ",\n".join(json.dumps(r) for r in self.data["rows"])
        text = (
            '{"meta": '
            + json.dumps(self.data["meta"], indent=1)
            + ',\n"targets": '
            + json.dumps(self.data["targets"])
            + ',\n"rows": [\n'
            + body
            + "\n]}\n"
        )
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
