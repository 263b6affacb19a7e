"""The terminal view: a live table on a terminal, plain periodic lines otherwise.

A TTY gets the table redrawn in place (ANSI, on the alternate screen, which is left when the
demo stops so the summary stays in the scrollback); anything else (a pipe, a file, CI) gets
the table as plain text every few seconds, without escape codes, skipping idle rows.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from examples.bookinfo.stats import Signal

HEADER = ("SERVICE", "VERSION", "VIEW", "RPS", "SUCCESS", "P50 ms", "P99 ms", "SERVED OK")
LEGEND = (
    'callers: what meshed callers saw (reporter="source": faults, timeouts and retries '
    'included); inbound: the workload\'s own count (reporter="destination"). '
    "SERVED OK: the workload's own success rate. "
    "unknown: no workload's answer: one meshlib gave itself (fault, timeout), or none (the "
    "caller gave up first: code 0, a failure)."
)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def millis(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def table(signals: Sequence[Signal]) -> list[str]:
    rows = [HEADER] + [
        (
            s.service,
            s.version,
            s.view,
            f"{s.rps:.1f}",
            percent(s.success),
            millis(s.p50),
            millis(s.p99),
            percent(s.served_success),
        )
        for s in signals
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    return lines


@dataclass
class Frame:
    """Everything one refresh shows."""

    heading: str  # "scenario 2/8 reviews-90-10 · next in 6 s · 0:23"
    title: str
    hint: str
    signals: Sequence[Signal]
    notes: Sequence[str] = field(default_factory=list)


class PlainView:
    """Plain text every `every` seconds: for pipes, log files and CI."""

    def __init__(self, out: TextIO = sys.stdout, every: float = 5.0) -> None:
        self.out = out
        self.every = every
        self._last = time.monotonic()  # the first table once there is a window to show
        self._progress = ""

    def message(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def progress(self, text: str) -> None:
        if text != self._progress:  # a line per change, not per poll
            self._progress = text
            self.message(text)

    def show(self, frame: Frame, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        lines = [f"--- {frame.heading}: {frame.title}"]
        busy = [s for s in frame.signals if s.requests > 0]
        lines += ["    " + line for line in table(busy)] if busy else ["    (no traffic yet)"]
        lines += ["    " + note for note in frame.notes]
        self.message("\n".join(lines))

    def close(self) -> None:
        pass


class LiveView:
    """The table redrawn in place on the alternate screen of a terminal."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self._on_alternate = False

    def message(self, text: str) -> None:
        if not self._on_alternate:
            print(text, file=self.out, flush=True)

    def progress(self, text: str) -> None:
        """A line rewritten in place (service start-up); cut to fit, or it would wrap."""
        width = shutil.get_terminal_size((100, 30)).columns
        self.out.write("\r\x1b[2K" + text[: width - 1])
        self.out.flush()

    def show(self, frame: Frame, force: bool = False) -> None:
        if not self._on_alternate:
            self.out.write("\r\x1b[2K\x1b[?1049h\x1b[?25l")  # alternate screen, cursor hidden
            self._on_alternate = True
        width = shutil.get_terminal_size((100, 30)).columns
        bold, dim, reset = "\x1b[1m", "\x1b[2m", "\x1b[0m"
        header, *rows = table(frame.signals)
        lines = [
            f"{bold}meshlib bookinfo demo{reset} · {frame.heading}",
            f"{bold}{frame.title}{reset}",
            *_wrap(f"Look for: {frame.hint}", width),
            "",
            header,
            *(_colored(row, s) for row, s in zip(rows, frame.signals, strict=True)),
            "",
            *(dim + line + reset for line in _wrap(LEGEND, width)),
            "",
            *(wrapped for note in frame.notes for wrapped in _wrap(note, width)),
            "",
            f"{dim}Ctrl-C stops the demo.{reset}",
        ]
        self.out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in lines))
        self.out.write("\x1b[J")
        self.out.flush()

    def close(self) -> None:
        if self._on_alternate:
            self.out.write("\x1b[?25h\x1b[?1049l")
            self._on_alternate = False
        else:
            self.out.write("\r\x1b[2K")
        self.out.flush()


def _colored(line: str, signal: Signal) -> str:
    """A row in red below 95% success, yellow below 99.5%."""
    if signal.success is None or signal.success >= 0.995:
        return line
    return ("\x1b[31m" if signal.success < 0.95 else "\x1b[33m") + line + "\x1b[0m"


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, max(40, width - 1)) or [""]


View = PlainView | LiveView


def make_view(out: TextIO = sys.stdout, every: float = 5.0) -> View:
    return LiveView(out) if out.isatty() else PlainView(out, every)
