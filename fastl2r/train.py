"""Command line: ``python -m fastl2r.train exp1 --suite fmnist --preset smoke`` (installed as
``fastl2r-train``).

A thin layer over ``fastl2r.metatest.run_metatest``.  Bad input prints one line on stderr and
exits with status 2; Ctrl-C prints how to resume and exits with status 130.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import __version__, _io
from .errors import UserError
from .experiments import EXPERIMENTS, PRESETS, TASKS, build_config, describe_experiment
from .methods import METHODS, parse_methods
from .metatest import run_metatest, save_results
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
                   help="paper (CIFAR-10/100, Tiny-ImageNet), fmnist (Fashion-MNIST, offline) or a registered "
                        "dataset's; default paper")
    p.add_argument("--preset", default="paper", metavar=_one_of(PRESETS),
                   help="paper (full size, needs a GPU), quick (scaled down) or smoke (a few minutes); default paper")
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration value, e.g. --set metatest.eval_every=50 (repeatable)")
    p.add_argument("--metalearner", default=None, metavar="PATH",
                   help="use this trained meta-learner (a run's metalearner.pt) for 'ours' instead of meta-training")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run in RUN_DIR with its own configuration "
                        "(meta-training restarts from its last checkpoint)")
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


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but this torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def prepare_out_dir(out: Optional[str], config: dict) -> Path:
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", f"{config['experiment']}-{config['suite']}-{config['preset']}-{stamp}")
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with _io.atomic_path(path / ".write-test") as tmp:
            tmp.write_bytes(b"")
        (path / ".write-test").unlink()
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {str(path)!r}: {exc.strerror or exc}; "
                        "choose another with --out") from None
    return path


def resumed_run(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The configuration and methods of the run being resumed (other options must not differ)."""
    path = Path(args.resume) / "config.json"
    if not path.is_file():
        raise UserError(f"--resume {args.resume}: no config.json there; pass the folder of an earlier run")
    try:
        saved = json.loads(path.read_text())
        methods = saved.pop("methods_run")
        saved.pop("device", None)
    except (ValueError, KeyError) as exc:
        raise UserError(f"--resume: {path} is not a run configuration ({exc})") from None
    if args.experiment not in (None, saved["experiment"]):
        raise UserError(f"--resume {args.resume} is a run of {saved['experiment']}, not {args.experiment}")
    return saved, methods


def network_passes(config: dict) -> float:
    """An upper bound of the forward+backward passes of a run (batch 64), from its configuration."""
    mt, test = config["metatrain"], config["metatest"]
    tasks = len(config["tasks"]["meta_test"])
    passes = 2 * 200 * config["pretrain"]["epochs"] * (1 + mt["checkpoints"])       # ~25k images at 128
    passes += mt["episodes"] * mt["episode_steps"] * tasks * (4 + mt["tbptt"][2])     # Algorithm 1, upper bound
    passes += config["runs"] * len(config["methods"]) * test["steps_per_task"] * tasks * 2
    return passes


def estimate_seconds(config: dict, device: torch.device) -> float:
    """A rough duration: one measured forward+backward, times ``network_passes``."""
    from .models import ARCHITECTURES

    model = ARCHITECTURES[config["arch"]](3, [10]).to(device)
    x = torch.randn(64, 3, 32, 32, device=device)
    model(x).sum().backward()
    start = time.perf_counter()
    for _ in range(2):
        model(x).sum().backward()
    return network_passes(config) * (time.perf_counter() - start) / 2


# Runs of more passes than this on a CPU get their estimated duration printed first.
LONG_CPU_RUN_PASSES = 200_000


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dir = None
    try:
        plugins = load_plugins(argv)
        args = build_parser(next((a for a in argv if a in EXPERIMENTS), None)).parse_args(argv)
        if args.resume is not None:
            config, methods = resumed_run(args)
            for spec in config.pop("plugins", []):
                if spec not in plugins:
                    load_plugin(spec)
                    plugins.append(spec)
            out = args.resume
        else:
            if args.experiment is None:
                raise UserError("the following arguments are required: experiment (see --help)")
            arch = [f"arch={json.dumps(args.arch)}"] if args.arch is not None else []
            config = build_config(args.experiment, args.suite, args.preset, seed=args.seed, runs=args.runs,
                                  overrides=arch + args.overrides)
            methods = parse_methods(args.methods)
            out = args.out
        if args.metalearner is not None:
            if not os.path.isfile(args.metalearner):
                raise UserError(f"--metalearner {args.metalearner}: no such file (a run's metalearner.pt)")
            config["methods"]["ours"]["metalearner"] = os.path.abspath(args.metalearner)
        device = resolve_device(args.device)
        out_dir = prepare_out_dir(out, config)
        if device.type == "cpu" and network_passes(config) > LONG_CPU_RUN_PASSES:
            hours = estimate_seconds(config, device) / 3600
            print(f"This run on a CPU: roughly {hours:,.0f} hours (estimated). "
                  "Use a GPU (--device cuda) or a smaller preset.", file=sys.stderr)
        _io.write_json(out_dir / "config.json", {**config, "methods_run": methods, "device": str(device),
                                                 "plugins": plugins})
        workspace = Workspace(config, data_root=args.data_root, out_dir=out_dir, device=device,
                              progress=not args.no_progress, tensorboard=args.tensorboard)
        start = time.perf_counter()
        results = run_metatest(workspace, methods)
        results["seconds"] = round(time.perf_counter() - start, 1)
        paths = save_results(results, out_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_bars()  # those the interrupt left open: nothing prints after the last line
        where = (f"resume with: {program_name()} --resume {out_dir}" if out_dir is not None
                 else "nothing was started")
        print(f"\ninterrupted; {where}", file=sys.stderr)
        return 130
    print(summary(results))
    print(f"wrote {', '.join(p.name for p in paths)} to {out_dir}")
    return 0


def summary(results: dict) -> str:
    """Step-0 and final readout accuracy per method and task."""
    lines = [f"{results['experiment']} ({results['suite']} suite, {results['preset']} preset), "
             f"{results['seconds']} s; readout accuracy % (mean ± std), first → last step"]
    for name, entry in results["methods"].items():
        cells = []
        for task, series in entry["readout"].items():
            pairs = [(m, s) for m, s in zip(series["mean"], series["std"]) if m is not None]
            (m0, s0), (m1, s1) = pairs[0], pairs[-1]
            cells.append(f"{task} {100 * m0:.1f}±{100 * s0:.1f} → {100 * m1:.1f}±{100 * s1:.1f}")
        lines.append(f"  {name:9s} " + " | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
