"""The jobs a server keeps across its restarts (POST /jobs; docs/jobs.md): a row for each in SQLite,
<state-dir>/jobs.sqlite3 (its request, where it stands, how often it started, how it ended), and its pictures as PNG
files in <state-dir>/jobs/<id>/ beside it, not in the database. One server owns a state folder at a time (an OS lock
on <state-dir>/imagine.lock). A database that cannot be used, corrupted or locked by another program, is moved aside,
with its pictures, and a fresh one started: the server starts, and its log says so."""

import errno
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from engine.errors import ImagineError
from engine.job_codec import event_data, event_from_data, request_data, request_from_data
from engine.logs import escaped
from engine.request import GenerationRequest

log = logging.getLogger("imagine")

DATABASE = "jobs.sqlite3"
LOCK = "imagine.lock"
PICTURES = "jobs"  # a folder for each job's pictures, named by its id
# Free space a new job needs beyond its pictures' (n at --max-size, 3 bytes a pixel: PNG rarely does worse): the
# database and its log grow, and the disk is shared.
RESERVE = 64 * 2**20
# How long a write waits on a lock before it fails: nothing but this server writes here, so a wait means another
# program holds the file, which at start is found at once rather than at the first job.
BUSY_SECONDS = 2.0
SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order jobs were accepted in, which they run in
    id TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    request TEXT NOT NULL,  -- engine/job_codec.py's data, its pictures in jobs/<id>/
    status TEXT NOT NULL,  -- queued, running, done, failed or cancelled
    attempts INTEGER NOT NULL DEFAULT 0,  -- how often it started running
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    last_id INTEGER NOT NULL DEFAULT 0,  -- its event stream's last id: a client's Last-Event-ID counts on
    created REAL NOT NULL,  -- wall-clock times, time.time()
    started REAL,
    finished REAL,
    error TEXT,
    result TEXT  -- a done job's Finished event as job_codec's data, its pictures in jobs/<id>/
)"""


class FolderUnusable(Exception):
    """The state folder cannot be used: another server owns it, or it cannot be made or written. The message says
    which, and what to do; imagine.py ends the start with it."""


class JobLedger:
    """The jobs kept in a state folder, which it owns while it is open. Its methods are called from the HTTP threads
    and the engine's; one writes at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lock = take_folder(folder)
        try:
            self.db = open_database(folder / DATABASE, folder / PICTURES)
        except (OSError, sqlite3.Error) as error:  # a fresh database cannot be made either: nothing to put aside
            self.lock.close()
            raise FolderUnusable(f"imagine: cannot keep jobs in {where(folder)}: {error}") from None
        self.writing = threading.Lock()
        self.tidy()

    def pictures(self, job_id: str) -> Path:
        return self.folder / PICTURES / job_id

    def check_room(self, req: GenerationRequest, max_size: int) -> None:
        """Refuses with 507, before any work, a job whose pictures the state folder's disk may not hold."""
        needed = req.n * max_size * max_size * 3 + RESERVE
        free = shutil.disk_usage(self.folder).free
        if free < needed:
            raise disk_full(f"{megabytes(free)} free there, and a job of {req.n} pictures keeps {megabytes(needed)}")

    def add(self, job_id: str, req: GenerationRequest, created: float) -> None:
        """Keeps a new job, queued, its input pictures as files; committed when it returns. A disk that is full
        refuses it with 507, keeping nothing."""
        folder = self.pictures(job_id)
        try:
            folder.mkdir(parents=True)
            data = json.dumps(request_data(req, folder))
            with self.writing:
                self.db.execute(
                    "INSERT INTO jobs (id, prompt, request, status, steps, created) VALUES (?, ?, ?, 'queued', ?, ?)",
                    (job_id, req.prompt, data, req.num_steps or 0, created),
                )
        except (OSError, sqlite3.Error) as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise refusal(error) from None

    def update(self, job_id: str, **columns) -> None:
        """Sets the job's `columns` (SCHEMA's names) to their values."""
        assignments = ", ".join(f"{name} = ?" for name in columns)
        with self.writing:
            self.db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*columns.values(), job_id))

    def finish(self, job_id: str, event, **columns) -> None:
        """Keeps a done job's Finished `event`, its pictures as PNG files carrying their settings, and `columns`."""
        data = json.dumps(event_data(event, self.pictures(job_id)))
        self.update(job_id, result=data, **columns)

    def requeue(self, job_id: str, last_id: int) -> None:
        """Puts a job the server stopped on purpose back in the queue; a running one gets its attempt back, as its
        stop was no fault of its own."""
        with self.writing:
            self.db.execute(
                "UPDATE jobs SET status = 'queued', attempts = attempts - (status = 'running'), step = 0, last_id = ? "
                "WHERE id = ?",
                (last_id, job_id),
            )

    def rows(self) -> list:
        """Every job kept, as dicts of SCHEMA's columns, in the order they were accepted."""
        with self.writing:
            return [dict(row) for row in self.db.execute("SELECT * FROM jobs ORDER BY seq")]

    def read_request(self, row: dict) -> GenerationRequest:
        return request_from_data(json.loads(row["request"]), self.pictures(row["id"]))

    def read_result(self, row: dict):
        return event_from_data(json.loads(row["result"]), self.pictures(row["id"]))

    def forget(self, job_ids: list) -> None:
        """Deletes the jobs' rows and their pictures."""
        if not job_ids:
            return
        with self.writing:
            self.db.execute(f"DELETE FROM jobs WHERE id IN ({', '.join('?' * len(job_ids))})", job_ids)
        for job_id in job_ids:
            shutil.rmtree(self.pictures(job_id), ignore_errors=True)

    def tidy(self) -> None:
        """Deletes the picture folders no row names: those of a job the server was adding when it stopped."""
        kept = {row["id"] for row in self.rows()}
        for folder in (self.folder / PICTURES).glob("*"):
            if folder.name not in kept:
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """Closes the database and gives the state folder up, for another server to own."""
        self.db.close()
        self.lock.close()


def take_folder(folder: Path):
    """Makes the state folder and takes its lock, writing this process's id in the lock file; the lock goes with
    the process, however it ends (kill -9 included)."""
    try:
        (folder / PICTURES).mkdir(parents=True, exist_ok=True)
        lock = open(folder / LOCK, "a+")  # noqa: SIM115 - held open as long as the server runs
    except OSError as error:
        raise FolderUnusable(f"imagine: cannot use {where(folder)}: {error.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip()
        lock.close()
        process = f" (process {owner})" if owner.isdigit() else ""
        raise FolderUnusable(
            f"imagine: {where(folder)} is in use by another Imagine server{process}: one server keeps its jobs there "
            "at a time; stop that one, or give this one a state folder of its own with --state-dir"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def where(folder: Path) -> str:
    return f"the state folder {escaped(folder)} (--state-dir, IMAGINE_STATE_DIR)"


def open_database(path: Path, pictures: Path) -> sqlite3.Connection:
    """The database at `path`, made where there is none; one that cannot be used is moved aside, its pictures
    with it, and a fresh one made."""
    try:
        return usable_database(path)
    except sqlite3.DatabaseError as error:
        why = "is locked by another program" if "locked" in str(error) else f"cannot be read ({error})"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.bad-{stamp}")
    for suffix in ("", "-wal", "-shm", "-journal"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            companion.rename(aside.with_name(aside.name + suffix))
    pictures.rename(pictures.with_name(f"{pictures.name}.bad-{stamp}"))
    pictures.mkdir()
    log.warning(
        "the job database %s %s: moved it aside to %s, with its pictures, and started a fresh one; the jobs it held "
        "are not run",
        escaped(path), why, escaped(aside),
    )  # fmt: skip
    return usable_database(path)


def usable_database(path: Path) -> sqlite3.Connection:
    """The database opened and checked, its table made: a file that is no database, a damaged one and one that
    another program holds locked each fail here (sqlite3.DatabaseError), not at the first job."""
    db = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    try:
        # WAL with synchronous=NORMAL: a commit survives the process being killed (the crash, upgrade or
        # out-of-memory kill) without an fsync at each step's write; a power cut may lose the last few.
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        db.execute("BEGIN IMMEDIATE")  # takes the write lock, as each job's writes will
        db.execute(SCHEMA)
        db.execute("COMMIT")
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def refusal(error: Exception) -> ImagineError:
    """The error a job that could not be kept is refused with: 507 where the disk is full."""
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    full = full or isinstance(error, sqlite3.Error) and "full" in str(error)  # SQLITE_FULL: "database or disk is full"
    if full:
        return disk_full("it is full")
    return ImagineError(f"the server cannot keep the job in its state folder: {error}", 500)


def disk_full(detail: str) -> ImagineError:
    return ImagineError(
        f"the disk of the server's state folder (--state-dir) has no room for another job: {detail}; try again once "
        "jobs were collected, or free space there",
        507,
    )


def megabytes(size: int) -> str:
    return f"{size / 1e6:.0f} MB"
