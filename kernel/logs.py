"""Structured log records of one Kernel: a ring buffer for the API, a file, subscribers."""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
from collections import deque
from collections.abc import Callable
from pathlib import Path

import attrs


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


class KernelLogHandler(logging.Handler):
    """Keeps one kernel's records: in memory (bounded) and for live subscribers.

    A record belongs to the kernel whose id it carries (`nekobot_kernel`); records of
    other code under the `nekobot` logger are kept by every kernel.
    """

    def __init__(self, kernel_id: str, maxlen: int) -> None:
        super().__init__(logging.DEBUG)
        self.kernel_id = kernel_id
        self.records: deque[LogRecord] = deque(maxlen=maxlen)
        self.subscribers: list[LogSubscriber] = []
        self._seq = 0

    def filter(self, record: logging.LogRecord) -> bool:
        owner = getattr(record, "nekobot_kernel", None)
        return owner is None or owner == self.kernel_id

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._seq += 1
            record.nekobot_seq = self._seq  # the file handler (after this one) writes it too
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


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line, with the fields of `LogRecord`, so the file can be read
    back by the API."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "seq": getattr(record, "nekobot_seq", 0),
                "time": record.created,
                "level": record.levelname,
                "logger": record.name,
                "plugin": getattr(record, "plugin", None),
                "message": record.getMessage(),
            },
            ensure_ascii=False,
        )


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


class KernelLogging:
    """Attaches one kernel's handlers to the `nekobot` logger, and detaches them."""

    def __init__(self, kernel_id: str, log_dir: Path, maxlen: int) -> None:
        self.buffer = KernelLogHandler(kernel_id, maxlen)
        self._log_dir = log_dir
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        # It formats a traceback into the message and drops exc_info before queueing.
        self._queue_handler = logging.handlers.QueueHandler(self._queue)
        self._queue_handler.addFilter(self.buffer.filter)
        self._listener: logging.handlers.QueueListener | None = None

    def start(self) -> None:
        """Attach the handlers; the file is written by a listener thread, not the loop."""
        self._log_dir.mkdir(parents=True, exist_ok=True)
        # Numbering goes on from the file's last record: the file holds earlier runs too,
        # and `seq` orders its records.
        tail = read_log_file(self.file, max_bytes=64 << 10)
        self.buffer._seq = max([self.buffer._seq, *(r.seq for r in tail)])
        file_handler = logging.handlers.RotatingFileHandler(
            self.file, maxBytes=5_000_000, backupCount=3, encoding="utf-8"
        )
        file_handler.setFormatter(JsonLinesFormatter())
        self._listener = logging.handlers.QueueListener(self._queue, file_handler)
        self._listener.start()
        root = logging.getLogger("nekobot")
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.addHandler(self.buffer)
        root.addHandler(self._queue_handler)

    @property
    def file(self) -> Path:
        """The current log file (JSON lines)."""
        return self._log_dir / "nekobot.log"

    def stop(self) -> None:
        """Detach the handlers and close the file."""
        root = logging.getLogger("nekobot")
        root.removeHandler(self.buffer)
        root.removeHandler(self._queue_handler)
        if self._listener is not None:
            self._listener.stop()
            for handler in self._listener.handlers:
                handler.close()
            self._listener = None
