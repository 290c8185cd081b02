"""The pair store: an artist's curated preference pairs, one folder per named store.

Layout of a store folder:
    pairs.sqlite          records (WAL mode, safe for concurrent writers across processes)
    images/ab/<sha256>.png image files, content-addressed, written atomically before any row names them

Nothing here imports ComfyUI; the nodes and routes pass the base folder in.
A record only ever names files that are already complete on disk, so a writer killed at any point
leaves a store that reopens with every pair intact (at worst an unreferenced image file).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image

from ..trainer.atomic import atomic_path, write_bytes
from ..trainer.data.records import PreferenceExample

#: Store names: a letter or digit, then letters, digits, `_`, `-`, `.`; no path separators, no `..`.
STORE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BATCH_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MARKS = ("chosen", "rejected", "none")
DB_NAME = "pairs.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    sha TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, prompt TEXT NOT NULL, images TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS marks (
    batch TEXT NOT NULL REFERENCES batches(id), idx INTEGER NOT NULL, mark TEXT NOT NULL,
    updated REAL NOT NULL, PRIMARY KEY (batch, idx));
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt TEXT NOT NULL,
    chosen TEXT NOT NULL REFERENCES images(sha),
    rejected TEXT NOT NULL REFERENCES images(sha),
    source TEXT NOT NULL,
    batch TEXT,
    chosen_idx INTEGER,
    rejected_idx INTEGER,
    created REAL NOT NULL,
    UNIQUE (batch, chosen_idx, rejected_idx));
"""


class StoreError(ValueError):
    """A bad store name, image or request; the message is safe to show the user."""


def check_store_name(name: str) -> str:
    if not isinstance(name, str) or not STORE_NAME_RE.match(name) or ".." in name:
        raise StoreError(
            f"invalid store name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def check_batch_id(batch: str) -> str:
    if not isinstance(batch, str) or not BATCH_ID_RE.match(batch):
        raise StoreError(f"invalid batch id {batch!r}")
    return batch


def list_stores(base: str | Path) -> list[str]:
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and STORE_NAME_RE.match(p.name) and (p / DB_NAME).is_file())


def check_image(data: bytes) -> tuple[int, int]:
    """Decode-check untrusted image bytes within limits; returns (width, height)."""
    if not isinstance(data, (bytes, bytearray)):
        raise StoreError("image must be bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise StoreError(f"image too large: {len(data)} bytes (limit {MAX_IMAGE_BYTES})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size  # header only: checked before any pixel is decoded
            if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
                raise StoreError(f"image size {w}x{h} is outside the limit of {MAX_IMAGE_PIXELS} pixels")
            if im.format not in ("PNG", "JPEG", "WEBP"):
                raise StoreError(f"unsupported image format {im.format}")
            im.load()
    except StoreError:
        raise
    except Exception as e:  # PIL raises many types on corrupt data
        raise StoreError(f"image does not decode: {e}") from None
    return w, h


def encode_png(pil_image: Image.Image) -> bytes:
    buf = io.BytesIO()
    pil_image.save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


class PairStore:
    """One named store. Cheap to construct; every operation opens its own SQLite connection."""

    def __init__(self, base: str | Path, name: str, create: bool = True) -> None:
        self.name = check_store_name(name)
        self.base = Path(base).resolve()
        self.root = (self.base / self.name).resolve()
        if self.root.parent != self.base:  # belt and braces on top of the name check
            raise StoreError(f"store {name!r} resolves outside {self.base}")
        self.db_path = self.root / DB_NAME
        self.images_dir = self.root / "images"
        if not self.db_path.exists():
            if not create:
                raise StoreError(f"no pair store named {name!r} in {self.base}")
            self.images_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(_SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- plumbing ---------------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            yield con
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: writers queue on the lock instead of failing)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def image_path(self, sha: str) -> Path:
        return self.images_dir / sha[:2] / f"{sha}.png"

    def _put_image(self, data: bytes) -> tuple[str, int, int]:
        """Check, then write the file atomically (once per content); the row comes later."""
        w, h = check_image(data)
        sha = hashlib.sha256(data).hexdigest()
        path = self.image_path(sha)
        if not path.is_file():
            write_bytes(path, bytes(data))
        return sha, w, h

    @staticmethod
    def _image_row(con: sqlite3.Connection, sha: str, w: int, h: int) -> None:
        con.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)", (sha, w, h, time.time()))

    # -- pairs ------------------------------------------------------------------------------
    def add_pair(self, prompt: str, chosen: bytes, rejected: bytes, source: str = "manual") -> int:
        """Add one pair from encoded images (PNG/JPEG/WebP bytes). Returns the pair id."""
        if not isinstance(prompt, str):
            raise StoreError("prompt must be a string")
        c = self._put_image(chosen)
        r = self._put_image(rejected)
        with self._write() as con:
            self._image_row(con, *c)
            self._image_row(con, *r)
            cur = con.execute(
                "INSERT INTO pairs (prompt, chosen, rejected, source, created) VALUES (?, ?, ?, ?, ?)",
                (prompt, c[0], r[0], source, time.time()),
            )
            return int(cur.lastrowid)

    def count(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM pairs").fetchone()[0])

    def pairs(self) -> list[dict]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT id, prompt, chosen, rejected, source, batch, chosen_idx, rejected_idx, created FROM pairs ORDER BY id"
            ).fetchall()
        keys = ("id", "prompt", "chosen", "rejected", "source", "batch", "chosen_idx", "rejected_idx", "created")
        return [dict(zip(keys, row)) for row in rows]

    def delete_pair(self, pair_id: int) -> bool:
        with self._write() as con:
            return con.execute("DELETE FROM pairs WHERE id = ?", (int(pair_id),)).rowcount > 0

    def examples(self) -> list[PreferenceExample]:
        """Every pair as a trainer record (chosen first), images as file paths."""
        return [
            PreferenceExample(
                prompt=p["prompt"],
                images=(self.image_path(p["chosen"]), self.image_path(p["rejected"])),
                labels=(1.0, 0.0),
                source=f"store {self.name} pair {p['id']}",
            )
            for p in self.pairs()
        ]

    def fingerprint(self) -> str:
        """Changes whenever the set of pairs changes (for ComfyUI's IS_CHANGED)."""
        with self._connect() as con:
            n, top, last = con.execute("SELECT COUNT(*), MAX(id), MAX(created) FROM pairs").fetchone()
        return f"{self.name}:{n}:{top}:{last}"

    # -- gallery batches and marks -----------------------------------------------------------
    def add_batch(self, prompt: str, images: Sequence[bytes]) -> str:
        """Record a generated batch the artist will pick from; returns its id."""
        if not images:
            raise StoreError("empty batch")
        shas = [self._put_image(data) for data in images]
        batch = uuid.uuid4().hex
        with self._write() as con:
            for s in shas:
                self._image_row(con, *s)
            con.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?)", (batch, prompt, json.dumps([s[0] for s in shas]), time.time())
            )
        return batch

    def batch_state(self, batch: str) -> dict:
        check_batch_id(batch)
        with self._connect() as con:
            row = con.execute("SELECT prompt, images FROM batches WHERE id = ?", (batch,)).fetchone()
            if row is None:
                raise StoreError(f"no batch {batch} in store {self.name!r}")
            marks = dict(con.execute("SELECT idx, mark FROM marks WHERE batch = ?", (batch,)).fetchall())
            n_pairs = con.execute("SELECT COUNT(*) FROM pairs WHERE batch = ?", (batch,)).fetchone()[0]
        images = json.loads(row[1])
        return {
            "store": self.name,
            "batch": batch,
            "prompt": row[0],
            "count": len(images),
            "marks": [marks.get(i, "none") for i in range(len(images))],
            "pairs": int(n_pairs),
            "total_pairs": self.count(),
        }

    def set_mark(self, batch: str, index: int, mark: str) -> dict:
        """Mark one image of a batch; the batch's pairs become every chosen x rejected pairing."""
        check_batch_id(batch)
        if mark not in MARKS:
            raise StoreError(f"mark must be one of {', '.join(MARKS)}")
        if not isinstance(index, int) or isinstance(index, bool):
            raise StoreError("index must be an integer")
        with self._write() as con:
            row = con.execute("SELECT prompt, images FROM batches WHERE id = ?", (batch,)).fetchone()
            if row is None:
                raise StoreError(f"no batch {batch} in store {self.name!r}")
            prompt, shas = row[0], json.loads(row[1])
            if not 0 <= index < len(shas):
                raise StoreError(f"index {index} is outside the batch of {len(shas)}")
            if mark == "none":
                con.execute("DELETE FROM marks WHERE batch = ? AND idx = ?", (batch, index))
            else:
                con.execute("INSERT OR REPLACE INTO marks VALUES (?, ?, ?, ?)", (batch, index, mark, time.time()))
            marks = dict(con.execute("SELECT idx, mark FROM marks WHERE batch = ?", (batch,)).fetchall())
            chosen = sorted(i for i, m in marks.items() if m == "chosen")
            rejected = sorted(i for i, m in marks.items() if m == "rejected")
            wanted = set(itertools.product(chosen, rejected))
            have = {
                (c, r): pid
                for pid, c, r in con.execute(
                    "SELECT id, chosen_idx, rejected_idx FROM pairs WHERE batch = ?", (batch,)
                ).fetchall()
            }
            for key, pid in have.items():
                if key not in wanted:
                    con.execute("DELETE FROM pairs WHERE id = ?", (pid,))
            now = time.time()
            for c, r in sorted(wanted - set(have)):
                con.execute(
                    "INSERT INTO pairs (prompt, chosen, rejected, source, batch, chosen_idx, rejected_idx, created)"
                    " VALUES (?, ?, ?, 'gallery', ?, ?, ?, ?)",
                    (prompt, shas[c], shas[r], batch, c, r, now),
                )
        return self.batch_state(batch)

    def batch_image_path(self, batch: str, index: int) -> Path:
        check_batch_id(batch)
        with self._connect() as con:
            row = con.execute("SELECT images FROM batches WHERE id = ?", (batch,)).fetchone()
        if row is None:
            raise StoreError(f"no batch {batch} in store {self.name!r}")
        shas = json.loads(row[0])
        if not 0 <= index < len(shas):
            raise StoreError(f"index {index} is outside the batch of {len(shas)}")
        return self.image_path(shas[index])

    # -- Pick-a-Pic parquet -------------------------------------------------------------------
    def export_parquet(self, path: str | Path) -> int:
        """Write every pair as a Pick-a-Pic style parquet file (chosen = jpg_0, label_0 = 1)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = self.pairs()
        schema = pa.schema([
            ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
            ("label_0", pa.float64()), ("label_1", pa.float64()), ("has_label", pa.bool_()),
            ("are_different", pa.bool_()), ("image_0_uid", pa.string()), ("image_1_uid", pa.string()),
            ("ranking_id", pa.int64()), ("best_image_uid", pa.string()),
        ])
        path = Path(path)
        with atomic_path(path) as tmp:
            writer = pq.ParquetWriter(str(tmp), schema)
            try:
                for chunk_start in range(0, max(len(rows), 1), 64):
                    chunk = rows[chunk_start:chunk_start + 64]
                    if not chunk:
                        break
                    table = pa.table({
                        "caption": [r["prompt"] for r in chunk],
                        "jpg_0": [self.image_path(r["chosen"]).read_bytes() for r in chunk],
                        "jpg_1": [self.image_path(r["rejected"]).read_bytes() for r in chunk],
                        "label_0": [1.0] * len(chunk),
                        "label_1": [0.0] * len(chunk),
                        "has_label": [True] * len(chunk),
                        "are_different": [r["chosen"] != r["rejected"] for r in chunk],
                        "image_0_uid": [r["chosen"] for r in chunk],
                        "image_1_uid": [r["rejected"] for r in chunk],
                        "ranking_id": [r["id"] for r in chunk],
                        "best_image_uid": [r["chosen"] for r in chunk],
                    }, schema=schema)
                    writer.write_table(table)
            finally:
                writer.close()
        return len(rows)

    def import_parquet(self, path: str | Path, keep_ties: bool = False) -> int:
        """Add the rows of a Pick-a-Pic style parquet file (or folder of them); returns pairs added."""
        import pyarrow.parquet as pq

        path = Path(path)
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise StoreError(f"no parquet file at {path}")
        added = 0
        for file in files:
            pf = pq.ParquetFile(str(file))
            missing = {"caption", "jpg_0", "jpg_1", "label_0"} - set(pf.schema_arrow.names)
            if missing:
                raise StoreError(f"{file.name} is not Pick-a-Pic style: missing columns {', '.join(sorted(missing))}")
            for batch in pf.iter_batches(batch_size=64, columns=["caption", "jpg_0", "jpg_1", "label_0"]):
                for row in batch.to_pylist():
                    label = float(row["label_0"])
                    a, b = _image_bytes(row["jpg_0"]), _image_bytes(row["jpg_1"])
                    if label == 0.5 and not keep_ties:
                        continue
                    chosen, rejected = (a, b) if label >= 0.5 else (b, a)
                    self.add_pair(row["caption"] or "", chosen, rejected, source=f"import {file.name}")
                    added += 1
        return added


def _image_bytes(value) -> bytes:
    """Parquet image cells are raw bytes, or HF's {bytes, path} struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise StoreError("image cell holds no bytes")
    return bytes(value)
