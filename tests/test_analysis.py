"""The headline comparison: confidence intervals and paired differences against hand-computed values."""
import json
import math

import pytest

from fastl2r.analysis import forgetting, headline, interval, main


def test_interval_is_students_t():
    # mean 3, s = √2.5, t(0.975, 4) = 2.776445105 (tables): half-width 2.776445105·√2.5/√5 = 1.963243
    iv = interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert iv.mean == 3.0 and iv.runs == 5
    assert iv.high - 3.0 == pytest.approx(1.963243, abs=1e-6) and 3.0 - iv.low == pytest.approx(1.963243, abs=1e-6)
    single = interval([2.5])
    assert single.mean == 2.5 and math.isnan(single.low) and single.format() == "2.5"


def results(**methods):
    """A results.json of two tasks read at steps 0, 10, 20 (task 2 from step 0)."""
    def entry(task1, task2):
        return {"runs": {"readout": {"task1": task1, "task2": task2}}}
    return {"task_names": [["A", "B"]] * 2, "eval_steps": [0, 10, 20],
            "methods": {name: entry(*runs) for name, runs in methods.items()}}


RESULTS = results(sgd=([[0.90, 0.85, 0.80], [0.88, 0.84, 0.78]], [[0.50, 0.80, 0.90], [0.50, 0.82, 0.92]]),
                  ours=([[0.90, 0.88, 0.86], [0.88, 0.87, 0.85]], [[0.50, 0.79, 0.89], [0.50, 0.80, 0.91]]))


def test_forgetting_is_first_minus_last_readout_per_run():
    assert forgetting(RESULTS, "sgd") == pytest.approx([10.0, 10.0])
    assert forgetting(RESULTS, "ours") == pytest.approx([4.0, 3.0])


def test_headline_pairs_runs(tmp_path, capsys):
    table = headline(RESULTS)
    ours = next(line for line in table.splitlines() if line.startswith("| ours"))
    # paired forgetting differences: 4 − 10 = −6 and 3 − 10 = −7 → mean −6.5, s = √0.5,
    # t(0.975, 1) = 12.7062047: half-width 12.7062047·√0.5/√2 = 6.353102
    assert "-6.5 [-12.9, -0.1]" in ours
    # final task-2 readouts: ours 89, 91 vs sgd 90, 92 → −1.0 both runs, zero spread
    assert "-1.0 [-1.0, -1.0]" in ours
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    assert main([str(tmp_path)]) == 0 and "| sgd |" in capsys.readouterr().out
    assert main([str(tmp_path), "--baseline", "nope"]) == 2
    assert "no method 'nope'" in capsys.readouterr().err


def test_run_folders_of_one_configuration_pair_into_one_table(tmp_path, capsys):
    config = {"experiment": "exp1", "seed": 0, "methods": {"sgd": {}}, "metatrain": {"objective": "huber"}}
    folders = []
    for name, methods, cfg in (("base", ["sgd"], {**config, "methods_run": ["sgd"], "threads": 1}),
                               ("ours", ["ours"], {**config, "methods": {"ours": {}}, "metatrain": {},
                                                   "methods_run": ["ours"], "threads": 2})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({**RESULTS, "methods": {m: RESULTS["methods"][m]
                                                                               for m in methods}}))
        (folder / "config.json").write_text(json.dumps(cfg))
        folders.append(str(folder))
    assert main(folders) == 0
    assert "-6.5 [-12.9, -0.1]" in next(line for line in capsys.readouterr().out.splitlines()
                                        if line.startswith("| ours"))
    (tmp_path / "ours" / "config.json").write_text(json.dumps({**config, "seed": 1}))
    assert main(folders) == 2 and "differ in 'seed'" in capsys.readouterr().err
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    assert main([folders[0], folders[0]]) == 2 and "method 'sgd' is in" in capsys.readouterr().err
    other = {**RESULTS, "task_names": [["A", "C"]] * 2, "methods": {"ours": RESULTS["methods"]["ours"]}}
    (tmp_path / "ours" / "results.json").write_text(json.dumps(other))
    assert main(folders) == 2 and "ran other tasks" in capsys.readouterr().err


def test_the_figure_draws_every_method_of_the_folders(tmp_path, capsys):
    def curves(runs):  # mean and std over runs per task and step, as results.json has them
        return {task: {"mean": [sum(r[i] for r in series) / len(series) for i in range(3)], "std": [0.0] * 3}
                for task, series in runs["readout"].items()}

    full = {**RESULTS, "experiment": "exp1", "suite": "fmnist", "preset": "smoke",
            "methods": {name: {**entry, "readout": curves(entry["runs"])} for name, entry in RESULTS["methods"].items()}}
    (tmp_path / "results.json").write_text(json.dumps(full))
    figure = tmp_path / "figures" / "readout.png"
    assert main([str(tmp_path), "--figure", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main([str(tmp_path), "--figure", str(tmp_path / "readout.nope")]) == 2
    assert "cannot write the figure" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "results.json"]
