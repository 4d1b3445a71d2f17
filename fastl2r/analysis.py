"""The headline comparison of a run: per method, forgetting of Task A's representation and the new
task's readout at the horizon, and their paired differences to a baseline with 95% confidence
intervals (runs are paired: every method of a run sees the same tasks, seeds and batches).

    python -m fastl2r.analysis RUN_DIR [RUN_DIR ...] [--baseline sgd] [--figure readout.png]

prints the table as Markdown (numbers in readout-accuracy points) and can draw every method's readout
curves in one figure.  Several run folders of one
configuration (e.g. the baselines run while ``ours`` meta-trained, and ``ours`` with the trained
meta-learner) make one table: their runs are the same runs, so they pair as well.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from scipy import stats

from .errors import UserError

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over runs with its two-sided confidence interval (Student's t; none for one run)."""

    mean: float
    low: float
    high: float
    runs: int

    def format(self, signed: bool = False) -> str:
        """``mean [low, high]`` to one decimal (signed for differences); the mean alone for one run."""
        spec = "+.1f" if signed else ".1f"
        if self.runs < 2:
            return format(self.mean, spec)
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` and its t-interval: mean ± t_{(1+c)/2, n−1} · s / √n."""
    n = len(values)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def _endpoints(series: Sequence[Optional[float]]) -> tuple[float, float]:
    seen = [v for v in series if v is not None]
    return seen[0], seen[-1]


def forgetting(results: dict, method: str, task: str = "task1") -> list[float]:
    """Per run, ``task``'s readout accuracy when it was first read minus at the last step, in points."""
    runs = results["methods"][method]["runs"]["readout"][task]
    return [100 * (first - last) for first, last in map(_endpoints, runs)]


def final_readout(results: dict, method: str, task: str) -> list[float]:
    """Per run, ``task``'s readout accuracy at the last step, in points."""
    return [100 * _endpoints(run)[1] for run in results["methods"][method]["runs"]["readout"][task]]


def headline(results: dict, baseline: str = "sgd") -> str:
    """Markdown: per method, Task A forgetting and the last task's final readout (mean and 95% CI
    over runs), and both as paired differences to ``baseline``."""
    methods = list(results["methods"])
    if baseline not in methods:
        raise UserError(f"the run has no method {baseline!r} to compare with; it has: {', '.join(methods)}")
    last_task = f"task{len(results['task_names'][0])}"
    base_forget, base_final = forgetting(results, baseline), final_readout(results, baseline, last_task)
    lines = [f"| method | Task A forgetting | {last_task} readout at the end | forgetting − {baseline} "
             f"| {last_task} readout − {baseline} |", "|---|---|---|---|---|"]
    for name in methods:
        forget, final = forgetting(results, name), final_readout(results, name, last_task)
        paired = [interval([a - b for a, b in zip(forget, base_forget, strict=True)]),
                  interval([a - b for a, b in zip(final, base_final, strict=True)])]
        cells = [interval(forget).format(), interval(final).format()]
        cells += ["—" if name == baseline else p.format(signed=True) for p in paired]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    runs = len(base_forget)
    lines.append("")
    lines.append(f"Mean over {runs} run{'s' if runs != 1 else ''} [{CONFIDENCE:.0%} confidence interval, "
                 "Student's t]; forgetting = readout when first read − readout at the end, in points.")
    return "\n".join(lines)


# what may differ between run folders whose runs pair: the methods run and their options, meta-training
# (which only ``ours`` and the controls that read its meta-learner depend on), and the facts of how each
# run was executed (``config.json``'s device, threads, plugins, processes and runs side by side; every
# run keeps its seeds)
MAY_DIFFER = ("methods", "metatrain", "methods_run", "device", "threads", "plugins", "ranks", "parallel_runs")


def merged(runs: Sequence[tuple[str, dict, dict]]) -> dict:
    """One results dict from ``(run folder, config, results)`` of the same configuration (up to
    ``MAY_DIFFER``) and the same tasks in every run; a method in two folders is refused."""
    (first_dir, first_config, out), *others = runs
    out = {**out, "methods": dict(out["methods"])}
    for run_dir, config, results in others:
        for key in sorted(set(config) | set(first_config)):
            if key not in MAY_DIFFER and config.get(key) != first_config.get(key):
                raise UserError(f"{run_dir} and {first_dir} differ in {key!r}: their runs do not pair; "
                                "pass run folders of one configuration")
        if results["task_names"] != out["task_names"] or results["eval_steps"] != out["eval_steps"]:
            raise UserError(f"{run_dir} and {first_dir} ran other tasks or read them at other steps; "
                            "pass run folders of one configuration")
        for name, entry in results["methods"].items():
            if name in out["methods"]:
                raise UserError(f"method {name!r} is in {run_dir} and in an earlier folder; pass it once")
            out["methods"][name] = entry
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fastl2r.analysis RUN_DIR [RUN_DIR ...]``: print the headline table of the runs; returns
    the exit status: 2, with one line on stderr, when a run folder cannot be read or they do not pair."""
    parser = argparse.ArgumentParser(prog="python -m fastl2r.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="+", help="a run folder holding results.json (several: of one configuration)")
    parser.add_argument("--baseline", default="sgd", help="the method paired differences are taken to (default sgd)")
    parser.add_argument("--figure", default=None, metavar="PATH",
                        help="also draw the readout curves of every method of the folders into PATH (.png, .pdf)")
    args = parser.parse_args(argv)
    runs = []
    for run_dir in args.run_dir:
        try:
            results = json.loads((Path(run_dir) / "results.json").read_text())
            config = json.loads((Path(run_dir) / "config.json").read_text()) if len(args.run_dir) > 1 else {}
            runs.append((run_dir, config, results))
        except (OSError, ValueError) as exc:
            print(f"error: cannot read the results of {run_dir} ({exc}); pass a finished run folder", file=sys.stderr)
            return 2
    try:
        results = merged(runs)
        print(headline(results, args.baseline))
        if args.figure is not None:
            from . import plots  # matplotlib only when a figure is asked for

            figure = plots.figure_readout(results)
    except KeyError as exc:
        print(f"error: the results of {', '.join(args.run_dir)} lack {exc}; pass finished run folders", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.figure is not None:
        try:
            plots.save(figure, args.figure)
        except (OSError, ValueError, UserError) as exc:  # the figure's folder (WriteError) or format
            print(f"error: cannot write the figure {args.figure} ({exc}); choose another path", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
