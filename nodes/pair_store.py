"""The pair store: an artist's curated preference pairs, one folder per named store.

Layout of a store folder:
    pairs.sqlite           records (WAL mode: readers never wait for a writer, writers queue on one lock)
    images/ab/<sha256>.png image files, content-addressed, complete on disk before any row names them

Nothing here imports ComfyUI; the nodes and routes pass the base folder in. Messages are safe to show
anyone: they name the store, the pair or batch and files relative to the store folder, never a server path.

- Reads open the database read-only: showing a store never writes to it. The schema is created with the
  store (a complete database renamed into place) and upgraded by the first write after an update.
- Writers wait at most `busy_timeout` seconds for another writer, then fail with `StoreBusyError`.
- A writer killed at any point leaves a store that reopens with every pair intact (at worst an image file
  no row names; a cancelled or failed import leaves those too, and a retry reuses them).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sqlite3
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import quote

from PIL import Image

from ..trainer.atomic import FILE_MODE, fsync_path, write_bytes
from ..trainer.data.images import open_image  # PNG, JPEG, WebP only, as the trainer: nothing that shells out
from ..trainer.data.records import PreferenceExample

#: Store names: a letter or digit, then letters, digits, `_`, `-`, `.`; no path separators, no `..`.
STORE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
BATCH_ID_RE = re.compile(r"[0-9a-f]{32}")
IMAGE_NAME_RE = re.compile(r"[0-9a-f]{64}")  # sha256 of the file's bytes
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MARKS = ("chosen", "rejected", "none")
DB_NAME = "pairs.sqlite"
SCHEMA_VERSION = 2
BUSY_TIMEOUT = 30.0  # seconds a node waits for another writer; the routes pass a short one
IMPORT_CHUNK = 64  # pairs decoded, checked and staged at a time (bounds the image bytes held in memory)
IMPORT_THREADS = 8  # decoding releases the GIL and fsyncs wait on the disk: more threads than cores still help

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS images (
        sha TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL, created REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS batches (
        id TEXT PRIMARY KEY, prompt TEXT NOT NULL, images TEXT NOT NULL, created REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS marks (
        batch TEXT NOT NULL REFERENCES batches(id), idx INTEGER NOT NULL, mark TEXT NOT NULL,
        updated REAL NOT NULL, PRIMARY KEY (batch, idx))""",
    # UNIQUE (batch, ...) also indexes the per-batch lookups a mark makes
    """CREATE TABLE IF NOT EXISTS pairs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        prompt TEXT NOT NULL,
        chosen TEXT NOT NULL REFERENCES images(sha),
        rejected TEXT NOT NULL REFERENCES images(sha),
        source TEXT NOT NULL,
        batch TEXT,
        chosen_idx INTEGER,
        rejected_idx INTEGER,
        created REAL NOT NULL,
        UNIQUE (batch, chosen_idx, rejected_idx))""",
    # version 2: imported pairs are unique by content, so importing the same rows again adds nothing
    # (version 1 added a retried import's rows twice: keep the first copy), and the pairs are counted
    """DELETE FROM pairs WHERE source GLOB 'import *' AND id NOT IN (
        SELECT MIN(id) FROM pairs WHERE source GLOB 'import *' GROUP BY prompt, chosen, rejected)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS pairs_imported ON pairs (prompt, chosen, rejected) WHERE source GLOB 'import *'",
    # the number of pairs, kept by triggers: a mark reports the store's total without counting a million rows
    "CREATE TABLE IF NOT EXISTS counts (what TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    "INSERT OR REPLACE INTO counts VALUES ('pairs', (SELECT COUNT(*) FROM pairs))",
    """CREATE TRIGGER IF NOT EXISTS pairs_added AFTER INSERT ON pairs
        BEGIN UPDATE counts SET n = n + 1 WHERE what = 'pairs'; END""",
    """CREATE TRIGGER IF NOT EXISTS pairs_removed AFTER DELETE ON pairs
        BEGIN UPDATE counts SET n = n - 1 WHERE what = 'pairs'; END""",
    f"INSERT OR REPLACE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}')",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class StoreError(ValueError):
    """A bad store name, image or request; the message is safe to show the user."""


class StoreBusyError(StoreError):
    """Another process held the store's write lock for longer than the busy timeout."""


class StoreDamagedError(StoreError):
    """The store's database or records do not read (a corrupt or tampered pairs.sqlite)."""


class MissingImageError(StoreError):
    """A record names an image file that is no longer in the store."""


def check_store_name(name: str) -> str:
    if not isinstance(name, str) or not STORE_NAME_RE.fullmatch(name) or ".." in name:
        raise StoreError(
            f"invalid store name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def check_batch_id(batch: str) -> str:
    if not isinstance(batch, str) or not BATCH_ID_RE.fullmatch(batch):
        raise StoreError(f"invalid batch id {batch!r:.80}")
    return batch


def list_stores(base: str | Path) -> list[str]:
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir()
                  if STORE_NAME_RE.fullmatch(p.name) and ".." not in p.name and (p / DB_NAME).is_file())


def unknown_store(base: str | Path, name: str) -> StoreError:
    """'No such store', with the stores that do exist (never the folder they live in)."""
    names = list_stores(base)
    if not names:
        return StoreError(f"no pair store named {name!r}; no stores exist yet "
                          "(Add Pair, the Gallery Picker and Import Parquet create one)")
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    return StoreError(f"no pair store named {name!r}; existing stores: {shown}")


def check_image(data: bytes) -> tuple[int, int]:
    """Decode-check untrusted image bytes within limits; returns (width, height).

    Only PNG, JPEG and WebP are opened (`formats=`: Pillow never hands the bytes to another decoder,
    such as EPS's Ghostscript), and the size comes from the header before any pixel is decoded."""
    if not isinstance(data, (bytes, bytearray)):
        raise StoreError("image must be bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise StoreError(f"image too large: {len(data)} bytes (limit {MAX_IMAGE_BYTES})")
    try:
        with open_image(bytes(data)) as im:
            w, h = im.size
            if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
                raise StoreError(f"image size {w}x{h} is outside the limit of {MAX_IMAGE_PIXELS} pixels")
            im.load()
    except StoreError:
        raise
    except Image.UnidentifiedImageError:
        raise StoreError("image is not a PNG, JPEG or WebP file (other formats are refused)") from None
    except Exception as e:  # PIL raises many types on corrupt data
        raise StoreError(f"image does not decode: {e}") from None
    return w, h


@dataclass(frozen=True)
class CheckedImage:
    """Image bytes that passed `check_image`, with their content address."""

    sha: str
    width: int
    height: int
    data: bytes

    @classmethod
    def of(cls, data: bytes) -> "CheckedImage":
        w, h = check_image(data)
        return cls(hashlib.sha256(data).hexdigest(), w, h, bytes(data))


@dataclass(frozen=True)
class ImportSummary:
    """What an import did: `rows` pairs read (ties dropped unless kept), `added` new to the store."""

    rows: int
    added: int
    ties_dropped: int

    @property
    def already_there(self) -> int:
        return self.rows - self.added


class PairStore:
    """One named store. Constructing it touches nothing; every operation opens its own SQLite connection.

    `create=False` requires the store to exist; otherwise the first write creates it."""

    def __init__(self, base: str | Path, name: str, create: bool = True, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.name = check_store_name(name)
        self.base = Path(base).resolve()
        self.root = self.base / self.name
        if self.root.resolve().parent != self.base:  # a link out of the stores folder
            raise StoreError(f"store {name!r} is a link to outside the stores folder")
        self.db_path = self.root / DB_NAME
        self.images_dir = self.root / "images"
        self.busy_timeout, self.create = busy_timeout, create
        if not create and not self.db_path.is_file():
            raise unknown_store(self.base, self.name)

    # -- plumbing ---------------------------------------------------------------------------
    def _error(self, e: sqlite3.Error) -> StoreError:
        text = str(e)
        if isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
            return StoreBusyError(f"store {self.name!r} is busy: another process is writing to it; try again in a moment")
        return StoreDamagedError(f"store {self.name!r} is damaged: its {DB_NAME} does not read ({text}); "
                                 "restore it from a backup or use another store name")

    @contextmanager
    def _connection(self, readonly: bool) -> Iterator[sqlite3.Connection]:
        try:
            if readonly:
                uri = f"file:{quote(str(self.db_path))}?mode=ro"
                con = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout, isolation_level=None)
            else:
                con = sqlite3.connect(self.db_path, timeout=self.busy_timeout, isolation_level=None)
                con.execute("PRAGMA synchronous=FULL")
                con.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as e:
            raise self._error(e) from None
        try:
            yield con
        except sqlite3.Error as e:
            raise self._error(e) from None
        finally:
            con.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read-only snapshot of the store (a store to be created by its first write reads as empty)."""
        if not self.db_path.is_file():
            if not self.create:
                raise unknown_store(self.base, self.name)
            with closing(sqlite3.connect(":memory:", isolation_level=None)) as empty:
                for statement in _SCHEMA:
                    empty.execute(statement)
                yield empty
            return
        with self._connection(readonly=True) as con:
            con.execute("BEGIN")
            yield con
            con.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: writers queue on the lock, up to the busy timeout)."""
        self._create_if_missing()
        with self._connection(readonly=False) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(f"store {self.name!r} was written by a newer PrefAlign (schema {version}); update PrefAlign")
                if version < SCHEMA_VERSION:
                    for statement in _SCHEMA:
                        con.execute(statement)
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise

    def _create_if_missing(self) -> None:
        """Build a complete database beside the store's and link it into place: a store's pairs.sqlite is
        never an empty file, and when two processes create the same store at once the first one wins."""
        if self.db_path.is_file():
            return
        self.images_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{DB_NAME}.", suffix=".tmp")
        os.close(fd)
        try:
            os.chmod(tmp, FILE_MODE)  # the umask's mode, as sqlite3 would create it (mkstemp makes 0600)
            con = sqlite3.connect(tmp, isolation_level=None)
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("BEGIN")
                for statement in _SCHEMA:
                    con.execute(statement)
                con.execute("COMMIT")
            finally:
                con.close()
            fsync_path(Path(tmp))
            try:
                os.link(tmp, self.db_path)  # fails if the store appeared meanwhile: theirs wins
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not self.db_path.exists():
                    os.replace(tmp, self.db_path)
            fsync_path(self.root)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def image_path(self, sha: str) -> Path:
        """The file of an image record; a name that is no sha256 digest (a tampered record) is refused."""
        if not isinstance(sha, str) or not IMAGE_NAME_RE.fullmatch(sha):
            raise StoreDamagedError(f"store {self.name!r} is damaged: image name {sha!r:.80} is not a sha256 digest")
        return self.images_dir / sha[:2] / f"{sha}.png"

    def _shown(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _save_file(self, image: CheckedImage) -> None:
        """Write the image's file unless a complete copy is there (same name and size: same content)."""
        path = self.image_path(image.sha)
        try:
            if path.stat().st_size == len(image.data):
                return
        except FileNotFoundError:
            pass
        write_bytes(path, image.data)

    @staticmethod
    def _image_row(con: sqlite3.Connection, image: CheckedImage) -> None:
        con.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)", (image.sha, image.width, image.height, time.time()))

    def _batch_images(self, raw: str, batch: str) -> list[str]:
        try:
            shas = json.loads(raw)
        except (ValueError, RecursionError):
            shas = None
        if not isinstance(shas, list) or not all(isinstance(s, str) and IMAGE_NAME_RE.fullmatch(s) for s in shas):
            raise StoreDamagedError(f"store {self.name!r} is damaged: batch {batch} does not list image names")
        return shas

    def _check_file(self, sha: str, what: str) -> None:
        path = self.image_path(sha)
        if not path.is_file():
            raise MissingImageError(f"store {self.name!r}, {what}: image file {self._shown(path)} is missing")

    # -- pairs ------------------------------------------------------------------------------
    def add_pairs(self, pairs: Sequence[tuple[str, bytes, bytes]], source: str = "manual") -> list[int]:
        """Add (prompt, chosen, rejected) pairs of encoded images, all or none. Returns the pair ids."""
        checked = []
        for n, (prompt, chosen, rejected) in enumerate(pairs, 1):
            where = f"pair {n} of {len(pairs)}" if len(pairs) > 1 else "pair"
            if not isinstance(prompt, str):
                raise StoreError(f"{where}: prompt must be a string")
            checked.append((prompt, _checked(chosen, f"{where}, chosen"), _checked(rejected, f"{where}, rejected")))
        ids = []
        with self._write() as con:  # files are written under the lock, so they are complete before the rows
            for prompt, c, r in checked:
                for image in (c, r):
                    self._save_file(image)
                    self._image_row(con, image)
                cur = con.execute(
                    "INSERT INTO pairs (prompt, chosen, rejected, source, created) VALUES (?, ?, ?, ?, ?)",
                    (prompt, c.sha, r.sha, source, time.time()),
                )
                ids.append(int(cur.lastrowid))
        return ids

    def add_pair(self, prompt: str, chosen: bytes, rejected: bytes, source: str = "manual") -> int:
        """Add one pair from encoded images (PNG/JPEG/WebP bytes). Returns the pair id."""
        return self.add_pairs([(prompt, chosen, rejected)], source)[0]

    def count(self) -> int:
        with self._read() as con:
            return self._count(con)

    def _count(self, con: sqlite3.Connection) -> int:
        """The number of pairs (a version-1 store, not yet upgraded by a write, has no counter: count them)."""
        try:
            return int(con.execute("SELECT n FROM counts WHERE what = 'pairs'").fetchone()[0])
        except sqlite3.OperationalError:
            return int(con.execute("SELECT COUNT(*) FROM pairs").fetchone()[0])

    def pairs(self) -> list[dict]:
        keys = ("id", "prompt", "chosen", "rejected", "source", "batch", "chosen_idx", "rejected_idx", "created")
        with self._read() as con:
            rows = con.execute(f"SELECT {', '.join(keys)} FROM pairs ORDER BY id").fetchall()
        return [dict(zip(keys, row)) for row in rows]

    def delete_pair(self, pair_id: int, source: str | None = None) -> bool:
        """Delete one pair (only if it came from `source`, when given); False when no such pair was there."""
        with self._write() as con:
            if source is None:
                return con.execute("DELETE FROM pairs WHERE id = ?", (int(pair_id),)).rowcount > 0
            return con.execute("DELETE FROM pairs WHERE id = ? AND source = ?", (int(pair_id), source)).rowcount > 0

    def _check_pair_files(self, pairs: list[dict]) -> None:
        """Every image file the pairs name is there; else the first missing one is named, with a count."""
        missing = [(p["id"], role, path) for p in pairs for role in ("chosen", "rejected")
                   if not (path := self.image_path(p[role])).is_file()]
        if missing:
            pair, role, path = missing[0]
            more = f" ({len(missing) - 1} more files are missing)" if len(missing) > 1 else ""
            raise MissingImageError(f"store {self.name!r}, pair {pair}: the {role} image file {self._shown(path)} "
                                    f"is missing{more}; restore the store's images folder from a backup")

    def examples(self) -> list[PreferenceExample]:
        """Every pair as a trainer record (chosen first), images as file paths; refused if a file is missing."""
        pairs = self.pairs()
        self._check_pair_files(pairs)
        return [
            PreferenceExample(
                prompt=p["prompt"],
                images=(self.image_path(p["chosen"]), self.image_path(p["rejected"])),
                labels=(1.0, 0.0),
                source=f"store {self.name} pair {p['id']}",
            )
            for p in pairs
        ]

    def fingerprint(self) -> str:
        """Changes whenever the set of pairs changes (for ComfyUI's IS_CHANGED): ids only grow
        (AUTOINCREMENT), so an insert raises MAX(id) and a delete lowers the count."""
        with self._read() as con:
            n, top = self._count(con), con.execute("SELECT MAX(id) FROM pairs").fetchone()[0]
        return f"{self.name}:{n}:{top}"

    # -- gallery batches and marks -----------------------------------------------------------
    def add_batch(self, prompt: str, images: Sequence[bytes]) -> str:
        """Record a generated batch the artist will pick from; returns its id."""
        if not images:
            raise StoreError("empty batch")
        checked = [_checked(data, f"image {i}") for i, data in enumerate(images)]
        batch = uuid.uuid4().hex
        with self._write() as con:
            for image in checked:
                self._save_file(image)
                self._image_row(con, image)
            con.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?)", (batch, prompt, json.dumps([i.sha for i in checked]), time.time())
            )
        return batch

    def _batch(self, con: sqlite3.Connection, batch: str) -> tuple[str, list[str]]:
        row = con.execute("SELECT prompt, images FROM batches WHERE id = ?", (batch,)).fetchone()
        if row is None:
            raise StoreError(f"no batch {batch} in store {self.name!r}")
        return row[0], self._batch_images(row[1], batch)

    def _batch_state(self, con: sqlite3.Connection, batch: str) -> dict:
        prompt, images = self._batch(con, batch)
        marks = dict(con.execute("SELECT idx, mark FROM marks WHERE batch = ?", (batch,)).fetchall())
        n_pairs = int(con.execute("SELECT COUNT(*) FROM pairs WHERE batch = ?", (batch,)).fetchone()[0])
        shown = [marks.get(i, "none") for i in range(len(images))]
        return {
            "store": self.name,
            "batch": batch,
            "prompt": prompt,
            "count": len(images),
            "marks": shown,
            "pairs": n_pairs,
            "total_pairs": self._count(con),
            "message": _pairs_message(shown, n_pairs),
        }

    def batch_state(self, batch: str) -> dict:
        check_batch_id(batch)
        with self._read() as con:
            return self._batch_state(con, batch)

    def set_mark(self, batch: str, index: int, mark: str) -> dict:
        """Mark one image of a batch; the batch's pairs become every chosen x rejected pairing."""
        check_batch_id(batch)
        if mark not in MARKS:
            raise StoreError(f"mark must be one of {', '.join(MARKS)}")
        if not isinstance(index, int) or isinstance(index, bool):
            raise StoreError("index must be an integer")
        with self._write() as con:
            prompt, shas = self._batch(con, batch)
            if not 0 <= index < len(shas):
                raise StoreError(f"index {index} is outside the batch of {len(shas)}")
            if mark == "none":
                con.execute("DELETE FROM marks WHERE batch = ? AND idx = ?", (batch, index))
            else:
                self._check_file(shas[index], f"batch {batch}, image {index}")
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
                for i in (c, r):
                    self._check_file(shas[i], f"batch {batch}, image {i}")
                con.execute(
                    "INSERT INTO pairs (prompt, chosen, rejected, source, batch, chosen_idx, rejected_idx, created)"
                    " VALUES (?, ?, ?, 'gallery', ?, ?, ?, ?)",
                    (prompt, shas[c], shas[r], batch, c, r, now),
                )
            return self._batch_state(con, batch)

    def _batch_file(self, shas: list[str], batch: str, index: int) -> str:
        """The content address of image `index` of a batch whose images are `shas`, its file checked."""
        if not 0 <= index < len(shas):
            raise StoreError(f"index {index} is outside the batch of {len(shas)}")
        self._check_file(shas[index], f"batch {batch}, image {index}")
        return shas[index]

    def batch_image(self, batch: str, index: int) -> bytes:
        """The bytes of one image of a batch (what the gallery shows)."""
        check_batch_id(batch)
        with self._read() as con:
            _, shas = self._batch(con, batch)
        return self.image_path(self._batch_file(shas, batch, index)).read_bytes()

    def batch_shas(self, batch: str) -> list[str]:
        """The sha256 of each image of a batch, in order (its files are named by them); refused if a file is missing."""
        check_batch_id(batch)
        with self._read() as con:
            _, shas = self._batch(con, batch)
        return [self._batch_file(shas, batch, i) for i in range(len(shas))]

    def add_batch_pair(self, batch: str, chosen: int, rejected: int, source: str = "manual") -> int:
        """Add a pair of two images of a batch, with the batch's prompt (the images are in the store already).
        Unlike a mark, the pair is not the batch's: marking the batch never deletes it. Returns the pair id."""
        check_batch_id(batch)
        with self._write() as con:
            prompt, shas = self._batch(con, batch)
            pair = (prompt, self._batch_file(shas, batch, chosen), self._batch_file(shas, batch, rejected))
            cur = con.execute("INSERT INTO pairs (prompt, chosen, rejected, source, created) VALUES (?, ?, ?, ?, ?)",
                              (*pair, source, time.time()))
        return int(cur.lastrowid)

    # -- Pick-a-Pic parquet -------------------------------------------------------------------
    def export_parquet(self, path: str | Path) -> int:
        """Write every pair as a Pick-a-Pic style parquet file (chosen = jpg_0, label_0 = 1)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ..trainer.atomic import atomic_path

        rows = self.pairs()
        if not rows:
            raise StoreError(f"store {self.name!r} has no pairs to export")
        self._check_pair_files(rows)  # before anything is written
        schema = pa.schema([
            ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
            ("label_0", pa.float64()), ("label_1", pa.float64()), ("has_label", pa.bool_()),
            ("are_different", pa.bool_()), ("image_0_uid", pa.string()), ("image_1_uid", pa.string()),
            ("ranking_id", pa.int64()), ("best_image_uid", pa.string()),
        ])
        with atomic_path(Path(path)) as tmp:
            writer = pq.ParquetWriter(str(tmp), schema)
            try:
                for start in range(0, len(rows), 64):
                    chunk = rows[start:start + 64]
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

    def import_parquet(
        self, path: str | Path, keep_ties: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> ImportSummary:
        """Add the pairs of a Pick-a-Pic style parquet file (or folder of them), all or none.

        Rows are read by the trainer's parquet reader (its row rules and limits) and their images checked
        and written in parallel, a chunk at a time, while the records wait in a private staging database;
        one transaction then adds them. `progress(done, total)` is called after each chunk; an exception
        it raises (ComfyUI's Cancel) stops the import with nothing added. Imported pairs are unique by
        content, so importing the same rows again adds nothing."""
        source = _pair_rows(path, keep_ties)
        total, origin = len(source), f"import {Path(path).name}"
        staging = sqlite3.connect("", isolation_level=None)  # a private temporary database, gone when closed
        try:
            staging.execute("CREATE TABLE images (sha TEXT PRIMARY KEY, width INTEGER, height INTEGER)")
            staging.execute("CREATE TABLE pairs (prompt TEXT, chosen TEXT, rejected TEXT)")
            done = 0
            with ThreadPoolExecutor(IMPORT_THREADS) as pool:
                for chunk in _chunks(_read_rows(source), IMPORT_CHUNK):
                    staged = list(pool.map(self._stage_pair, chunk))
                    staging.execute("BEGIN")
                    staging.executemany("INSERT OR IGNORE INTO images VALUES (?, ?, ?)",
                                        [(i.sha, i.width, i.height) for _, c, r in staged for i in (c, r)])
                    staging.executemany("INSERT INTO pairs VALUES (?, ?, ?)", [(p, c.sha, r.sha) for p, c, r in staged])
                    staging.execute("COMMIT")
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            added = 0
            if done:
                with self._write() as con:
                    now = time.time()
                    con.executemany("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)",
                                    ((*row, now) for row in staging.execute("SELECT sha, width, height FROM images")))
                    added = con.executemany(
                        "INSERT OR IGNORE INTO pairs (prompt, chosen, rejected, source, created) VALUES (?, ?, ?, ?, ?)",
                        ((*row, origin, now) for row in staging.execute("SELECT prompt, chosen, rejected FROM pairs ORDER BY rowid")),
                    ).rowcount
        finally:
            staging.close()
        return ImportSummary(rows=total, added=added, ties_dropped=source.stats.ties_dropped)

    def _stage_pair(self, example: PreferenceExample) -> tuple[str, CheckedImage, CheckedImage]:
        """Check both images of an imported row and write their files (the records come later)."""
        checked = []
        for role, image in zip(("chosen", "rejected"), example.images):
            if not isinstance(image, bytes):
                raise StoreError(f"{example.source}: the {role} image is a file path, not image bytes; "
                                 "a store imports images stored in the parquet file")
            checked.append(_checked(image, f"{example.source}, {role}"))
        for image in checked:
            self._save_file(image)
        return example.prompt, checked[0], checked[1]


def _checked(data: bytes, where: str) -> CheckedImage:
    try:
        return CheckedImage.of(data)
    except StoreError as e:
        raise StoreError(f"{where}: {e}") from None


def _pairs_message(marks: list[str], n_pairs: int) -> str:
    """What a batch's marks amount to, so a batch that gives no pairs says why."""
    chosen, rejected = marks.count("chosen"), marks.count("rejected")
    if n_pairs:
        return f"{n_pairs} pair{'s' if n_pairs != 1 else ''} from this batch ({chosen} chosen x {rejected} rejected)"
    if not chosen and not rejected:
        return "0 pairs yet: mark at least one image chosen and one rejected"
    return f"0 pairs: mark at least one image {'rejected' if chosen else 'chosen'}"


def _pair_rows(path: str | Path, keep_ties: bool):
    """The trainer's parquet reader over a Pick-a-Pic style file or folder (labels checked up front)."""
    from ..trainer.data.errors import DataError
    from ..trainer.data.parquet import ParquetSource

    try:
        source = ParquetSource(Path(path), keep_ties=keep_ties, cache_bytes=0)  # one row group in memory at a time
    except DataError as e:
        raise StoreError(str(e)) from None
    if not source.paired:
        raise StoreError(f"{path}: holds unpaired rows (jpg, label); a store holds pairs (caption, jpg_0, jpg_1, "
                         "label_0, label_1)")
    return source


def _read_rows(source) -> Iterator[PreferenceExample]:
    from ..trainer.data.errors import DataError

    try:
        for shard in range(source.num_shards()):
            yield from source.read_shard(shard)
    except DataError as e:
        raise StoreError(str(e)) from None


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
