"""Reading a `datasets` split as Arrow batches: numeric columns, list lengths and token-id digests without pulling
columns into Python lists, and the row counts and indices that errors name."""

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset


_SCAN_BATCH = 10_000


def describe_rows(indices: Iterable[int], count: int | None = None, limit: int = 5) -> str:
    """`"3 row(s) (indices 0, 4, 9)"`, with at most `limit` indices shown."""
    shown = [int(i) for i in list(indices)[:limit]]
    count = len(shown) if count is None else count
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    return f"{count} row(s) (indices {', '.join(str(i) for i in shown)}{more})"


@dataclass
class _Hits:
    """Rows where a check failed: the count and the first few indices, gathered batch by batch."""

    count: int = 0
    first: list[int] = field(default_factory=list)

    def add(self, mask: np.ndarray, offset: int) -> None:
        found = np.flatnonzero(mask)
        self.count += len(found)
        self.first.extend((found[: 5 - len(self.first)] + offset).tolist())

    def __str__(self) -> str:
        return describe_rows(self.first, self.count)


def _scan(dataset: Dataset, columns: list[str]) -> Iterable[tuple[int, pa.Table]]:
    """`(offset, batch)` over the rows of `dataset` (its indices mapping applied), as Arrow tables."""
    offset = 0
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=_SCAN_BATCH):
        yield offset, batch
        offset += batch.num_rows


def column_numpy(dataset: Dataset, column: str) -> np.ndarray:
    """A numeric column of `dataset` (indices mapping applied) as one NumPy array, read batch by batch."""
    parts = [batch.column(column).to_numpy() for _, batch in _scan(dataset, [column])]
    return np.concatenate(parts) if parts else np.zeros(0)


def list_lengths(dataset: Dataset, column: str) -> np.ndarray:
    """Length of every list in a list column (e.g. a token-id column), without reading the lists into Python."""
    parts = [pc.list_value_length(batch.column(column)).to_numpy() for _, batch in _scan(dataset, [column])]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def token_ids_digest(dataset: Dataset, columns: tuple[str, ...] = ("prompt_ids", "completion_ids")) -> str:
    """A digest of the token-id columns of every row: what a model reads, whatever text or template made them."""
    h = hashlib.blake2b(digest_size=16)
    for _, batch in _scan(dataset, list(columns)):
        for column in columns:
            values = batch.column(column).combine_chunks()
            h.update(pc.list_value_length(values).to_numpy().astype(np.int64).tobytes())
            h.update(pc.list_flatten(values).to_numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def column_digest(dataset: Dataset, column: str) -> str:
    """A digest of a numeric column of every row (e.g. the group keys, which digest each row's images)."""
    return hashlib.blake2b(column_numpy(dataset, column).astype(np.int64).tobytes(), digest_size=16).hexdigest()
