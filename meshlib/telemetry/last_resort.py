"""Where access log lines go when the app's logging sends them nowhere: stdout.

An Envoy sidecar writes its access log to /dev/stdout, so switching `accessLogging` on in a
Telemetry resource is all it takes to see lines in `kubectl logs`. meshlib writes them to the
`meshlib.access` logger, and the servers apps run under (uvicorn, gunicorn, hypercorn, Django's
and Flask's) configure handlers for their own loggers only: with nothing more, Python would drop
every line. So, while access logging is on, that logger has one more handler, which writes a
line to stdout only when no other handler would get it — none on the logger itself nor on
the loggers it propagates to. Once the app configures logging (`logging.basicConfig()`,
`dictConfig`, a handler on the root or on `meshlib.access`), its configuration alone decides,
and this handler writes nothing.
"""

from __future__ import annotations

import logging
import sys
import threading

__all__ = ["StdoutLastResort", "install"]


class StdoutLastResort(logging.Handler):
    """Writes records to stdout, one message a line, flushed (a container's log collector
    sees each as it happens), when no other handler would get them."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logging.INFO)
        self.logger = logger  # the one it was installed on

    def handled_elsewhere(self, record: logging.LogRecord) -> bool:
        """Whether another handler gets `record`: one that is not a last resort, on the logger
        that logged it or on those it propagates to, or a last resort met before this one
        (one line, whichever loggers have one)."""
        # The logger by a plain dict read: not getLogger(), whose module lock, taken under
        # this handler's, would deadlock with dictConfig(), which takes them the other way.
        named = logging.root.manager.loggerDict.get(record.name)
        logger: logging.Logger | None = named if isinstance(named, logging.Logger) else self.logger
        first: logging.Handler | None = None
        while logger is not None:
            for handler in logger.handlers:
                if not isinstance(handler, StdoutLastResort):
                    return True
                if first is None:
                    first = handler
            logger = logger.parent if logger.propagate else None
        return first is not self

    def emit(self, record: logging.LogRecord) -> None:
        if self.handled_elsewhere(record):
            return
        try:
            stream = sys.stdout  # looked up each time: the app may have replaced it
            stream.write(f"{record.getMessage()}\n")
            stream.flush()
        except Exception:
            self.handleError(record)


_lock = threading.Lock()  # two Meshes may apply Telemetry at once, each on its own thread


def install(logger: logging.Logger) -> None:
    """Give `logger` a StdoutLastResort, unless it has one."""
    with _lock:
        if not any(isinstance(handler, StdoutLastResort) for handler in logger.handlers):
            logger.addHandler(StdoutLastResort(logger))
