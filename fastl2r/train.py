"""Command line: ``python -m fastl2r.train exp1 --suite fmnist --preset smoke`` (installed as
``fastl2r-train``).

A thin layer over ``fastl2r.metatest.run_metatest``.  Bad input prints one line on stderr and
exits with status 2; Ctrl-C prints how to resume and exits with status 130.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import __version__, _io, distributed, ops, run_folder
from .data import resolve_data_root
from .errors import UserError, WriteError
from .experiments import (EXPERIMENTS, PRESETS, TASKS, apply_override, build_config, computation_changes,
                          describe_experiment, validate)
from .meta.metalearner import MetaLearner
from .meta.optimizer import load_metalearner
from .meta.trainer import CHECKPOINT, check_episode_count, job_slots, read_checkpoint
from .methods import METHODS, parse_methods
from .models import runs_slots
from .metatest import load_progress, run_metatest, save_results
from .progress import close_bars
from .registry import load_plugin
from .workspace import Workspace


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UserError(f"{message} (see --help)")


def program_name() -> str:
    """How this command was called: the installed ``fastl2r-train`` or the module."""
    return "fastl2r-train" if Path(sys.argv[0]).name == "fastl2r-train" else "python -m fastl2r.train"


HELP_WIDTH = 100


def _one_of(names) -> str:
    return "{" + ",".join(names) + "}"


# --parallel-runs by default: on a GPU one run's step is hundreds of tiny kernel launches, which 8 runs
# side by side share (untimed so far: BENCHMARKS.md); on the CPU runs go one by one, so that a CPU run's
# results stay, to the bit, those of earlier releases.
AUTO_PARALLEL_RUNS = {"cpu": 1, "cuda": 8}


def build_parser(experiment: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line; with ``experiment``, its help describes that experiment."""
    from .models import ARCHITECTURES

    general = ("Reproduce an experiment of 'Learning to Remember from a Multi-Task Teacher': pre-train on Task A, "
               "meta-test every method on the new task(s), and write config.json, results.json, curves.csv, the "
               "live logs (metatrain.csv, readouts.csv) and the figures into a run folder.")
    text = [general] if experiment is None else [general, ""] + describe_experiment(experiment).splitlines()
    p = _Parser(prog=program_name(), formatter_class=argparse.RawDescriptionHelpFormatter,
                usage=None if experiment is None else f"%(prog)s {experiment} [options]",
                description="\n".join(textwrap.fill(line, HELP_WIDTH, subsequent_indent="      " if line[:1] == " "
                                                     else "") for line in text),
                epilog=None if experiment is not None else
                f"'{program_name()} EXP --help' describes an experiment in every suite and preset.")
    p.add_argument("experiment", nargs="?", metavar=_one_of(EXPERIMENTS), help="the experiment (Table 1 of the paper)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} (torch {torch.__version__})")
    p.add_argument("--suite", default="paper", metavar=_one_of(TASKS),
                   help="paper (CIFAR-10/100, Tiny-ImageNet), fmnist (Fashion-MNIST, offline), fmnist_inverted "
                        "(exp1 only: the Fashion-MNIST tops, then the other classes inverted; a testbed where SGD "
                        "forgets) or a registered dataset's; default paper")
    p.add_argument("--preset", default="paper", metavar=_one_of(PRESETS),
                   help="paper (full size, needs a GPU), quick (scaled down), smoke (a few minutes) or cpu "
                        "(fmnist_inverted's exp1 on two CPU cores); default paper")
    p.add_argument("--methods", default=None, help=f"comma-separated, from: {', '.join(METHODS)} (default: all)")
    p.add_argument("--arch", default=None, metavar=_one_of(ARCHITECTURES),
                   help="the network (default: the experiment's; same as --set arch=\"NAME\")")
    p.add_argument("--runs", type=int, default=None, help="number of runs (default 5; 2 in the smoke preset)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--data-root", default=None, help="datasets and cached checkpoints "
                                                     "(default $FASTL2R_DATA, else ~/.cache/fastl2r)")
    p.add_argument("--out", default=None, help="run folder (default runs/EXP-SUITE-PRESET-TIME)")
    p.add_argument("--device", default=None, metavar=_one_of(("cpu", "cuda")),
                   help="default: cuda if available")
    p.add_argument("--parallel-runs", type=int, default=None, metavar="N",
                   help="meta-test up to N runs of a method side by side, as one folded network (ours, sgd, "
                        "sgd_x0.1, sgd_mean_delta, teacher, maml, rep; each run's results are its own up to "
                        "float round-off); "
                        f"default {AUTO_PARALLEL_RUNS['cuda']} on a GPU, {AUTO_PARALLEL_RUNS['cpu']} on a CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration value, e.g. --set metatest.eval_every=50 (repeatable)")
    p.add_argument("--metalearner", default=None, metavar="PATH",
                   help="use this trained meta-learner (a run's metalearner.pt, or one shipped in "
                        "fastl2r/trained/) for 'ours' instead of meta-training")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run in RUN_DIR with its own configuration "
                        "(meta-training restarts from its last checkpoint; --set metatrain.episodes=N "
                        "trains longer or stops sooner)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="a .py file or module that registers architectures, datasets or methods "
                        "(fastl2r.register_*); repeatable, recorded for --resume")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log meta-training and readouts to TensorBoard in RUN_DIR/tensorboard "
                        "(needs the tensorboard package)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load_plugins(argv: Sequence[str]) -> list[str]:
    """Import the ``--plugin`` modules of ``argv`` (before the parser lists the registered names);
    returns them as recorded for ``--resume`` (files by absolute path)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    specs = pre.parse_known_args(argv)[0].plugin
    for spec in specs:
        load_plugin(spec)
    return [str(Path(spec).resolve()) if spec.endswith(".py") else spec for spec in specs]


def new_run(args: argparse.Namespace, plugins: list[str]) -> tuple[dict, dict, Path]:
    """The configuration, run facts (methods, device, CPU threads, plugins) and folder of a new run."""
    if args.experiment is None:
        raise UserError("the following arguments are required: experiment (see --help)")
    arch = [f"arch={json.dumps(args.arch)}"] if args.arch is not None else []
    config = build_config(args.experiment, args.suite, args.preset, seed=args.seed, runs=args.runs,
                          overrides=arch + args.overrides)
    device = distributed.resolve_device(args.device).type
    if args.parallel_runs is not None and args.parallel_runs < 1:
        raise UserError(f"--parallel-runs {args.parallel_runs}: give a positive number of runs (1: one at a time)")
    run = {"methods_run": parse_methods(args.methods), "device": device, "threads": torch.get_num_threads(),
           "plugins": plugins, "parallel_runs": args.parallel_runs or AUTO_PARALLEL_RUNS[device]}
    if args.metalearner is not None:
        if not os.path.isfile(args.metalearner):
            raise UserError(f"--metalearner {args.metalearner}: no such file (a run's metalearner.pt)")
        config["methods"]["ours"]["metalearner"] = os.path.abspath(args.metalearner)
    out = args.out
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", f"{config['experiment']}-{config['suite']}-{config['preset']}-{stamp}")
    return config, run, Path(out)


# The options (argument dests) a resumed run may repeat but not change.
RESUME_OPTIONS = ("suite", "preset", "seed", "runs", "methods", "arch", "metalearner", "device", "out",
                  "parallel_runs")


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict:
    """The options of ``RESUME_OPTIONS`` that ``argv`` gives, even at their default values
    (argparse leaves an absent option's value in the namespace it is handed)."""
    unset = object()
    args = parser.parse_args(argv, namespace=argparse.Namespace(**{dest: unset for dest in RESUME_OPTIONS}))
    return {dest: getattr(args, dest) for dest in RESUME_OPTIONS if getattr(args, dest) is not unset}


def resumed_run(args: argparse.Namespace, given: dict) -> tuple[dict, dict, Path]:
    """The configuration, run facts and folder of the run being resumed.  Options and ``--set`` may
    repeat its configuration and change bookkeeping keys; a change to what it computes is refused."""
    folder = Path(args.resume)
    config, run = run_folder.read_run(folder)
    if args.experiment not in (None, config["experiment"]):
        raise UserError(f"--resume {folder} is a run of {config['experiment']}, not {args.experiment}")
    requested = copy.deepcopy(config)
    for dest in ("suite", "preset", "seed", "runs"):
        requested[dest] = given.get(dest, requested[dest])
    if "arch" in given:
        requested["arch"] = given["arch"]
    if "metalearner" in given:
        requested["methods"]["ours"]["metalearner"] = os.path.abspath(given["metalearner"])
    for item in args.overrides:
        apply_override(requested, item)
    changes = computation_changes(config, requested)
    if "methods" in given and parse_methods(given["methods"]) != run["methods_run"]:
        changes.append(f"--methods ({','.join(run['methods_run'])} → {','.join(parse_methods(given['methods']))})")
    if "device" in given and distributed.resolve_device(given["device"]).type != run["device"]:
        changes.append(f"--device ({run['device']} → {given['device']})")
    if "parallel_runs" in given and given["parallel_runs"] != run["parallel_runs"]:
        changes.append(f"--parallel-runs ({run['parallel_runs']} → {given['parallel_runs']})")
    if "out" in given and Path(given["out"]).absolute() != folder.absolute():
        changes.append(f"--out ({folder} → {given['out']})")
    if changes:
        raise UserError(f"--resume {folder} continues that run as it was started; these options would change it: "
                        f"{', '.join(changes)} (start a new run for that)")
    validate(requested)  # bookkeeping keys may have changed
    checkpoint = folder / CHECKPOINT
    if requested["metatrain"]["episodes"] != config["metatrain"]["episodes"] and checkpoint.exists():
        check_episode_count(_io.torch_load(checkpoint, "the meta-training checkpoint",
                                           "delete it to restart meta-training"), requested["metatrain"]["episodes"])
    return requested, run, folder


def check_backend(device: torch.device) -> None:
    """A forced backend (``$FASTL2R_BACKEND``) must exist and run on ``device``; the automatic
    choice always finds one."""
    if ops.requested_backend() is not None:
        try:
            ops.backend_name(device.type)
        except ops.BackendError as exc:
            raise UserError(str(exc)) from None


def check_data_root(root: Optional[str]) -> Path:
    """The data root, made if needed, writable; leftovers of killed writes in it are removed."""
    path = resolve_data_root(root)
    fix = "choose another with --data-root or $FASTL2R_DATA"
    if path.exists() and not path.is_dir():
        raise UserError(f"the data root {path} is a file, not a folder; {fix}")
    try:
        _io.check_writable(path)
    except WriteError as exc:
        raise UserError(f"the data root {path} is not writable ({exc.reason}); {fix}") from None
    for folder in (path, path / "checkpoints"):
        _io.remove_stale_tmp(folder)
    return path


def check_inputs(ws: Workspace, methods: Sequence[str]) -> None:
    """Read what the run will read before it computes anything: every dataset and task class of the
    configuration, the cached pre-trained networks, the meta-learner given, a resumed run's
    checkpoints.  A bad one stops the run before any pre-training (and before a new run's folder
    exists)."""
    slots = ws.config["metatrain"]["parallel_episodes"]
    if "ours" in methods and slots % ws.ranks.world:
        raise UserError(f"metatrain.parallel_episodes={slots} episode slots do not divide among the job's "
                        f"{ws.ranks.world} processes; choose a multiple of {ws.ranks.world}")
    tasks = ws.config["tasks"]
    for spec in [tasks["source"], *tasks["meta_train"], *tasks["meta_test"]]:
        ws.task(spec, spec["classes"] if "classes" in spec else spec["pool"])
    load_progress(ws)
    indices = {ws.metatest_checkpoint} | (set(range(ws.config["metatrain"]["checkpoints"])) if "ours" in methods else set())
    for index in sorted(indices):
        if ws.cached_path("w0", index).exists():
            ws.pretrained_state(index)  # read and checked now; it is cached, so nothing is trained
    if "ours" not in methods:
        return
    path = ws.config["methods"]["ours"]["metalearner"]
    if path:
        load_metalearner(path, ws.new_model(), arch=ws.config["arch"])
    elif (ws.out_dir / CHECKPOINT).exists():
        read_checkpoint(ws.out_dir / CHECKPOINT, ws.config, {"meta": MetaLearner(ws.new_model()).state_dict()})


def rank_shares(ws: Workspace, methods: Sequence[str]) -> dict:
    """What each process of the job does, for ``config.json``: the episode slots it meta-trains (when
    ``ours`` meta-trains here) and the meta-test runs it runs (run r on rank r mod N)."""
    world = ws.ranks.world
    shares: dict = {"processes": world}
    if "ours" in methods and not ws.config["methods"]["ours"]["metalearner"]:
        slots = job_slots(ws.config["metatrain"]["parallel_episodes"], ws.device.type, runs_slots(ws.new_model()),
                          world) // world
        shares["metatrain_slots"] = [list(range(r * slots, (r + 1) * slots)) for r in range(world)]
    shares["metatest_runs"] = [list(range(r, ws.config["runs"], world)) for r in range(world)]
    return shares


def network_passes(config: dict, methods: Sequence[str]) -> float:
    """An upper bound of the forward+backward passes (batch 64) of a run of ``methods``: pre-training
    (cached or not), Algorithm 1 when ``ours`` meta-trains here (no ``--metalearner``), the meta-test."""
    mt, test = config["metatrain"], config["metatest"]
    tasks = len(config["tasks"]["meta_test"])
    passes = 2 * 200 * config["pretrain"]["epochs"] * (1 + mt["checkpoints"])       # ~25k images at 128
    if "ours" in methods and not config["methods"]["ours"]["metalearner"]:
        passes += mt["episodes"] * mt["episode_steps"] * tasks * (4 + mt["tbptt"][2])
    passes += config["runs"] * len(methods) * test["steps_per_task"] * tasks * 2
    return passes


def estimate_seconds(config: dict, methods: Sequence[str], device: torch.device) -> float:
    """A rough duration: one measured forward+backward, times ``network_passes``."""
    from .models import ARCHITECTURES

    model = ARCHITECTURES[config["arch"]](3, [10]).to(device)
    x = torch.randn(64, 3, 32, 32, device=device)
    model(x).sum().backward()
    start = time.perf_counter()
    for _ in range(2):
        model(x).sum().backward()
    return network_passes(config, methods) * (time.perf_counter() - start) / 2


# A CPU run of more passes than this is timed (a few seconds), and one estimated to last more than
# LONG_CPU_RUN_HOURS gets its estimate printed first.
LONG_CPU_RUN_PASSES = 10_000
LONG_CPU_RUN_HOURS = 1.0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (``python -m fastl2r.train``, ``fastl2r-train``): check every input, meta-test into
    the run folder, print the summary; returns the exit status (0; 2 on bad input; 130 on Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    out_dir, started = None, False
    try:
        with contextlib.ExitStack() as held:
            held.callback(distributed.teardown)
            plugins = load_plugins(argv)
            parser = build_parser(next((a for a in argv if a in EXPERIMENTS), None))
            args = parser.parse_args(argv)
            if args.resume is not None:
                config, run, out_dir = resumed_run(args, given_options(parser, argv))
            else:
                config, run, out_dir = new_run(args, plugins)
            ranks, device = distributed.setup(run["device"])  # one process, or this rank of torchrun's job
            if ranks.writer:  # rank 0 alone owns the run folder
                if args.resume is not None:
                    held.enter_context(run_folder.RunLock(out_dir))
                else:
                    run_folder.check_new(out_dir)
            torch.set_num_threads(run["threads"])  # torch's CPU kernels round differently with other counts
            check_backend(device)
            data_root = check_data_root(args.data_root)
            methods = run["methods_run"]
            if ranks.writer and device.type == "cpu" and network_passes(config, methods) > LONG_CPU_RUN_PASSES:
                hours = estimate_seconds(config, methods, device) / 3600
                if hours > LONG_CPU_RUN_HOURS:
                    print(f"This run on a CPU: roughly {hours:,.1f} hours (estimated). "
                          "Use a GPU (--device cuda) or a smaller preset.", file=sys.stderr)
            workspace = Workspace(config, data_root=data_root, out_dir=out_dir, device=device,
                                  progress=not args.no_progress, tensorboard=args.tensorboard, ranks=ranks)
            check_inputs(workspace, methods)
            if ranks.writer:
                if args.resume is None:
                    held.enter_context(run_folder.create(out_dir))
                _io.remove_stale_tmp(out_dir)
                run_folder.write_run(out_dir, config, {**run, "ranks": rank_shares(workspace, methods)})
            ranks.barrier()  # the folder exists before any rank writes into it
            started = True
            start = time.perf_counter()
            results = run_metatest(workspace, methods, run["parallel_runs"])
            if results is None:  # another rank than 0: its runs went to rank 0
                ranks.leave()
                return 0
            results["seconds"] = round(time.perf_counter() - start, 1)
            paths = save_results(results, out_dir)
            ranks.leave()
    except UserError as exc:
        kept = f"; the run so far is kept: continue it with --resume {out_dir}" if started and isinstance(
            exc, WriteError) else ""
        # one write of the whole line: torchrun's ranks share stderr, and a separate newline interleaves
        sys.stderr.write(f"error: {exc}{kept}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        close_bars()  # those the interrupt left open: nothing prints after the last line
        where = (f"resume with: {program_name()} --resume {out_dir}" if started else "nothing was started")
        print(f"\ninterrupted; {where}", file=sys.stderr)
        return 130
    print(summary(results))
    print(f"wrote {', '.join(p.name for p in paths)} to {out_dir}")
    return 0


def summary(results: dict) -> str:
    """The lines printed when a run ends: per method and task, the readout accuracy at the task's first
    readout and at the last step (mean ± std over runs), and how meta-training's episodes ended
    (restarted at the loss threshold, non-finite)."""
    lines = [f"{results['experiment']} ({results['suite']} suite, {results['preset']} preset), "
             f"{results['seconds']} s; readout accuracy % (mean ± std), first → last step"]
    for name, entry in results["methods"].items():
        cells = []
        for task, series in entry["readout"].items():
            pairs = [(m, s) for m, s in zip(series["mean"], series["std"]) if m is not None]
            (m0, s0), (m1, s1) = pairs[0], pairs[-1]
            cells.append(f"{task} {100 * m0:.1f}±{100 * s0:.1f} → {100 * m1:.1f}±{100 * s1:.1f}")
        lines.append(f"  {name:9s} " + " | ".join(cells))
        trained = entry["info"].get("metatrain", {})
        if "nonfinite_episodes" in trained:  # Algorithm 1's meta-training (MAML's has its own facts)
            restarts = sum(stage["threshold"] for stage in trained.get("ended_by_threshold", {}).values())
            lines.append(f"  {'':9s} meta-trained on {trained['episodes']} episodes ({trained['inner_steps']:,} inner "
                         f"steps), {restarts} of them restarted at the loss threshold, "
                         f"{trained['nonfinite_episodes']} ended non-finite")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
