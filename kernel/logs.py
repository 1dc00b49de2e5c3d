"""Structured log records of one Kernel: a ring buffer for the API, a file, subscribers."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from kernel.private_files import make_private_dir, make_private_file, tighten


@attrs.frozen
class LogRecord:
    """One log record as the API shows it."""

    seq: int
    time: float
    level: str
    logger: str
    plugin: str | None
    message: str
    exc_text: str | None = None


LogSubscriber = Callable[[LogRecord], None]

#: What makes two records "the same" to `RepeatFilter`: logger, level, message template.
_Kind = tuple[str, int, str]


class RepeatFilter(logging.Filter):
    """Lets through at most `limit` records of one kind (same logger, level and message
    template, whatever the arguments) per `interval` seconds, and drops the rest; once
    that interval is over, the next record to pass the filter is preceded by one record
    "suppressed N similar messages" for them, given to `report` (the handler's `handle`).

    A flood of one message (a failing accept loop logs each attempt) then costs a few
    lines per interval instead of filling the disk. Thread-safe: records come from
    worker threads and the watchdog too.
    """

    #: Kinds tracked at once; beyond, those without suppressed records are forgotten.
    MAX_KINDS = 4096

    def __init__(
        self,
        limit: int = 20,
        interval: float = 10.0,
        *,
        report: Callable[[logging.LogRecord], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.limit = limit
        self.interval = interval
        self.report = report
        self.clock = clock
        self._lock = threading.Lock()
        #: kind -> [window start, records in the window]
        self._windows: dict[_Kind, list[float]] = {}
        #: kind -> [records suppressed, the first of them] for kinds over their limit
        self._suppressed: dict[_Kind, list[Any]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "nekobot_summary", False):
            return True
        now = self.clock()
        kind = (record.name, record.levelno, str(record.msg))
        with self._lock:
            due = self._due(now)
            window = self._windows.get(kind)
            if window is None or now - window[0] >= self.interval:
                if len(self._windows) >= self.MAX_KINDS:
                    self._forget()
                window = self._windows[kind] = [now, 0]
            window[1] += 1
            allowed = window[1] <= self.limit
            if not allowed:
                held = self._suppressed.setdefault(kind, [0, record])
                held[0] += 1
        if self.report is not None:
            for summary in due:
                self.report(summary)
        return allowed

    def _due(self, now: float) -> list[logging.LogRecord]:
        """Summaries of the kinds whose window with suppressed records is over."""
        if not self._suppressed:
            return []
        out = []
        for kind, (count, first) in list(self._suppressed.items()):
            if now - self._windows[kind][0] >= self.interval:
                del self._suppressed[kind]
                del self._windows[kind]
                out.append(self._summary(count, first))
        return out

    def _summary(self, count: int, first: logging.LogRecord) -> logging.LogRecord:
        template = str(first.msg)
        if len(template) > 200:
            template = template[:200] + "…"
        summary = logging.LogRecord(
            first.name,
            first.levelno,
            first.pathname,
            first.lineno,
            "suppressed %d similar messages in %g s: %s",
            (count, self.interval, template),
            None,
        )
        summary.nekobot_summary = True
        for key in ("nekobot_kernel", "plugin"):
            if hasattr(first, key):
                setattr(summary, key, getattr(first, key))
        return summary

    def _forget(self) -> None:
        for kind in [k for k in self._windows if k not in self._suppressed]:
            del self._windows[kind]


class KernelLogHandler(logging.Handler):
    """Keeps one kernel's records: in memory (bounded) and for live subscribers.

    A record belongs to the kernel whose id it carries (`nekobot_kernel`); records of
    other code under the `nekobot` logger are kept by every kernel.
    """

    def __init__(self, kernel_id: str, maxlen: int, repeats: RepeatFilter | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.kernel_id = kernel_id
        #: Collapses floods of one message (None: keep every record).
        self.repeats = repeats
        if repeats is not None:
            repeats.report = self.handle
        self.records: deque[LogRecord] = deque(maxlen=maxlen)
        self.subscribers: list[LogSubscriber] = []
        #: Where records go to be written to the file (by another thread), if anywhere.
        self.sink: Callable[[LogRecord], None] | None = None
        self._seq = 0

    def filter(self, record: logging.LogRecord) -> bool:
        owner = getattr(record, "nekobot_kernel", None)
        if owner is not None and owner != self.kernel_id:
            return False
        return self.repeats is None or self.repeats.filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._seq += 1
            exc_text = None
            if record.exc_info:
                # Keep the text only: a traceback object would keep a plugin's frames
                # (and so its module) alive after it was unloaded.
                exc_text = logging.Formatter().formatException(record.exc_info)
            item = LogRecord(
                seq=self._seq,
                time=record.created,
                level=record.levelname,
                logger=record.name,
                plugin=getattr(record, "plugin", None),
                message=record.getMessage(),
                exc_text=exc_text,
            )
            self.records.append(item)
            if self.sink is not None:
                self.sink(item)
            for subscriber in list(self.subscribers):
                subscriber(item)
        except Exception:
            self.handleError(record)

    def subscribe(self, callback: LogSubscriber) -> Callable[[], None]:
        """Call `callback` with each new record; returns unsubscribe.

        It is called in the thread that logged (worker threads and the watchdog's too),
        under the handler's lock: it must not block, and must hop to the event loop itself.
        """
        self.subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self.subscribers:
                self.subscribers.remove(callback)

        return unsubscribe


def json_line(record: LogRecord) -> str:
    """One record as a line of the log file: JSON with the fields of `LogRecord` (a
    traceback is part of the message there), read back by `read_log_file`."""
    message = record.message
    if record.exc_text:
        message = f"{message}\n{record.exc_text}"
    item = {
        "seq": record.seq,
        "time": record.time,
        "level": record.level,
        "logger": record.logger,
        "plugin": record.plugin,
        "message": message,
    }
    return json.dumps(item, ensure_ascii=False) + "\n"


def read_log_file(
    path: Path, max_records: int = 20_000, max_bytes: int = 16 << 20
) -> list[LogRecord]:
    """The last records of a JSON-lines log file (blocking: call it from a worker thread)."""
    if max_records <= 0:
        return []
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.splitlines()
    if size > max_bytes:
        lines = lines[1:]  # the first line was cut
    out = []
    for line in lines[-max_records:]:
        try:
            item = json.loads(line)
            out.append(
                LogRecord(
                    seq=int(item["seq"]),
                    time=float(item["time"]),
                    level=str(item["level"]),
                    logger=str(item["logger"]),
                    plugin=item.get("plugin"),
                    message=str(item["message"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue  # a line of an older format, or torn by a crash
    return out


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Creates its files with mode 0600 whatever the umask: records quote what plugins
    and requests log, which only the bot's user should read."""

    def _open(self) -> io.TextIOWrapper:
        make_private_file(Path(self.baseFilename))
        return super()._open()


class _FileWriter(threading.Thread):
    """Writes records to the log file in batches, off the event loop: one write (and one
    flush) for whatever queued up meanwhile, rotating by size like
    `logging.handlers.RotatingFileHandler` (whose rotation it uses)."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(name="nekobot-log-file", daemon=True)
        self.queue: queue.SimpleQueue[LogRecord | None] = queue.SimpleQueue()
        self._handler = _PrivateRotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
        )
        # Files an earlier version, or another umask, left readable by others.
        for old in (path, *(path.with_name(f"{path.name}.{i}") for i in range(1, backups + 1))):
            tighten(old)
        self._max_bytes = max_bytes

    def run(self) -> None:
        done = False
        while not done:
            batch = [self.queue.get()]
            while len(batch) < 2048:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if None in batch:  # stop: write what came before it
                batch = batch[: batch.index(None)]
                done = True
            try:
                self._write("".join(json_line(r) for r in batch if r is not None))
            except Exception:  # a full disk must not end the thread, nor reach the loop
                logging.getLogger("nekobot.kernel").debug("log file write failed", exc_info=True)
        self._handler.close()

    def _write(self, text: str) -> None:
        if not text:
            return
        handler = self._handler
        if handler.stream is None:
            handler.stream = handler._open()
        handler.stream.write(text)
        handler.stream.flush()
        if handler.stream.tell() >= self._max_bytes:
            handler.doRollover()

    def stop(self) -> None:
        """Write what is queued, close the file, end the thread."""
        self.queue.put(None)
        self.join()


class KernelLogging:
    """Attaches one kernel's handler to the `nekobot` logger, and detaches it."""

    def __init__(
        self, kernel_id: str, log_dir: Path, maxlen: int, repeats: RepeatFilter | None = None
    ) -> None:
        self.buffer = KernelLogHandler(kernel_id, maxlen, repeats)
        self._log_dir = log_dir
        self._writer: _FileWriter | None = None

    def start(self) -> None:
        """Attach the handler; the file is written by a thread of its own, not the loop."""
        make_private_dir(self._log_dir)
        # Numbering goes on from the file's last record: the file holds earlier runs too,
        # and `seq` orders its records.
        tail = read_log_file(self.file, max_bytes=64 << 10)
        self.buffer._seq = max([self.buffer._seq, *(r.seq for r in tail)])
        self._writer = _FileWriter(self.file, max_bytes=5_000_000, backups=3)
        self._writer.start()
        self.buffer.sink = self._writer.queue.put
        root = logging.getLogger("nekobot")
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.addHandler(self.buffer)

    @property
    def file(self) -> Path:
        """The current log file (JSON lines)."""
        return self._log_dir / "nekobot.log"

    def stop(self) -> None:
        """Detach the handler and close the file."""
        logging.getLogger("nekobot").removeHandler(self.buffer)
        self.buffer.sink = None
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
