"""The one overall progress line of a run (DESIGN §7.4): which method and run is going, the time
elapsed and the meta-test's estimated time left, above the bars of the phase under way.

The estimate counts meta-test steps still to run, each at the seconds per step (readouts
included) its method took in its runs so far; a method not yet seen counts at the mean of the
others.  While methods prepare (pre-training, meta-training) there is no estimate yet.
"""
from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

from tqdm.auto import tqdm

REFRESH_SECONDS = 1.0


def clock(seconds: float) -> str:
    """``seconds`` as ``m:ss`` or ``h:mm:ss``, for the progress line's elapsed time and ETA."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class OverallProgress:
    """Progress over every (method, run) of a meta-test of ``methods``, ``runs`` runs of
    ``steps_per_run`` steps each; ``enabled=False`` shows nothing."""

    def __init__(self, methods: Sequence[str], runs: int, steps_per_run: int, enabled: bool = True):
        self.runs, self.steps_per_run = runs, steps_per_run
        self.remaining_runs = {name: runs for name in methods}
        self.seconds_per_step: dict[str, float] = {}
        self.start = time.perf_counter()
        self.current: Optional[tuple[str, float, int, int]] = None  # method, start time, steps done, runs
        self.doing = "starting"
        self.bar = tqdm(total=len(methods) * runs * steps_per_run, disable=not enabled, dynamic_ncols=True,
                        bar_format="{desc} |{bar:12}| {percentage:3.0f}% of the meta-test")
        self._stop = threading.Event()
        if enabled:
            threading.Thread(target=self._refresh, daemon=True).start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            self.show()

    def eta(self) -> Optional[float]:
        """Seconds the meta-test has left, or None before anything was measured."""
        current_rate = None
        if self.current is not None and self.current[2] > 0:
            current_rate = (time.perf_counter() - self.current[1]) / self.current[2]
        rates = dict(self.seconds_per_step)
        if self.current is not None and self.current[0] not in rates and current_rate is not None:
            rates[self.current[0]] = current_rate
        if not rates:
            return None
        fallback = sum(rates.values()) / len(rates)
        left = sum(runs * self.steps_per_run * rates.get(name, fallback) for name, runs in self.remaining_runs.items())
        if self.current is not None:
            left += (self.steps_per_run * self.current[3] - self.current[2]) * rates.get(self.current[0], fallback)
        return left

    def show(self) -> None:
        """Redraw the line: what is under way, the time elapsed and the ETA (a background thread also calls it
        every second)."""
        eta = self.eta()
        self.bar.set_description_str(f"{self.doing} · elapsed {clock(time.perf_counter() - self.start)} · "
                                     f"ETA {'?' if eta is None else clock(eta)}")

    def preparing(self, method: str) -> None:
        """Show that ``method`` is preparing (pre-training, meta-training): no steps to count, nothing to
        estimate from."""
        self.doing = f"{method}: preparing"
        self.show()

    def begin_run(self, method: str, run: int, count: int = 1) -> None:
        """Run ``run`` of ``method`` starts (with ``count`` > 1: runs ``run`` and the next ones of this rank,
        side by side): that many runs fewer left, and their steps are timed from now."""
        self.doing = f"{method} run {run + 1}/{self.runs}" if count == 1 else f"{method}: {count} runs from {run + 1}"
        self.remaining_runs[method] -= count
        self.current = (method, time.perf_counter(), 0, count)
        self.show()

    def skip(self, method: str) -> None:
        """A run of ``method`` done elsewhere (before a resume, or by another rank): off the count."""
        self.remaining_runs[method] -= 1
        self.bar.update(self.steps_per_run)

    def step(self, runs: int = 1) -> None:
        """One meta-test step of the current run (of each of ``runs`` runs side by side) is done."""
        method, started, steps, count = self.current
        self.current = (method, started, steps + runs, count)
        self.bar.update(runs)

    def end_run(self) -> None:
        """The current run ended: its seconds per step update its method's mean, which the ETA uses."""
        method, started, steps, _ = self.current
        done = self.runs - self.remaining_runs[method]  # this method's finished runs, this one included
        rate = (time.perf_counter() - started) / max(steps, 1)
        previous = self.seconds_per_step.get(method, rate)
        self.seconds_per_step[method] = previous + (rate - previous) / done
        self.current = None

    def close(self) -> None:
        """Close the bars under this line (those an interrupt left open), then this one."""
        self._stop.set()
        close_bars(keep=self.bar)
        self.doing = "done" if self.current is None and not any(self.remaining_runs.values()) else "stopped"
        self.show()
        self.bar.close()


def close_bars(keep: Optional[tqdm] = None) -> None:
    """Close every open progress bar but ``keep``, the latest first, so each clears its own line."""
    for bar in sorted(tqdm._instances, key=lambda b: -b.pos):
        if bar is not keep:
            bar.close()
