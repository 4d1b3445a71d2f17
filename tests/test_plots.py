"""The figures: what a reader needs to read them, checked on the matplotlib objects."""
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PolyCollection

from fastl2r.plots import (MAX_BANDS, applied_thresholds, figure_delta_histogram, figure_metatraining,
                           figure_readout, figure_readout_vs_original, identical_to, method_rows, switch_steps)

METHODS = ["ours", "sgd", "sgd_x0.1", "teacher", "lwf", "ewc", "hat", "maml", "rep"]


def exp5_results():
    """Three tasks (Task 3 from step 10), readouts at 0, 10, 20; EWC's values are SGD's."""
    g = np.random.default_rng(0)
    steps = [0, 10, 20]

    def series(start):
        runs = [[None if s < start else float(g.uniform(0.5, 1.0)) for s in steps] for _ in range(2)]
        values = np.array([[np.nan if v is None else v for v in run] for run in runs])
        mean = [None if np.isnan(v) else float(v) for v in values.mean(0)]
        std = [None if np.isnan(v) else float(v) for v in values.std(0)]
        return {"mean": mean, "std": std}, runs

    methods = {}
    for name in METHODS:
        entry = {"readout": {}, "original": {}, "runs": {"readout": {}, "original": {}}}
        for kind in ("readout", "original"):
            for task, start in (("task1", 0), ("task2", 0), ("task3", 10)):
                entry[kind][task], entry["runs"][kind][task] = series(start)
        methods[name] = entry
    methods["ewc"] = {k: v for k, v in methods["sgd"].items()}
    return {"experiment": "exp5", "suite": "fmnist", "preset": "smoke", "eval_steps": steps, "methods": methods}


def test_identical_methods_and_task_switches_are_found():
    results = exp5_results()
    assert identical_to(results) == {"ewc": "sgd"}
    assert switch_steps(results) == [10]


def test_method_rows_hold_at_most_five_bands_references_first():
    rows = method_rows(METHODS)
    assert rows[0] == ["ours", "teacher", "sgd", "sgd_x0.1"]
    assert sorted(m for row in rows for m in row) == sorted(METHODS)
    assert all(len(row) <= MAX_BANDS for row in rows)
    assert method_rows(["sgd", "ours"]) == [["ours", "sgd"]]


def test_readout_figure_is_readable():
    results = exp5_results()
    fig = figure_readout(results)
    axes = np.array(fig.axes).reshape(-1, 3)
    fig.canvas.draw()
    for ax in axes.flat:
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) <= MAX_BANDS
        assert ax.get_xlim() == axes[0][0].get_xlim() and ax.get_ylim() == axes[0][0].get_ylim()
        assert list(ax.get_xticks()) == [0, 10, 20]
        assert any(list(line.get_xdata()) == [10, 10] for line in ax.get_lines())  # Task 3 starts
    for row in axes:
        legend = row[-1].get_legend()
        assert legend.get_window_extent().x0 >= row[-1].get_window_extent().x1  # outside the data
    labels = [t.get_text() for row in axes for t in row[-1].get_legend().get_texts()]
    assert "EWC (= SGD, identical values)" in labels and "a new task starts" in labels
    ewc = next(line for line in axes[1][0].get_lines() if line.get_label().startswith("EWC"))
    assert ewc.get_linestyle() == "--" and ewc.get_markerfacecolor() == "none"
    title = fig.get_suptitle()
    assert "exp5" in title and fig._suptitle.get_window_extent().y0 >= max(
        ax.title.get_window_extent().y1 for ax in axes[0])
    plt.close(fig)
    fig = figure_readout_vs_original(results, "sgd")
    assert [ax.get_title() for ax in fig.axes] == ["Task 1 (A)", "Task 2"]
    plt.close(fig)


HISTORY = [{"episode": e, "steps": 10 + e, "final_loss": 5.0 + e, "mean_loss": 4.0, "threshold": 20.0 + 5 * e,
            "tbptt": 2 + 2 * e, "ended_by": ended, "checkpoint": 0, "tasks_reached": reached}
           for e, (ended, reached) in enumerate([("threshold", 1), ("horizon", 2), ("threshold", 2)])]


def test_metatraining_figure_shows_the_thresholds_applied():
    assert applied_thresholds(HISTORY) == [[20.0, 25.0, 30.0], [None, 30.0, 35.0]]
    fig = figure_metatraining(HISTORY)
    ax_loss, ax_steps = fig.axes
    fig.canvas.draw()
    for ax in (ax_loss, ax_steps):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks)
        assert ax.get_ylabel()
    labels = [line.get_label() for line in ax_loss.get_lines()]
    assert "threshold on Task 3 (+5)" in labels
    switched = next(line for line in ax_loss.get_lines() if line.get_label() == "threshold on Task 3 (+5)")
    assert np.isnan(switched.get_ydata()[0]) and list(switched.get_ydata()[1:]) == [30.0, 35.0]
    markers = {line.get_label(): line.get_markersize() for line in ax_loss.get_lines()
               if "final loss" in line.get_label()}
    assert set(markers) == {"final loss, ended: loss over threshold", "final loss, ended: horizon reached"}
    assert min(markers.values()) >= 5
    plt.close(fig)


def test_delta_histogram_rows_share_their_x_range():
    g = np.random.default_rng(0)
    deltas = {"conv weights, 16 channels": g.normal(0, 0.3, 500), "GroupNorm γ": g.normal(0.9, 0.05, 100),
              "GroupNorm β": g.normal(0.8, 0.05, 100), "conv weights, 32 channels": g.normal(0.5, 0.1, 500)}
    fig = figure_delta_histogram(deltas)
    axes = np.array(fig.axes).reshape(2, 2)
    assert [ax.get_title() for ax in axes.flat] == [
        "conv weights, 16 channels (n=500)", "conv weights, 32 channels (n=500)", "GroupNorm γ (n=100)",
        "GroupNorm β (n=100)"]
    for row in axes:
        assert row[0].get_xlim() == row[1].get_xlim()
        assert row[0].get_xlim()[0] < 1.0 < row[0].get_xlim()[1]  # δ = 1 is in view
        assert row[0].get_ylabel() == "count"
    plt.close(fig)
