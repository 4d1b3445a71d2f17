"""docs/testbed.md: its tables are the search tool's rendering of the recorded measurements, and the
recorded 5-run measurement of the shipped testbed meets its targets (SGD forgets ≥ 8 points, the
teacher ≤ 2, at the horizon)."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from fastl2r.experiments import build_config

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "docs" / "testbed-search.jsonl"


def test_the_page_shows_the_tables_the_tool_renders_from_the_record():
    table = subprocess.run([sys.executable, str(REPO / "tools" / "testbed_search.py"), "--results", str(RECORD),
                            "table"], capture_output=True, text=True, check=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
                           ).stdout
    page = (REPO / "docs" / "testbed.md").read_text()
    missing = [line for line in table.splitlines() if line and line not in page]
    assert not missing, missing[:3]


def test_the_recorded_testbed_forgets_under_sgd_and_not_under_the_teacher():
    records = [json.loads(line) for line in RECORD.read_text().splitlines() if line.strip()]
    (shipped,) = [r for r in records if r["kind"] == "screen" and r["candidate"] == "fmnist_inverted-cpu"
                  and r["runs"] == 5]
    config = build_config("exp1", "fmnist_inverted", "cpu")
    horizon = config["metatest"]["steps_per_task"]
    assert shipped["config"]["arch"] == config["arch"] and shipped["config"]["metatest.steps_per_task"] == horizon
    assert shipped["config"]["pretrain.epochs"] == config["pretrain"]["epochs"]

    def forgets(method: str) -> float:
        m = shipped["methods"][method]
        at = m["eval_steps"].index(horizon)
        return statistics.fmean(run[0] - run[at] for run in m["task_a_readout"])

    assert forgets("sgd") >= 8 and forgets("teacher") <= 2
    plateau = {r["epochs"]: r["test_accuracy"] for r in records
               if r["kind"] == "plateau" and r["candidate"] == "tops-invert-r8"}
    chosen = config["pretrain"]["epochs"]
    assert plateau[chosen] - plateau[chosen / 2] < 1.5 and plateau[chosen] == max(plateau.values())
