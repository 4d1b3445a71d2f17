"""The GPU check's stage logic on a CPU (benchmarks/gpu_check.py): the deadline, the packing into
at most four files, the optional packages; the GPU stages are replaced by small commands, or run
where they can (the tests stage skips its CUDA tests here)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import PACKED, RATIO_TABLE, SUMMARY, TARBALL, Stage, check_stages, run_check

REPO = Path(__file__).resolve().parents[1]


def python(code: str) -> tuple[str, ...]:
    """A stage command running ``code``."""
    return ("{python}", "-c", textwrap.dedent(code))


def stage_named(name: str) -> Stage:
    return next(s for s in check_stages() if s.name == name)


def summary_lines(folder: Path) -> list[str]:
    return (folder / SUMMARY).read_text().splitlines()


def tarball_names(folder: Path) -> list[str]:
    with tarfile.open(folder / TARBALL) as tar:
        return tar.getnames()


def test_a_stage_that_cannot_fit_is_skipped_and_one_that_overruns_is_interrupted(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    overrun = python("""
        import os, pathlib, time
        try:
            time.sleep(60)
        except KeyboardInterrupt:  # the deadline's SIGINT: write what there is, as pytest does
            pathlib.Path(os.environ["GPU_CHECK_RUN"], "partial.json").write_text("{}")
            raise
        """)
    stages = [Stage("first", 0, (python("print('first figure')"),)),
              Stage("big", 100, (python("raise SystemExit('big ran')"),)),
              Stage("overrun", 0, (overrun,)),
              Stage("late", 1, (python("raise SystemExit('late ran')"),))]
    start = time.monotonic()
    status = run_check(stages, deadline=start + 6, repo=REPO, run=run, dest=out, environment="test machine",
                       grace=5, pack_seconds=1)
    elapsed = time.monotonic() - start

    assert status == 1  # a stage ran out of time
    assert 5 <= elapsed < 12
    lines = summary_lines(out)
    outcomes = [line for line in lines if re.match(r"\w+: ", line) and line.split(":")[0] in
                ("first", "big", "overrun", "late")]
    assert [line.split(":")[0] for line in outcomes] == ["first", "big", "overrun", "late"]
    assert outcomes[0].startswith("first: ok") and "  first figure" in lines
    assert re.fullmatch(r"big: skipped: needs at least 100 s, [45] s left", outcomes[1])
    assert re.fullmatch(r"overrun: timed out \(interrupted at the deadline\), [4-6] s \(log overrun.log\)",
                        outcomes[2])
    assert outcomes[3] == "late: skipped: needs at least 1 s, 0 s left"
    assert not (run / "big.log").exists() and not (run / "late.log").exists()
    assert f"{run.name}/partial.json" in tarball_names(out)  # the interrupted stage wrote its result
    assert (out / "environment.txt").read_text() == "test machine\n"


def test_an_interrupted_benchmark_run_still_gives_the_ratio_table(tmp_path):
    """A real pytest-benchmark session, stopped at the deadline in its second test: the JSON of
    the first is written, and the ratio table is made from it."""
    pytest.importorskip("pytest_benchmark")
    bench = tmp_path / "test_fake_benchmarks.py"
    bench.write_text(textwrap.dedent("""
        import time

        def test_copy(benchmark):
            benchmark.extra_info.update(op="copy", variant="reference", device="cpu", bytes=1 << 20)
            benchmark.pedantic(lambda: None, rounds=3)

        def test_hangs():
            time.sleep(60)
        """))
    stage = Stage("bench", 0, (("{python}", "-m", "pytest", str(bench), "-q", "-p", "no:cacheprovider",
                                "--rootdir", str(tmp_path), "--benchmark-json", "{run}/bench.json"),))
    run = tmp_path / "run"
    status = run_check([stage], deadline=time.monotonic() + 20, repo=REPO, run=run, dest=run,
                       environment="test machine", grace=5, pack_seconds=12)

    assert status == 1
    assert summary_lines(run)[2].startswith("bench: timed out")
    assert f"ratio table: {RATIO_TABLE}" in summary_lines(run)
    table = (run / RATIO_TABLE).read_text()
    assert "| tensor copy | reference | cpu |" in table


@pytest.mark.parametrize("to_out", [True, False], ids=["into-OUT", "into-the-run-folder"])
def test_packing_brings_back_at_most_four_files_within_the_limit_and_no_checkpoint(tmp_path, to_out):
    run = tmp_path / "gpu-check-1"
    out = tmp_path / "out" if to_out else run
    (run / "exp1").mkdir(parents=True)
    (run / "tests.log").write_text("12 passed in 3.0s\n" * 100)
    (run / "exp1" / "results.json").write_text('{"seconds": 12.5}')
    (run / "exp1" / "metalearner.pt").write_bytes(b"\0" * 1000)
    (run / "bench.log").write_bytes(os.urandom(300_000))  # does not compress: too big for the limit
    limit = 200_000

    status = run_check([], deadline=time.monotonic() + 60, repo=REPO, run=run, dest=out,
                       environment="test machine", limit=limit)

    assert status == 0
    packed = sorted(os.listdir(out)) if to_out else sorted(p for p in os.listdir(run) if p in PACKED)
    assert packed == sorted(["summary.txt", "gpu-check-logs.tar.gz", "environment.txt"])  # no bench.json, no table
    assert all((out / name).stat().st_size <= limit for name in packed)
    names = tarball_names(out)
    assert sorted(names) == ["gpu-check-1/exp1/results.json", "gpu-check-1/tests.log"]
    summary = (out / SUMMARY).read_text()
    assert "ratio table: not made (no bench.json)" in summary
    assert "not packed, for the tarball to stay within 195.3 KiB: bench.log (293.0 KiB)" in summary
    assert "not packed: 1 .pt file(s)" in summary


def test_the_capture_stage_runs_only_where_capture_check_exists(tmp_path):
    capture = stage_named("capture")
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "benchmarks" / "__init__.py").write_text("")
    run_check([capture], deadline=time.monotonic() + 200, repo=repo, run=tmp_path / "run1", dest=tmp_path / "out1",
              environment="test machine", pack_seconds=1)
    assert "capture: skipped: not present (benchmarks/capture_check.py)" in summary_lines(tmp_path / "out1")

    (repo / "benchmarks" / "capture_check.py").write_text("print('whole step captured: 1 graph')\n")
    status = run_check([capture], deadline=time.monotonic() + 200, repo=repo, run=tmp_path / "run2",
                       dest=tmp_path / "out2", environment="test machine", pack_seconds=1)
    lines = summary_lines(tmp_path / "out2")
    assert status == 0 and lines[2].startswith("capture: ok") and "  whole step captured: 1 graph" in lines


@pytest.mark.parametrize("xdist", [True, False], ids=["with-xdist", "without-xdist"])
def test_the_tests_run_on_8_workers_with_xdist_and_serially_without(monkeypatch, xdist):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (find_spec("pytest") if xdist else None) if name == "xdist"
                        else find_spec(name, *a))
    (command,) = stage_named("tests").commands
    assert ("-n" in command) == xdist and (not xdist or command[command.index("-n") + 1] == "8")


def test_the_tests_stage_imports_every_test_module_without_nvtx(tmp_path, monkeypatch):
    """The real tests stage (serial where pytest-xdist is absent), with an ``nvtx`` that cannot be
    imported first on the path; on a CPU its CUDA tests are skipped, so it passes if they collect."""
    tests = stage_named("tests")
    if "-n" in tests.commands[0] or torch.cuda.is_available():
        pytest.skip("this stage would run the CUDA tests themselves, or on 8 workers: the GPU check does")
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "nvtx.py").write_text("raise ImportError('nvtx is not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FASTL2R_NVTX", "1")
    run = tmp_path / "run"
    status = run_check([tests], deadline=time.monotonic() + 300, repo=REPO, run=run, dest=run,
                       environment="test machine", pack_seconds=1)
    log = (run / "tests.log").read_text()
    assert status == 0, log[-3000:]
    assert not re.search(r"\d+ errors?\b", log) and re.search(r"\d+ skipped, \d+ deselected", log)
    assert (run / "tests.xml").exists()


def test_the_benchmark_selection_leaves_out_only_the_compiled_references_that_unroll_every_meta_net():
    """Which benchmarks unroll all meta-nets is read from their source (``unrolls_every_meta_net=True``);
    which ones run is pytest's own collection with the stage's ``-k`` expression."""
    unrolled = {path.stem.removeprefix("bench_") for path in (REPO / "benchmarks").glob("bench_*.py")
                if "unrolls_every_meta_net=True" in path.read_text()}
    assert unrolled  # the meta-LSTM and the whole update, today

    def collected(*k: str) -> set[str]:
        result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q",
                                 "-p", "no:cacheprovider", *k], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return {line for line in result.stdout.splitlines() if "::" in line}

    (bench,) = stage_named("bench").commands
    selected = collected("-k", bench[bench.index("-k") + 1])
    on_cuda = {test for test in collected() if "[cuda" in test}
    def bench(test: str) -> str:
        return Path(test.split("::")[0]).stem.removeprefix("bench_")

    left_out = {test for test in on_cuda
                if re.search(r"\[cuda-compiled-reference[\]-]", test) and bench(test) in unrolled}
    assert {bench(test) for test in left_out} == unrolled
    assert selected == on_cuda - left_out


def test_the_check_needs_the_data_and_a_gpu_before_it_starts(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("FASTL2R_DATA", raising=False)
    assert gpu_check.main([]) == 2
    assert "set FASTL2R_DATA" in capsys.readouterr().err
    (tmp_path / "fashion-mnist").mkdir()
    (tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv("FASTL2R_DATA", str(tmp_path))
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    assert gpu_check.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        gpu_check.main(["bench", "nonsense"])


def test_a_stage_is_interrupted_at_its_deadline_even_when_the_check_runs_in_the_background(tmp_path):
    """Started from a non-interactive shell's ``&``, the check inherits an ignored SIGINT; its stages must
    still take the deadline's SIGINT (Python raises KeyboardInterrupt) rather than wait for the SIGKILL."""
    import signal

    code = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            "    print('interrupted', flush=True)\n")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with (tmp_path / "stage.log").open("w") as log:
            start = time.monotonic()
            status = gpu_check.run_command([sys.executable, "-c", code], log, 1.0, cwd=tmp_path,
                                           env=dict(os.environ), grace=30)
            elapsed = time.monotonic() - start
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status is None and elapsed < 20
    assert "interrupted" in (tmp_path / "stage.log").read_text()
