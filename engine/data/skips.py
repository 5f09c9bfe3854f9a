"""Bad samples: one exception type with a reason code, and a thread-safe counter that logs every skip.

A corrupt or unusable input never stops a run by itself: the sample is skipped, its reason is logged and counted
(``SkipCounter``), and the run continues. Only when *every* sample of an epoch is bad (or more than the configured
share) does the run stop, with :class:`AllSamplesBadError` listing the counts, instead of spinning forever.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

logger = logging.getLogger("engine.data")

# The reason codes, so tests and dashboards can rely on them.
REASONS = (
    "missing_file",  # path does not exist
    "empty_file",  # zero bytes
    "not_video",  # no container/video stream could be opened
    "truncated",  # the stream ends well before the duration its header announces
    "unsupported_codec",  # the selected decoder cannot decode this codec
    "decode_error",  # the decoder failed on the data
    "too_short",  # fewer source frames than one clip needs
    "bad_resolution",  # width or height outside [min_side, max_side]
    "missing_caption",  # caption absent, empty or whitespace
    "non_utf8_caption",  # caption bytes are not valid UTF-8
    "bad_row",  # a manifest row that cannot be parsed or has no path
)


class BadSample(Exception):
    """A sample that must be skipped. ``reason`` is one of :data:`REASONS`; the message says why."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class AllSamplesBadError(RuntimeError):
    """Raised when an epoch produced no usable sample (or too large a share of bad ones)."""


class SkipCounter:
    """Counts skipped samples by reason and logs each one (a warning per skip, with the path)."""

    def __init__(self, what: str = "sample"):
        self.what = what
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def skip(self, where: str, err: BadSample) -> None:
        with self._lock:
            self.counts[err.reason] += 1
        logger.warning("skipped %s %s: %s", self.what, where, err)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = Counter({k: int(v) for k, v in state.items()})
