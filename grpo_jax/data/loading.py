"""Rows from ``datasets``: a hub name, or local jsonl/json/parquet/arrow/csv files; then our fields from their
columns."""
from __future__ import annotations

import glob
from collections.abc import Mapping, Sequence
from pathlib import Path

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def is_local(source: str) -> bool:
    return Path(source).suffix in LOCAL_FORMATS or Path(source).exists()


def load_rows(source: str, *, split: str, subset: str | None = None, cache_dir: str | None = None):
    """A ``datasets.Dataset``: ``load_dataset(source, subset, split=split)`` for a hub name, or
    ``load_dataset(<format>, data_files=...)`` for local files (a glob; the format comes from the extension, and
    ``split`` does not apply)."""
    from datasets import load_dataset

    if not is_local(source):
        return load_dataset(source, subset, split=split, cache_dir=cache_dir)
    suffix = Path(source).suffix
    if suffix not in LOCAL_FORMATS:
        raise ValueError(f"data source {source!r}: local files must end in one of {sorted(LOCAL_FORMATS)}")
    files = sorted(glob.glob(source))
    if not files:
        raise FileNotFoundError(f"data source {source!r}: no file matches")
    return load_dataset(LOCAL_FORMATS[suffix], data_files=files, split="train", cache_dir=cache_dir)


def select_columns(
    rows, columns: Mapping[str, str], *, optional: Sequence[str] = (), required_override: Sequence[str] = (), what: str
) -> list[dict]:
    """Rows as dicts of our fields, read from ``columns = {our_field: their_column}``.

    Fields listed in ``optional`` are dropped when their column is absent, unless in ``required_override``. A
    missing required column raises one error naming it and the columns that exist.
    """
    present = list(rows.column_names)
    wanted = {}
    for ours, theirs in columns.items():
        if theirs in present:
            wanted[ours] = theirs
        elif ours not in optional or ours in required_override:
            raise ValueError(
                f"{what}: column {theirs!r} (for field {ours!r}) is not in the data; columns present: {present}. "
                f"Map it with data.columns, e.g. {{{ours!r}: <column>}}"
            )
    rows = rows.select_columns(list(dict.fromkeys(wanted.values())))
    return [{ours: row[theirs] for ours, theirs in wanted.items()} for row in rows]
