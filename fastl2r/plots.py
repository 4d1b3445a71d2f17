"""The paper's figures from a run's results (Figures 1, 3–7 style).

Readout figures: one panel per task, all on the same step axis, with a dotted line where a
later task starts; at most ``MAX_BANDS`` methods' mean ± std bands share a panel (more methods
take more rows, "ours" repeated as a plain line for reference); every line has markers at the
readout steps, and a method whose values equal an earlier method's everywhere is drawn dashed
with open markers, without a band of its own, and says so in the legend.  Legends sit outside the panels.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from . import _io  # noqa: E402

STYLE = {"ours": ("tab:red", "o"), "teacher": ("black", "s"), "sgd": ("tab:blue", "^"),
         "sgd_x0.1": ("tab:cyan", "v"), "lwf": ("tab:green", "D"), "ewc": ("tab:purple", "P"),
         "hat": ("tab:brown", "X"), "maml": ("tab:olive", "*"), "rep": ("tab:gray", "h")}
LABELS = {"ours": "Ours", "teacher": "Teacher", "sgd": "SGD", "sgd_x0.1": "SGD×0.1", "lwf": "LwF",
          "ewc": "EWC", "hat": "HAT", "maml": "MAML", "rep": "Rep"}
REFERENCES = ("ours", "teacher", "sgd", "sgd_x0.1")  # the first row of a readout figure
MAX_BANDS = 5
MAX_STEP_TICKS = 11
SWITCH = {"color": "0.4", "linestyle": ":", "linewidth": 1.2}


def save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` atomically (format from the suffix) and close it, so that a run's figures do
    not pile up in memory; returns ``path``."""
    path = Path(path)
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _style(name: str, index: int) -> tuple[str, str]:
    """Colour and marker of a method (registered methods cycle through the remaining colours)."""
    return STYLE.get(name, (f"C{index % 10}", "o"))


def _series(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array([np.nan if v is None else v for v in entry["mean"]], dtype=float)
    std = np.array([np.nan if v is None else v for v in entry["std"]], dtype=float)
    return mean, std


def _title(results: dict) -> str:
    return f"{results['experiment']} · {results['suite']} suite · {results['preset']} preset"


def task_starts(results: dict) -> dict[str, int]:
    """The first readout step of each task (0 for Task A and the first new task)."""
    steps = results["eval_steps"]
    first = next(iter(results["methods"].values()))["readout"]
    return {task: steps[next(i for i, v in enumerate(series["mean"]) if v is not None)]
            for task, series in first.items()}


def switch_steps(results: dict) -> list[int]:
    """Steps at which a later new task starts (Experiment 5's switch to Task 3)."""
    return sorted({s for s in task_starts(results).values() if s > 0})


def identical_to(results: dict) -> dict[str, str]:
    """Methods whose every value (every run, task and step) equals an earlier method's: name -> that one."""
    same: dict[str, str] = {}
    names = list(results["methods"])
    for i, name in enumerate(names):
        runs = results["methods"][name]["runs"]
        match = next((other for other in names[:i] if results["methods"][other]["runs"] == runs), None)
        if match is not None:
            same[name] = same.get(match, match)
    return same


def method_rows(methods: list[str]) -> list[list[str]]:
    """Methods by figure row: ours and the references first, then the others, at most
    ``MAX_BANDS`` per row."""
    first = [m for m in REFERENCES if m in methods]
    rest = [m for m in methods if m not in first]
    chunks = [rest[i:i + MAX_BANDS] for i in range(0, len(rest), MAX_BANDS)]
    if len(first) + len(rest) <= MAX_BANDS:
        return [first + rest]
    return ([first] if first else []) + chunks


def _step_axis(ax, steps: list[int], switches: list[int]) -> None:
    every = max(1, -(-len(steps) // MAX_STEP_TICKS))
    ax.set_xticks(steps[::every] if steps[-1] in steps[::every] else steps[::every] + [steps[-1]])
    for step in switches:
        ax.axvline(step, **SWITCH)
    ax.grid(alpha=0.3)


def _line(ax, steps, entry: dict, label: str, color: str, marker: str, *, band: bool, same: bool) -> None:
    mean, std = _series(entry)
    ax.plot(steps, 100 * mean, color=color, marker=marker, markersize=4.5, linewidth=1.5, label=label,
            linestyle="--" if same else "-", markerfacecolor="none" if same else color)
    if band:
        ax.fill_between(steps, 100 * (mean - std), 100 * (mean + std), color=color, alpha=0.12, linewidth=0)


def _legend_handles(ax, switches: list[int]) -> list:
    handles = ax.get_legend_handles_labels()[0]
    if switches:
        handles.append(Line2D([], [], label="a new task starts", **SWITCH))
    return handles


def figure_readout(results: dict) -> plt.Figure:
    """Figures 3–5: readout accuracy vs. step, a column per task, mean ± std over runs."""
    steps = results["eval_steps"]
    methods = list(results["methods"])
    tasks = list(results["methods"][methods[0]]["readout"])
    rows, same, switches = method_rows(methods), identical_to(results), switch_steps(results)
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(3.6 * len(tasks) + 2.4, 2.9 * len(rows) + 0.6),
                             sharex=True, sharey=True, squeeze=False, layout="constrained")
    for r, row in enumerate(rows):
        shown = row if r == 0 or "ours" not in methods else ["ours"] + row
        for c, task in enumerate(tasks):
            ax = axes[r][c]
            for name in shown:
                color, marker = _style(name, methods.index(name))
                label = LABELS.get(name, name)
                if name in same:
                    label += f" (= {LABELS.get(same[name], same[name])}, identical values)"
                _line(ax, steps, results["methods"][name]["readout"][task], label, color, marker,
                      band=name in row and name not in same, same=name in same)
            _step_axis(ax, steps, switches)
            if r == 0:
                ax.set_title(f"Task {task[4:]}" + (" (A)" if task == "task1" else ""))
            if c == 0:
                ax.set_ylabel("readout accuracy (%)")
            if r == len(rows) - 1:
                ax.set_xlabel("meta-test step")
        axes[r][-1].legend(handles=_legend_handles(axes[r][-1], switches), fontsize=8, loc="center left",
                           bbox_to_anchor=(1.02, 0.5), title=None if r == 0 else "(Ours without its band)",
                           title_fontsize=7)
    fig.suptitle(f"Readout accuracy per task, mean ± std over runs — {_title(results)}", fontsize=10)
    return fig


def figure_readout_vs_original(results: dict, method: str = "sgd") -> plt.Figure:
    """Figure 1: readout vs. the original head's accuracy on the old task(s) for one method."""
    steps = results["eval_steps"]
    entry = results["methods"][method]
    old_tasks = list(entry["readout"])[:-1]
    switches = switch_steps(results)
    fig, axes = plt.subplots(1, len(old_tasks), figsize=(3.8 * len(old_tasks) + 1.8, 3.4), sharex=True,
                             sharey=True, squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], old_tasks):
        _line(ax, steps, entry["readout"][task], "readout", "tab:blue", "o", band=True, same=False)
        _line(ax, steps, entry["original"][task], "original head", "tab:orange", "s", band=True, same=False)
        _step_axis(ax, steps, switches)
        ax.set_title(f"Task {task[4:]}" + (" (A)" if task == "task1" else ""))
        ax.set_xlabel("meta-test step")
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(handles=_legend_handles(axes[0][-1], switches), fontsize=8, loc="center left",
                       bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{LABELS.get(method, method)}: old tasks while learning the later ones — {_title(results)}",
                 fontsize=10)
    return fig


def write_figures(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Every figure this run's results support, as PNG files in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [save(figure_readout(results), out_dir / "readout.png")]
    for method in ("sgd", "ours"):
        if method in results["methods"]:
            paths.append(save(figure_readout_vs_original(results, method), out_dir / f"readout_vs_original_{method}.png"))
    return paths


ENDINGS = {"threshold": ("tab:red", "x", "ended: loss over threshold"),
           "horizon": ("tab:blue", "o", "ended: horizon reached"),
           "nonfinite": ("black", "^", "ended: non-finite loss")}


def applied_thresholds(history: list[dict]) -> list[list[Optional[float]]]:
    """Per new task of an episode, the threshold that applied to it (Experiment 5 raises it by 5
    at the switch); None for a task the episode did not reach."""
    tasks = max(h["tasks_reached"] for h in history)
    return [[h["threshold"] + 5.0 * k if k < h["tasks_reached"] else None for h in history] for k in range(tasks)]


def figure_metatraining(history: list[dict]) -> plt.Figure:
    """Figure 6: meta-loss and the thresholds applied, inner steps and T-BPTT length, per episode."""
    episodes = np.array([h["episode"] for h in history])
    fig, (ax_loss, ax_steps) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True, layout="constrained")
    ax_loss.plot(episodes, [h["mean_loss"] for h in history], "-", color="tab:orange", lw=1.2,
                 label="mean loss of the episode")
    for reason, (color, marker, label) in ENDINGS.items():
        ended = [h for h in history if h["ended_by"] == reason]
        if ended:
            ax_loss.plot([h["episode"] for h in ended], [h["final_loss"] for h in ended], linestyle="none",
                         marker=marker, color=color, markersize=6, markeredgewidth=1.5, label=f"final loss, {label}")
    thresholds = applied_thresholds(history)
    for k, values in enumerate(thresholds):
        label = "threshold" if len(thresholds) == 1 else f"threshold on Task {k + 2}" + (f" (+{5 * k})" if k else "")
        ax_loss.step(episodes, np.array([np.nan if v is None else v for v in values]), where="mid", color="black",
                     linestyle="--" if k == 0 else ":", label=label)
    ax_loss.set_ylabel("meta-loss λ·Huber")
    ax_steps.plot(episodes, [h["steps"] for h in history], "o", color="tab:blue", markersize=5,
                  label="inner steps run")
    ax_steps.step(episodes, [h["tbptt"] for h in history], "k--", where="mid", label="T-BPTT length")
    ax_steps.set_ylabel("steps")
    for ax in (ax_loss, ax_steps):
        ax.set_xlabel("episode")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle("Meta-training (Figure 6)", fontsize=10)
    return fig


def figure_delta_histogram(deltas: dict) -> plt.Figure:
    """Figure 7: the distribution of the meta-learner's gradient multiplier δ per layer group,
    a row per kind of tensor (conv, GroupNorm, linear) sharing its δ axis."""
    rows: dict[str, list[str]] = {}
    for kind in deltas:
        rows.setdefault(kind.split(",")[0].split(" ")[0], []).append(kind)
    columns = max(len(kinds) for kinds in rows.values())
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.4 * columns, 2.8 * len(rows) + 0.5), squeeze=False,
                             layout="constrained")
    for r, kinds in enumerate(rows.values()):
        values = [np.asarray(deltas[kind], dtype=float) for kind in kinds]
        low = min(min(v.min() for v in values), 1.0)
        high = max(max(v.max() for v in values), 1.0)
        pad = 0.05 * (high - low or 1.0)
        bins = np.linspace(low - pad, high + pad, 61)
        for c in range(columns):
            ax = axes[r][c]
            if c >= len(kinds):
                ax.axis("off")
                continue
            ax.hist(values[c], bins=bins, color="tab:red", alpha=0.8)
            ax.axvline(1.0, color="k", ls="--", lw=1, label="δ = 1 (plain SGD)")
            ax.set_xlim(bins[0], bins[-1])
            ax.set_title(f"{kinds[c]} (n={values[c].size})", fontsize=9)
            ax.set_xlabel("δ")
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("count")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Meta-learner outputs δ at meta-test (Figure 7)", fontsize=10)
    return fig
