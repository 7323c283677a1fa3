"""Progress that suits where it goes: a tqdm bar on a terminal, a short plain line every few seconds in a log.

A cluster job, CI or ``make demo > demo.log 2>&1`` must not fill its log with carriage-return bar frames, so when
stdout or stderr is not a terminal every bar becomes ``LineBar``: one line (count, percent, elapsed < ETA, rate,
postfix) at most every ``KDEP_PROGRESS_SECONDS`` seconds (default 10) and one at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm import tqdm

LINE_FORMAT = (
    "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"


def _seconds() -> float:
    return float(os.environ.get("KDEP_PROGRESS_SECONDS", "10"))


class LineBar(tqdm):
    """tqdm that prints whole lines: at most one per ``mininterval`` seconds, plus a last one on close."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.0), _seconds())
        kwargs["leave"], kwargs["dynamic_ncols"] = False, False
        self._closing, self._last_line, self._last_n = False, float("-inf"), -1
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "" or self.disable:  # tqdm clears a bar with an empty message: nothing to clear in a log
            return True
        now = (
            time.monotonic()
        )  # tqdm's monitor thread also refreshes: keep one line per interval all the same
        if (now - self._last_line < self.mininterval and not self._closing) or self._last_n == self.n > 0:
            return True
        self._last_line, self._last_n = now, self.n
        meter = dict(self.format_dict)
        meter["bar_format"] = LINE_FORMAT if meter.get("total") else LINE_FORMAT_NO_TOTAL
        self.fp.write(self.format_meter(**meter) + "\n")
        self.fp.flush()
        return True

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(
            ordered_dict, refresh=False, **kwargs
        )  # a line per postfix change would flood a log

    def close(self) -> None:
        if not self.disable and not self._closing:
            self._closing = True
            self.display()
            self.sp = None  # tqdm's own close would then write a bare carriage return to clear the bar
        super().close()


def on_terminal() -> bool:
    """True when both stdout and stderr are terminals (bars); otherwise progress goes to a log as lines."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(...)`` on a terminal, ``LineBar(...)`` otherwise; the same arguments either way."""
    return (tqdm if on_terminal() else LineBar)(*args, **kwargs)
