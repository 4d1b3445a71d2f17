"""The GPU check under a deadline: build, CUDA tests, benchmarks, dispatch counts, a timed exp1
and the whole-step capture, packed into at most four files to bring home.

    FASTL2R_DATA=<data root> [GPU_CHECK_SECONDS=420] [OUT=<folder>] python3 -m benchmarks.gpu_check [STAGE ...]

(``bash benchmarks/gpu_check.sh`` is this command.)  A GPU machine may be lent for minutes,
its start included, so the check fits a deadline (``GPU_CHECK_SECONDS``, default 420, counted
from the start): stages run in the order of what only a GPU can show, each gets the time that
is left, and one that needs more than is left is skipped and named in ``summary.txt``.  A
stage still running at the deadline is interrupted (SIGINT, so pytest still writes its XML
and JSON) and then killed.  ``PACK_SECONDS`` stay for the ratio table and packing.

Each stage's output goes to ``<stage>.log`` in the run folder (``runs/gpu-check-DATE/``); its
commands run in the repository root with ``GPU_CHECK_RUN`` (the run folder, where a stage may
write files) and ``GPU_CHECK_STAGE_SECONDS`` (its time) in the environment.  The run folder is
packed into ``$OUT``, else into the run folder itself: ``summary.txt``, ``ratio_table.md``,
``gpu-check-logs.tar.gz`` (every log and JSON, no ``.pt`` file) and ``environment.txt`` (one
line), each at most 16 MiB.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO

import torch

from fastl2r import _io

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SECONDS = 420
PACK_SECONDS = 30     # kept from the stages: an interrupted stage's grace, the ratio table, packing
GRACE_SECONDS = 10    # between a stage's SIGINT and its SIGKILL, to write what it has
FILE_LIMIT = 16 << 20  # what may come back from a GPU machine, per file
SUMMARY, RATIO_TABLE, TARBALL, ENVIRONMENT = "summary.txt", "ratio_table.md", "gpu-check-logs.tar.gz", "environment.txt"
PACKED = (SUMMARY, RATIO_TABLE, TARBALL, ENVIRONMENT)
# Every CUDA benchmark but the compiled references that unroll all 93 meta-nets of resnet32_gn
# (those that call ``harness.require`` with ``unrolls_every_meta_net=True``): building their
# graphs takes over 10 minutes.
BENCH_SELECT = "cuda and not (compiled-reference and (meta_lstm or meta_update))"
PYTEST_WORKERS = 8
EXP1_EPISODES = 4


def last_line(run: Path, log: Path) -> list[str]:
    """The log's last non-empty line (pytest's count of passed, failed and skipped)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1:]


def table_rows(run: Path, log: Path) -> list[str]:
    """The Markdown table the stage printed, else its last line."""
    rows = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("|")]
    return rows or last_line(run, log)


def exp1_figures(run: Path, log: Path) -> list[str]:
    """Seconds in all, and meta-training inner steps per second, of the timed exp1."""
    lines = []
    results, trained = run / "exp1" / "results.json", run / "exp1" / "metatrain.json"
    if results.exists():
        lines.append(f"exp1 quick (fmnist, 1 run): {json.loads(results.read_text()).get('seconds')} s in all")
    if trained.exists():
        p = json.loads(trained.read_text())
        lines.append(f"meta-training: {p['inner_steps']} inner steps in {p['seconds']:.1f} s = "
                     f"{p['inner_steps'] / max(p['seconds'], 1e-9):.2f} inner steps/s")
    return lines or last_line(run, log)


def absent(path: str) -> Callable[[Path], Optional[str]]:
    """A stage's ``unless``: it runs only where the repository holds ``path``."""
    return lambda repo: None if (repo / path).exists() else f"not present ({path})"


def not_installed(module: str, package: str) -> Callable[[Path], Optional[str]]:
    return lambda repo: None if importlib.util.find_spec(module) else f"{package} is not installed"


@dataclass(frozen=True)
class Stage:
    """One step of the check.  ``commands`` run in order until one fails (``{python}`` and
    ``{run}`` are filled in); ``least_seconds`` is the least time in which it gives a figure;
    ``unless`` says why it cannot run in this repository (None: it can); ``figures`` picks its
    lines for the summary from the run folder and its log."""

    name: str
    least_seconds: float
    commands: tuple[tuple[str, ...], ...]
    unless: Optional[Callable[[Path], Optional[str]]] = None
    figures: Callable[[Path, Path], list[str]] = last_line


def pytest_workers() -> tuple[str, ...]:
    """``-n 8`` where pytest-xdist is installed; the tests run serially without it."""
    return ("-n", str(PYTEST_WORKERS)) if importlib.util.find_spec("xdist") else ()


def check_stages() -> list[Stage]:
    """The stages, in order: what only a GPU can show first.  ``BENCH_SELECT`` (a ``-k``
    expression) and ``EXP1_EPISODES`` in the environment change the benchmarks and exp1.
    Each stage's least time is an estimate until a GPU run has measured it."""
    py = "{python}"
    build = ("env", "FASTL2R_BUILD_CUDA=1", py, "-m", "pip", "install", "--no-index", "--no-deps",
             "--no-build-isolation", "-v", "-e", ".")
    tests = (py, "-m", "pytest", "tests/", "-m", "cuda", "-q", "-rs", *pytest_workers(),
             "--junitxml", "{run}/tests.xml")
    bench = (py, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q", "-rs",
             "-k", os.environ.get("BENCH_SELECT", BENCH_SELECT), "--benchmark-json", "{run}/bench.json")
    exp1 = (py, "-m", "fastl2r.train", "exp1", "--suite", "fmnist", "--preset", "quick", "--device", "cuda",
            "--runs", "1", "--methods", "ours,sgd", "--no-progress", "--out", "{run}/exp1",
            "--set", f"metatrain.episodes={os.environ.get('EXP1_EPISODES', EXP1_EPISODES)}")
    return [
        Stage("build", 60, (build, (py, "-c", "import fastl2r._C, fastl2r._C_cuda"))),
        Stage("tests", 30, (tests,)),
        Stage("bench", 60, (bench,), unless=not_installed("pytest_benchmark", "pytest-benchmark")),
        Stage("counts", 30, ((py, "-m", "benchmarks.dispatch_counts", "--device", "cuda"),), figures=table_rows),
        Stage("exp1", 90, (exp1,), figures=exp1_figures),
        Stage("capture", 60, ((py, "-m", "benchmarks.capture_check"),), unless=absent("benchmarks/capture_check.py")),
    ]


class Summary:
    """``summary.txt``: each line is printed and the file rewritten at once, so that what was
    learnt before an outside kill is already in place."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
        self.lines += lines
        _io.write_text(self.path, "\n".join(self.lines) + "\n")


def run_command(argv: Sequence[str], log: TextIO, seconds: float, *, cwd: Path, env: dict,
                grace: float = GRACE_SECONDS) -> Optional[int]:
    """Run ``argv`` in a process group of its own, output to ``log``; returns its exit status, or
    None if it ran out of ``seconds``: then the group gets SIGINT and, ``grace`` seconds later,
    SIGKILL.  Whatever the group left running is killed."""
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_interruptible)
    try:
        return process.wait(timeout=max(seconds, 0))
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        return None
    finally:
        _signal_group(process.pid, signal.SIGKILL)


def _interruptible() -> None:
    """In a stage's process, before it starts: SIGINT as Ctrl-C gives it, even when the check itself was
    started in the background (a non-interactive shell's ``&`` ignores SIGINT, and children inherit that),
    so that the deadline's SIGINT lets pytest write what it has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def argvs(stage: Stage, run: Path) -> list[list[str]]:
    """The stage's commands, as run."""
    return [[part.replace("{python}", sys.executable).replace("{run}", str(run)) for part in command]
            for command in stage.commands]


def run_stage(stage: Stage, seconds: float, *, repo: Path, run: Path, grace: float = GRACE_SECONDS) -> str:
    """Run the stage's commands within ``seconds``; returns its outcome for the summary."""
    stop = time.monotonic() + seconds
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPU_CHECK_RUN": str(run),
           "GPU_CHECK_STAGE_SECONDS": f"{seconds:.0f}"}
    with open(run / f"{stage.name}.log", "w", encoding="utf-8") as log:
        for argv in argvs(stage, run):
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            status = run_command(argv, log, stop - time.monotonic(), cwd=repo, env=env, grace=grace)
            if status is None:
                return "timed out (interrupted at the deadline)"
            if status != 0:
                return f"failed (exit {status})"
    return "ok"


def run_check(stages: Sequence[Stage], *, deadline: float, repo: Path, run: Path, dest: Path, environment: str,
              grace: float = GRACE_SECONDS, pack_seconds: float = PACK_SECONDS, limit: int = FILE_LIMIT) -> int:
    """Run ``stages`` in order until ``deadline`` (``time.monotonic()``) less ``pack_seconds``,
    then pack into ``dest``; returns 0 if every stage that ran passed and the packing fits."""
    run.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    _io.write_text(dest / ENVIRONMENT, environment + "\n")
    summary = Summary(dest / SUMMARY)
    summary.add(f"gpu_check {utc_now()}: {deadline - time.monotonic():.0f} s to go, stages "
                f"{' '.join(s.name for s in stages)}; run folder {run}",
                f"environment: {environment}")
    passed = True
    for stage in stages:
        left = deadline - pack_seconds - time.monotonic()
        reason = stage.unless(repo) if stage.unless else None
        if reason is None and left < stage.least_seconds:
            reason = f"needs at least {stage.least_seconds:.0f} s, {max(left, 0):.0f} s left"
        if reason is not None:
            summary.add(f"{stage.name}: skipped: {reason}")
            continue
        start = time.monotonic()
        outcome = run_stage(stage, left, repo=repo, run=run, grace=grace)
        passed &= outcome == "ok"
        log = run / f"{stage.name}.log"
        summary.add(f"{stage.name}: {outcome}, {time.monotonic() - start:.0f} s (log {log.name})",
                    *(f"  $ {shlex.join(argv)}" for argv in argvs(stage, run)),
                    *(f"  {line}" for line in stage.figures(run, log)))
    summary.add(make_ratio_table(run, dest, deadline - time.monotonic(), repo=repo))
    packed = pack(run, dest, summary, limit)
    return 0 if passed and packed else 1


def make_ratio_table(run: Path, dest: Path, seconds: float, *, repo: Path) -> str:
    """``ratio_table.md`` from ``bench.json``, also from an interrupted benchmark run."""
    if not (run / "bench.json").exists():
        return "ratio table: not made (no bench.json)"
    with open(run / "ratio_table.log", "w", encoding="utf-8") as log:
        status = run_command([sys.executable, "-m", "benchmarks.ratio_table", str(run / "bench.json"),
                              "--out", str(dest / RATIO_TABLE)], log, seconds, cwd=repo, env=dict(os.environ))
    if status != 0:
        return f"ratio table: not made ({'out of time' if status is None else f'exit {status}'}; log ratio_table.log)"
    return f"ratio table: {RATIO_TABLE}"


def pack(run: Path, dest: Path, summary: Summary, limit: int = FILE_LIMIT) -> bool:
    """The run folder's logs and JSON (no ``.pt``) into one tarball of at most ``limit`` bytes, the
    largest files left out until it fits; the summary says what came back and what was left out.
    Returns whether every packed file is within ``limit``."""
    files = [p for p in sorted(run.rglob("*")) if p.is_file() and not (p.parent == run and p.name in PACKED)
             and not p.name.startswith(".")]
    checkpoints = [p for p in files if p.suffix == ".pt"]
    files = [p for p in files if p.suffix != ".pt"]
    left_out = []
    with _io.atomic_path(dest / TARBALL) as tmp:
        while True:
            with tarfile.open(tmp, "w:gz") as tar:
                for path in files:
                    tar.add(path, arcname=f"{run.name}/{path.relative_to(run)}")
            if tmp.stat().st_size <= limit or not files:
                break
            largest = max(files, key=lambda p: p.stat().st_size)
            files.remove(largest)
            left_out.append(f"{largest.relative_to(run)} ({size_text(largest.stat().st_size)})")
    if checkpoints:
        summary.add(f"not packed: {len(checkpoints)} .pt file(s), in {run}")
    if left_out:
        summary.add(f"not packed, for the tarball to stay within {size_text(limit)}: "
                    f"{', '.join(left_out)}; in {run}")
    outputs = [dest / name for name in PACKED if name != SUMMARY and (dest / name).exists()]
    over = [p.name for p in outputs if p.stat().st_size > limit]
    summary.add(f"packed into {dest}: {SUMMARY}, "
                + ", ".join(f"{p.name} ({size_text(p.stat().st_size)})" for p in outputs)
                + f"; {len(files)} files in {TARBALL}"
                + (f"; OVER {size_text(limit)}: {', '.join(over)}" if over else ""))
    return not over and (dest / SUMMARY).stat().st_size <= limit


def size_text(size: int) -> str:
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB"
    return f"{size / 1024:.1f} KiB" if size >= 1024 else f"{size} B"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _output(argv: Sequence[str]) -> str:
    """A command's standard output; empty if it cannot run."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> tuple[str, str]:
    """One line saying what the figures were measured on, and the details behind it."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    driver = _output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "unknown"
    nvcc = _output(["nvcc", "--version"])
    release = next((line.split("release", 1)[1].strip() for line in nvcc.splitlines() if "release" in line), "none")
    commit = _output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "unknown"
    line = (f"{utc_now()}; GPU {torch.cuda.get_device_name()}, driver {driver}; Python {sys.version.split()[0]}; "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}); Triton {triton_version}; nvcc {release}; "
            f"fastl2r commit {commit}")
    details = "\n\n".join([line, _output(["nvidia-smi"]), nvcc,
                           _output([sys.executable, "-m", "pip", "list", "--format=freeze"])])
    return line, details + "\n"


def data_problem() -> Optional[str]:
    """Why ``FASTL2R_DATA`` does not hold Fashion-MNIST, or None."""
    data = os.environ.get("FASTL2R_DATA", "")
    if data and ((Path(data) / "fashion_mnist.pt").is_file()
                 or (Path(data) / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()):
        return None
    return ("set FASTL2R_DATA to a data root holding fashion-mnist/ with the four idx .gz files (e.g. a copy of "
            f"Debian's /usr/share/datasets/fashion-mnist/), or fashion_mnist.pt; got {data!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.monotonic()
    stages = check_stages()
    names = [s.name for s in stages]
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", metavar="STAGE", help=f"run only these, from: {' '.join(names)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.stages) - set(names))
    if unknown:
        parser.error(f"unknown stage(s) {' '.join(unknown)}; stages: {' '.join(names)}")
    try:
        seconds = float(os.environ.get("GPU_CHECK_SECONDS", DEFAULT_SECONDS))
    except ValueError:
        parser.error(f"GPU_CHECK_SECONDS must be a number of seconds, not {os.environ['GPU_CHECK_SECONDS']!r}")
    problem = data_problem()
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU on this machine; run this on a GPU machine", file=sys.stderr)
        return 2
    line, details = environment()
    run = REPO / "runs" / f"gpu-check-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    run.mkdir(parents=True)
    _io.write_text(run / "env.log", details)
    dest = Path(os.environ["OUT"]) if os.environ.get("OUT") else run
    return run_check([s for s in stages if not args.stages or s.name in args.stages], deadline=started + seconds,
                     repo=REPO, run=run, dest=dest, environment=line)


if __name__ == "__main__":
    sys.exit(main())
