"""Writing a run's results so that nothing is lost or torn.

`ResultsDir` collects a run's files in a temporary folder beside the output folder and moves them
into place only when all of them are written (``fsync``-ed), so a kill at any moment leaves
either the previous results or the new ones, never new steps beside an old summary. The summary
names its steps file with the row count and SHA-256 (`steps_file_entry`), so a reader can check
that the two belong together. `write_json_atomic` writes one file the same way.

>>> with ResultsDir("results/x") as rd:                          # doctest: +SKIP
...     record.write_csv(rd.file("steps.csv"))
...     summary["steps_file"] = steps_file_entry(rd.file("steps.csv"))
...     write_json(rd.file("summary.json"), summary)
...     written = rd.commit()
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from palsctl.adapters.state import atomic_write_text, fsync_dir

__all__ = ["ResultsDir", "csv_digest", "steps_file_entry", "write_json", "write_json_atomic",
           "write_summary"]

# what a palsctl results folder holds: only such a folder is replaced as a whole
_OWN_FILES = re.compile(r"(steps(-[\w.-]+)?\.csv|summary\.json|timeline\.png|config\.toml|"
                        r"provenance\.json)")
_LAST = "summary.json"     # moved in last when files are moved one by one


def csv_digest(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(data rows after the header, SHA-256 hex of the bytes) of a CSV file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    with open(path, newline="") as f:
        rows = sum(1 for _ in csv.reader(f)) - 1
    return max(rows, 0), h.hexdigest()


def steps_file_entry(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"path": file name, "rows": ..., "sha256": ...}`` for a summary."""
    rows, sha = csv_digest(path)
    return {"path": Path(path).name, "rows": rows, "sha256": sha}


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (non-JSON values as strings)."""
    p = Path(path)
    p.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return p


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """`write_json`, atomically (`palsctl.adapters.state.atomic_write_text`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(p, json.dumps(obj, indent=2, default=str) + "\n")


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any],
                  steps_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Add ``steps_file`` (`steps_file_entry` of ``steps_path``, named relative to the
    summary's folder when inside it) to ``summary`` and write it atomically to ``path``."""
    entry = steps_file_entry(steps_path)
    try:
        entry["path"] = str(Path(steps_path).resolve().relative_to(Path(path).resolve().parent))
    except ValueError:
        entry["path"] = str(Path(steps_path).resolve())
    summary = {**summary, "steps_file": entry}
    write_json_atomic(path, summary)
    return summary


def _fsync_file(p: Path) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())


class ResultsDir:
    """A temporary folder for a run's files, moved into place by `commit` (module doc).

    ``out`` is replaced as a whole when it does not exist or holds only a previous run's files
    (``steps*.csv``, ``summary.json``, ``timeline.png``, ``config.toml``, ``provenance.json``);
    a folder holding anything else keeps it, and the new files are moved in one by one, each
    atomically, ``summary.json`` last. Leaving the ``with`` block without `commit` removes the
    temporary folder.
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp",
                                         dir=self.out.parent))
        os.chmod(self.tmp, 0o755)           # mkdtemp's 0700 would stay on the results folder
        self._names: list[str] = []

    def file(self, name: str) -> Path:
        """Where to write the file ``name`` (in the temporary folder)."""
        if name not in self._names:
            self._names.append(name)
        return self.tmp / name

    def commit(self) -> list[Path]:
        """Sync every file and move the folder (or the files) into place; returns the final
        paths of the files given by `file`, in that order."""
        for p in self.tmp.iterdir():
            _fsync_file(p)
        fsync_dir(self.tmp)
        out = self.out
        if not out.exists():
            os.rename(self.tmp, out)
        elif out.is_dir() and all(p.is_file() and _OWN_FILES.fullmatch(p.name)
                                  for p in out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(self.tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if not out.is_dir():
                raise NotADirectoryError(f"{out} exists and is not a folder")
            names = sorted((p.name for p in self.tmp.iterdir()), key=lambda n: n == _LAST)
            for name in names:
                os.replace(self.tmp / name, out / name)
            self.tmp.rmdir()
        fsync_dir(out)
        fsync_dir(out.parent)
        return [out / n for n in self._names]

    def abort(self) -> None:
        """Remove the temporary folder (nothing of this run is kept)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ResultsDir":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tmp.exists():
            self.abort()
