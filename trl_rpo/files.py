"""Every file the package writes goes through [`atomic_path`]: written beside its destination, then renamed over it,
so that a crash, a full disk or a killed process leaves the old file or the new one, never part of one (the readers
then validate what they read back: `reference_cache.load`, the generation store, `rounds.json`)."""

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (same folder, so the rename is atomic) for the block to write; renamed over
    `path` when the block ends without error, removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` to `path` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, record: Any) -> None:
    """`record` to `path` as indented JSON, atomically."""
    write_text(path, json.dumps(record, indent=2) + "\n")
