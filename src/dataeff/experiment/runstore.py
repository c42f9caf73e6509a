"""An SQLite index of the run directories under a root, to filter, sort and export sweeps.

The run directories stay the source of truth: ``<root>/runs.sqlite`` is a cache of what they say, rebuilt
from them whenever it is missing, corrupt or of an older layout. :meth:`RunStore.refresh` re-reads only the
runs whose config, manifest or DONE/FAILED marker changed since the last scan.

Every run is one row with promoted columns for what is usually compared (status, preset, lr, val_loss, ...),
the flattened config under dotted keys (``optim.weight_decay``) and the remaining DONE metrics under their own
names (``tokens_seen``); filters and sorting take any of them.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import json
import math
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dataeff.config import from_dict, option
from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_path
from dataeff.train.config import RunConfig
from dataeff.train.identity import run_hash
from dataeff.train.rundir import DONE, FAILED, status

DB_NAME = "runs.sqlite"
# Bumped whenever the table changes; an index of another version is rebuilt from the run directories.
SCHEMA_VERSION = 1

# Promoted column -> the dotted config key it comes from.
CONFIG_COLUMNS = {
    "corpus": "data.corpus",
    "train_tokens": "data.train_tokens",
    "preset": "model.preset",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "epochs": "train.epochs",
    "optimizer": "optim.name",
}
RESULT_COLUMNS = ("val_loss", "val_bpb", "train_loss", "steps", "params")
COLUMNS = ("run_dir", "hash", "status", *CONFIG_COLUMNS, *RESULT_COLUMNS, "failure", "mtime")
_TYPES = {"train_tokens": "INTEGER", "params": "INTEGER", "steps": "INTEGER", "lr": "REAL", "weight_decay": "REAL",
          "epochs": "REAL", "val_loss": "REAL", "val_bpb": "REAL", "train_loss": "REAL", "mtime": "REAL"}
_SCHEMA = (
    "CREATE TABLE runs ("
    + ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" + (" PRIMARY KEY" if c == "run_dir" else "") for c in COLUMNS)
    + ", stamp TEXT NOT NULL, config TEXT NOT NULL, result TEXT NOT NULL);"
    "CREATE INDEX runs_status ON runs(status);"
)
_STAMPED = ("config.yaml", "manifest.json", DONE, FAILED)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _finite(value: Any) -> Any:
    # SQLite's JSON functions reject NaN/Infinity, which json.dumps writes by default.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _stamp(run_dir: Path) -> tuple[str, float]:
    times = []
    for name in _STAMPED:
        try:
            times.append((run_dir / name).stat().st_mtime_ns)
        except FileNotFoundError:
            times.append(0)
    return ":".join(map(str, times)), max(times) / 1e9


def _hash(config: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    if manifest.get("config_hash"):
        return str(manifest["config_hash"])
    try:  # no manifest yet (a run that failed or was killed before writing one): hash the config itself
        return run_hash(from_dict(RunConfig, config))
    except DataeffError:
        return None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from the run directory, or {} if it is unreadable: one damaged file must not stop the scan."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def index_run(run_dir: Path, rel: str) -> dict[str, Any] | None:
    """The row of one run directory, or None when its config.yaml is not a readable mapping."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    stamp, mtime = _stamp(run_dir)
    manifest = _read_json(run_dir / "manifest.json")
    st = status(run_dir)
    result = _read_json(run_dir / DONE) if st == "done" else {}
    flat = {k: _finite(v) for k, v in flatten(config).items() if k != "run_dir"}
    manifest_params = manifest.get("params")
    row: dict[str, Any] = {
        "run_dir": rel,
        "hash": _hash(config, manifest),
        "status": st,
        **{col: flat.get(key) for col, key in CONFIG_COLUMNS.items()},
        **{col: _finite(result.get(col)) for col in RESULT_COLUMNS},
        "failure": _read_json(run_dir / FAILED).get("reason") if st == "failed" else None,
        "mtime": mtime,
        "stamp": stamp,
        "config": json.dumps(flat),
        "result": json.dumps({k: _finite(v) for k, v in result.items() if k not in COLUMNS}),
    }
    if row["params"] is None and isinstance(manifest_params, dict):
        row["params"] = manifest_params.get("total")
    if row["train_tokens"] is None:  # the whole split: the count the run measured
        row["train_tokens"] = result.get("train_tokens", manifest.get("train_tokens"))
    return row


def find_runs(root: Path) -> Iterator[Path]:
    """Every directory under ``root`` holding a config.yaml; runs do not nest, so their insides are skipped."""
    for here, dirs, files in os.walk(root):
        if "config.yaml" in files:
            dirs.clear()
            yield Path(here)
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))


def parse_value(raw: str) -> Any:
    """A filter value from the command line: null, true/false, an int, a float (1e-2 too), else the text."""
    low = raw.strip().lower()
    if low in ("null", "none", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


class RunStore:
    """The index of the runs under ``root``, brought up to date on opening."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataeffError(f"{self.root}: no such directory of runs")
        self.path = self.root / DB_NAME
        self._open()
        self.refresh()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        # WAL: readers (a notebook, `dataeff runs`) never wait for a sweep's refresh, nor it for them.
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _open(self) -> None:
        """Create the table, or rebuild it when the file is corrupt or of another schema version."""
        if not self.path.exists():
            self._remove_files()  # a WAL left beside a deleted database belongs to no database now
        try:
            self._init_schema()
        except sqlite3.DatabaseError:
            self._remove_files()
            try:
                self._init_schema()
            except sqlite3.Error as e:
                raise DataeffError(f"{self.path}: cannot create the run index ({e})") from None

    def _init_schema(self) -> None:
        with contextlib.closing(self._connect()) as db:
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                db.executescript(f"DROP TABLE IF EXISTS runs; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION};")

    def refresh(self) -> int:
        """Re-index new and changed run directories and drop vanished ones; returns how many rows changed."""
        found = {str(d.relative_to(self.root)): d for d in find_runs(self.root)}
        with contextlib.closing(self._connect()) as db:
            known = dict(db.execute("SELECT run_dir, stamp FROM runs").fetchall())
        changed = [row for rel, d in found.items() if known.get(rel) != _stamp(d)[0] and (row := index_run(d, rel))]
        gone = [(rel,) for rel in known if rel not in found]
        if not changed and not gone:
            return 0
        names = [*COLUMNS, "stamp", "config", "result"]
        with contextlib.closing(self._connect()) as db, db:
            db.executemany(f"INSERT OR REPLACE INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                           [[row[n] for n in names] for row in changed])
            db.executemany("DELETE FROM runs WHERE run_dir = ?", gone)
        return len(changed) + len(gone)

    def _expr(self, key: str, db: sqlite3.Connection) -> tuple[str, list[Any]]:
        """SQL for a field: a promoted column, a dotted config key, or a result key."""
        if key in COLUMNS:
            return key, []
        source = "config" if "." in key else "result"
        known = {k for (k,) in db.execute(f"SELECT DISTINCT j.key FROM runs, json_each(runs.{source}) AS j")}
        if key not in known and db.execute("SELECT 1 FROM runs LIMIT 1").fetchone():
            close = difflib.get_close_matches(key, [*COLUMNS, *known], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataeffError(f"runs under {self.root}: no run has a field '{key}'{hint}")
        return f"json_extract({source}, ?)", [f'$."{key}"']

    def select(self, where: dict[str, Any] | None = None, sort: str | None = None) -> list[dict[str, Any]]:
        """Runs whose fields equal every ``where`` value (None matches a missing value), sorted by ``sort``
        (``-key`` descending; runs without the key last), as flat dicts: columns, result keys, config keys."""
        clauses, params = [], []
        with contextlib.closing(self._connect()) as db:
            for key, value in (where or {}).items():
                expr, args = self._expr(key, db)
                clauses.append(f"{expr} IS NULL" if value is None else f"{expr} = ?")
                params += args if value is None else [*args, value]
            order, order_params = "run_dir", []
            if sort:
                key = sort.removeprefix("-")
                expr, order_params = self._expr(key, db)
                order = f"{expr} IS NULL, {expr}{' DESC' if sort.startswith('-') else ''}, run_dir"
                order_params = order_params * 2
            sql = f"SELECT {', '.join(COLUMNS)}, result, config FROM runs"
            sql += f" WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = db.execute(f"{sql} ORDER BY {order}", [*params, *order_params]).fetchall()
        out = []
        for *values, result, config in rows:
            row = dict(zip(COLUMNS, values, strict=True))
            row["run_dir"] = str(self.root / row["run_dir"])
            out.append({**row, **json.loads(result), **json.loads(config)})
        return out

    def _table(self, where: dict[str, Any] | None, sort: str | None) -> tuple[list[str], list[dict[str, Any]]]:
        """Rows with every value a scalar (lists and mappings as JSON) and the union of their columns."""
        rows = [{k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in r.items()}
                for r in self.select(where, sort)]
        columns = list(dict.fromkeys([*COLUMNS, *(k for r in rows for k in r)]))
        return columns, rows

    def to_csv(self, path: str | Path, where: dict[str, Any] | None = None, sort: str | None = None) -> Path:
        columns, rows = self._table(where, sort)
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return Path(path)

    def to_parquet(self, path: str | Path, where: dict[str, Any] | None = None, sort: str | None = None) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns, rows = self._table(where, sort)
        arrays = {}
        for c in columns:
            values = [r.get(c) for r in rows]
            try:
                arrays[c] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # a key whose type differs between runs
                arrays[c] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        with atomic_path(path) as tmp:
            pq.write_table(pa.table(arrays), tmp)
        return Path(path)


# ---------------------------------------------------------------------------------------------------------
# `dataeff runs`

_HEADERS = {"weight_decay": "wd", "run_dir": "run"}


@dataclass
class RunsConfig:
    root: str = option("", "directory of runs (searched recursively for run directories); required")
    status: Literal["done", "failed", "partial"] | None = option(None, "only runs with this status: done, failed or partial (started, unfinished)")
    where: list[str] = option(
        [], "filters as key=value on a column (preset, lr, val_loss, ...), a dotted config key or a result key, "
        "e.g. where=[optim.weight_decay=0.8,train.epochs=4]",
    )
    sort: str | None = option(None, "sort by this key; -key sorts descending (e.g. sort=val_loss)")
    csv: str | None = option(None, "write the selected runs, with every config and result key, to this CSV file")
    parquet: str | None = option(None, "write the selected runs, with every config and result key, to this Parquet file")
    columns: list[str] = option(
        ["run_dir", "status", "preset", "params", "lr", "weight_decay", "epochs", "val_loss", "failure"],
        "columns of the printed table (a failure column without failures is left out)",
    )


def parse_where(items: list[str]) -> dict[str, Any]:
    where = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DataeffError(f"runs: filter {item!r} is not key=value, e.g. where=[status=done]")
        where[key.strip()] = parse_value(raw.strip())
    return where


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "params" and isinstance(value, int):
        return f"{value / 1e6:.2f}M"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    # Failure reasons can be long; the full one is in the run's FAILED file and in the exports.
    return text[:57] + "..." if column == "failure" and len(text) > 60 else text


def format_table(rows: list[dict[str, Any]], columns: list[str], root: Path | None = None) -> str:
    """The rows as an aligned text table; run directories are shown relative to ``root``."""
    columns = [c for c in columns if c != "failure" or any(r.get("failure") for r in rows)]
    shown = [{**r, "run_dir": str(Path(r["run_dir"]).relative_to(root))} if root and "run_dir" in r else r for r in rows]
    cells = [[_cell(c, r.get(c)) for c in columns] for r in shown]
    header = [_HEADERS.get(c, c) for c in columns]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [header, *cells]]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "partial")}
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def runs_command(cfg: RunsConfig) -> str:
    """The table ``dataeff runs`` prints, after writing the requested exports."""
    if not cfg.root:
        raise DataeffError("runs: root is required, e.g. dataeff runs runs/demo")
    where = parse_where(cfg.where)
    if cfg.status:
        where["status"] = cfg.status
    root = Path(cfg.root)
    if root.is_dir() and next(find_runs(root), None) is None:
        # Nothing to index: an index file would only litter a directory that holds no runs.
        return f"no run directories under {root}"
    store = RunStore(root)
    rows = store.select(where, cfg.sort)
    out = [format_table(rows, cfg.columns, root)]
    if cfg.csv:
        out.append(f"csv: {store.to_csv(cfg.csv, where, cfg.sort)}")
    if cfg.parquet:
        out.append(f"parquet: {store.to_parquet(cfg.parquet, where, cfg.sort)}")
    return "\n".join(out)
