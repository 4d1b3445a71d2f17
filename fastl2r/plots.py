"""The paper's figures from a run's ``results.json`` (Figures 1, 3–5 style)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import _io  # noqa: E402

STYLE = {"ours": ("tab:red", "-"), "teacher": ("black", "--"), "sgd": ("tab:blue", "-"),
         "sgd_x0.1": ("tab:cyan", "-"), "lwf": ("tab:green", "-"), "ewc": ("tab:purple", "-"),
         "hat": ("tab:brown", "-"), "maml": ("tab:olive", "-"), "rep": ("tab:gray", "-")}
LABELS = {"ours": "Ours", "teacher": "Teacher", "sgd": "SGD", "sgd_x0.1": "SGD×0.1", "lwf": "LwF",
          "ewc": "EWC", "hat": "HAT", "maml": "MAML", "rep": "Rep"}


def save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _series(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array([np.nan if v is None else v for v in entry["mean"]], dtype=float)
    std = np.array([np.nan if v is None else v for v in entry["std"]], dtype=float)
    return mean, std


def _band(ax, steps, entry, label, color, linestyle) -> None:
    mean, std = _series(entry)
    ax.plot(steps, 100 * mean, color=color, linestyle=linestyle, label=label, linewidth=1.6)
    ax.fill_between(steps, 100 * (mean - std), 100 * (mean + std), color=color, alpha=0.15, linewidth=0)


def _title(results: dict) -> str:
    return f"{results['experiment']} · {results['suite']} suite · {results['preset']} preset"


def figure_readout(results: dict) -> plt.Figure:
    """Readout accuracy vs. step, one panel per task, one line per method with its spread."""
    steps = np.array(results["eval_steps"])
    tasks = list(next(iter(results["methods"].values()))["readout"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, entry in results["methods"].items():
            color, ls = STYLE.get(name, (None, "-"))
            _band(ax, steps, entry["readout"][task], LABELS.get(name, name), color, ls)
        ax.set_title(f"Task {task[4:]}" + (" (A)" if task == "task1" else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("readout accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(_title(results), fontsize=10)
    return fig


def figure_readout_vs_original(results: dict, method: str = "sgd") -> plt.Figure:
    """Figure 1: readout vs. the original head's accuracy on the old task(s) for one method."""
    steps = np.array(results["eval_steps"])
    entry = results["methods"][method]
    old_tasks = [t for t in entry["readout"] if t != f"task{len(entry['readout'])}"]
    fig, axes = plt.subplots(1, len(old_tasks), figsize=(4.2 * len(old_tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], old_tasks):
        _band(ax, steps, entry["readout"][task], "Readout", "tab:blue", "-")
        _band(ax, steps, entry["original"][task], "Original", "tab:orange", "--")
        ax.set_title(f"{LABELS.get(method, method)}: Task {task[4:]} while learning later tasks")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(results), fontsize=10)
    return fig


def write_figures(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Every figure this run's results support, as PNG files in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [save(figure_readout(results), out_dir / "readout.png")]
    for method in ("sgd", "ours"):
        if method in results["methods"]:
            paths.append(save(figure_readout_vs_original(results, method), out_dir / f"readout_vs_original_{method}.png"))
    return paths


def figure_metatraining(history: list[dict]) -> plt.Figure:
    """Figure 6: meta-loss, curriculum threshold and unrolled steps per episode."""
    episodes = np.array([h["episode"] for h in history])
    fig, (ax_loss, ax_steps) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_loss.plot(episodes, [h["final_loss"] for h in history], ".", ms=3, alpha=0.5, label="final loss")
    ax_loss.plot(episodes, [h["mean_loss"] for h in history], "-", lw=1, label="mean loss")
    ax_loss.step(episodes, [h["threshold"] for h in history], "k--", where="post", label="threshold")
    ax_loss.set_xlabel("episode")
    ax_loss.set_ylabel("meta-loss λ·Huber")
    ax_loss.legend(fontsize=8)
    ax_steps.plot(episodes, [h["steps"] for h in history], ".", ms=3, label="inner steps run")
    ax_steps.step(episodes, [h["tbptt"] for h in history], "k--", where="post", label="T-BPTT length")
    ax_steps.set_xlabel("episode")
    ax_steps.legend(fontsize=8)
    for ax in (ax_loss, ax_steps):
        ax.grid(alpha=0.3)
    fig.suptitle("meta-training (Figure 6)", fontsize=10)
    return fig


def figure_delta_histogram(deltas: dict) -> plt.Figure:
    """Figure 7: the distribution of the meta-learner's gradient multiplier δ per layer group."""
    fig, axes = plt.subplots(1, len(deltas), figsize=(3.6 * len(deltas), 3.2), squeeze=False)
    for ax, (kind, values) in zip(axes[0], deltas.items()):
        values = np.asarray(values, dtype=float)
        ax.hist(values, bins=60, color="tab:red", alpha=0.8)
        ax.axvline(1.0, color="k", ls="--", lw=1)
        ax.set_title(f"{kind} (n={values.size})", fontsize=9)
        ax.set_xlabel("δ")
    fig.suptitle("meta-learner outputs at meta-test (Figure 7)", fontsize=10)
    return fig
