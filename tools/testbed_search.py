"""The search for a testbed where SGD forgets Task A's representation (docs/testbed.md).

Every configuration tried is a named candidate below: a base experiment of ``fastl2r.experiments``
and ``--set`` overrides.  Measurements go through the library's own API (``run_metatest``, the
meta-test protocol of DESIGN §1.5–1.6; ``Workspace.pretrained_state``, which caches ``w0`` under
the data root) and are appended, one JSON object a line, to a results file that ``table`` renders::

    python tools/testbed_search.py screen tops-invert-r8 --set metatest.steps_per_task=1000 --runs 2
    python tools/testbed_search.py plateau tops-invert-r8 --epochs 1 2 5 10 20 40
    python tools/testbed_search.py screen fmnist_inverted-cpu --runs 5
    python tools/testbed_search.py screen fmnist_inverted-cpu --runs 1 --methods lwf,ewc,ours
    python tools/testbed_search.py table

Forgetting is readout_A(0) − readout_A(horizon), in points; a method's seconds are the wall time
of ``run_metatest(workspace, [method])`` divided by the runs (readouts included, ``w0`` already cached).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fastl2r.experiments import build_config, get
from fastl2r.metatest import run_metatest
from fastl2r.workspace import Workspace

FMNIST_TOPS = [0, 2, 3, 4, 6]      # T-shirt, pullover, dress, coat, shirt
FMNIST_REST = [1, 5, 7, 8, 9]      # trouser, sandal, sneaker, bag, ankle boot


def spec(dataset: str, classes, part: str = "all", transform: str = "none") -> dict:
    """A fixed task spec; ``transform`` is left out when none (a spec as the suites write it)."""
    out = {"dataset": dataset, "classes": list(classes), "train_part": part}
    if transform != "none":
        out["transform"] = transform
    return out


def tasks(source, meta_train, meta_test) -> list[str]:
    """Overrides replacing Task A's classes and the meta-train / meta-test Task B specs."""
    return [f"tasks.source.classes={json.dumps(list(source))}",
            f"tasks.meta_train={json.dumps([meta_train])}", f"tasks.meta_test={json.dumps([meta_test])}"]


def halves(source, classes, transform: str = "none") -> list[str]:
    """Experiment 1's protocol: Task B's classes, first half of their images to meta-train, the
    other half to meta-test."""
    return tasks(source, spec("fashion_mnist", classes, "first_half", transform),
                 spec("fashion_mnist", classes, "second_half", transform))


def screen(arch: str = "resnet8_gn", horizon: int = 500, every: int = 100, epochs: float = 5.0) -> list[str]:
    return [f'arch="{arch}"', f"metatest.steps_per_task={horizon}", f"metatest.eval_every={every}",
            f"pretrain.epochs={epochs}"]


# name -> (experiment, suite, preset, overrides).  Readout sizes are the preset's unless overridden.
CANDIDATES: dict[str, tuple[str, str, str, list[str]]] = {
    "fmnist-r8": ("exp1", "fmnist", "quick", screen()),
    "invert-r8": ("exp1", "fmnist", "quick", screen() + halves(range(5), range(5, 10), "invert")),
    "rot90-r8": ("exp1", "fmnist", "quick", screen() + halves(range(5), range(5, 10), "rot90")),
    "digits-r8": ("exp1", "fmnist", "quick", screen() + tasks(range(5), spec("digits", range(5)),
                                                               spec("digits", range(5, 10)))),
    "tops-r8": ("exp1", "fmnist", "quick", screen() + halves(FMNIST_TOPS, FMNIST_REST)),
    "tops-invert-r8": ("exp1", "fmnist", "quick", screen() + halves(FMNIST_TOPS, FMNIST_REST, "invert")),
    "digits10-r8": ("exp1", "fmnist", "quick", screen() + tasks(range(5), spec("digits", range(10), "first_half"),
                                                                 spec("digits", range(10), "second_half"))),
    "a10-digits-r8": ("exp1", "fmnist", "quick", screen() + tasks(range(10), spec("digits", range(5)),
                                                                   spec("digits", range(5, 10)))),
    "a10-digits10-r8": ("exp1", "fmnist", "quick", screen() + tasks(
        range(10), spec("digits", range(10), "first_half"), spec("digits", range(10), "second_half"))),
    "tops-digits-r8": ("exp1", "fmnist", "quick", screen() + tasks(FMNIST_TOPS, spec("digits", range(5)),
                                                                    spec("digits", range(5, 10)))),
    "digits-r14": ("exp1", "fmnist", "quick", screen("resnet14_gn") + tasks(range(5), spec("digits", range(5)),
                                                                              spec("digits", range(5, 10)))),
    "tops-invert-r14": ("exp1", "fmnist", "quick",
                        screen("resnet14_gn") + halves(FMNIST_TOPS, FMNIST_REST, "invert")),
    # the chosen testbed, exactly as the library ships it (suite fmnist_inverted, preset cpu)
    "fmnist_inverted-cpu": ("exp1", "fmnist_inverted", "cpu", []),
}


def candidate_config(name: str, runs: int, extra: list[str] = ()) -> dict:
    if name not in CANDIDATES:
        raise SystemExit(f"unknown candidate {name!r}; choose one of: {', '.join(CANDIDATES)}")
    experiment, suite, preset, overrides = CANDIDATES[name]
    return build_config(experiment, suite, preset, runs=runs, overrides=[*overrides, *extra])


def describe(config: dict) -> dict:
    """The levers of the search, as the configuration holds them."""
    def task_text(s: dict) -> str:
        part = "" if s["train_part"] == "all" else f" {s['train_part']}"
        shift = f" +{s['transform']}" if "transform" in s else ""
        return f"{s['dataset']}{s['classes']}{part}{shift}"

    return {"task_a": task_text(config["tasks"]["source"]),
            "meta_train_b": task_text(config["tasks"]["meta_train"][0]),
            "meta_test_b": task_text(config["tasks"]["meta_test"][0]),
            **{key: get(config, key) for key in (
                "arch", "metatest.steps_per_task", "metatest.eval_every", "methods.sgd.lr", "pretrain.epochs",
                "readout.max_train", "readout.max_test", "readout.steps")}}


def append(path: Path, record: dict) -> None:
    with path.open("a") as stream:
        stream.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def untrained_metalearner(workspace: Workspace) -> str:
    """A meta-learner as meta-training starts it (δ ≡ 1, i.e. SGD's update) for this architecture,
    saved under the data root: ``ours`` with it costs what a trained one costs, so it times ``ours``
    without meta-training; its forgetting numbers mean nothing."""
    from fastl2r.meta import MetaLearner, save_metalearner

    path = workspace.cache_dir / f"untrained-metalearner-{workspace.config['arch']}.pt"
    if not path.exists():
        save_metalearner(MetaLearner(workspace.new_model(), lr=workspace.config["metatrain"]["lr"]), path)
    return str(path)


def run_screen(args) -> None:
    config = candidate_config(args.candidate, args.runs, args.set)
    workspace = Workspace(config, data_root=args.data_root, device="cpu", progress=False)
    w0 = workspace.pretrained_state()
    record = {"kind": "screen", "candidate": args.candidate, "overrides": args.set, "runs": args.runs,
              "date": time.strftime("%Y-%m-%d %H:%M"), "config": describe(config),
              "w0_test_accuracy": w0["test_accuracy"], "methods": {}}
    if "ours" in args.methods.split(",") and not config["methods"]["ours"]["metalearner"]:
        config["methods"]["ours"]["metalearner"] = untrained_metalearner(workspace)
        record["ours"] = "untrained meta-learner (delta = 1): timing only"
    for method in args.methods.split(","):
        start = time.perf_counter()
        results = run_metatest(workspace, [method])
        seconds = (time.perf_counter() - start) / args.runs
        steps = results["eval_steps"]
        readout = results["methods"][method]["runs"]["readout"]
        record["methods"][method] = {
            "seconds_per_run": round(seconds, 1), "eval_steps": steps,
            "task_a_readout": [[round(100 * v, 2) for v in run] for run in readout["task1"]],
            "task_b_readout": [[None if v is None else round(100 * v, 2) for v in run] for run in readout["task2"]],
        }
        print(f"{method}: {seconds:.1f} s per run", file=sys.stderr, flush=True)
    record["task_names"] = results["task_names"]
    append(args.results, record)


def run_plateau(args) -> None:
    for epochs in args.epochs:
        config = candidate_config(args.candidate, 1, [*args.set, f"pretrain.epochs={epochs}"])
        workspace = Workspace(config, data_root=args.data_root, device="cpu", progress=False)
        start = time.perf_counter()
        w0 = workspace.pretrained_state()
        append(args.results, {"kind": "plateau", "candidate": args.candidate, "overrides": args.set,
                              "date": time.strftime("%Y-%m-%d %H:%M"), "arch": config["arch"],
                              "task_a": describe(config)["task_a"], "epochs": epochs, "steps": w0["steps"],
                              "test_accuracy": round(100 * w0["test_accuracy"], 2),
                              "seconds": round(time.perf_counter() - start, 1)})


def forgetting(method: dict, step: int) -> list[float]:
    """readout_A(0) − readout_A(step) per run, in points."""
    at = method["eval_steps"].index(step)
    return [round(run[0] - run[at], 2) for run in method["task_a_readout"]]


def mean_std(values: list[float]) -> str:
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {spread:.1f}"


def run_table(args) -> None:
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    print("| candidate | Task A | Task B (meta-test) | arch | w0 ep. (acc) | readout | step | runs | "
          "SGD forgets | teacher forgets | SGD×0.1 forgets | SGD Task B | s/run sgd, teacher |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if r["kind"] != "screen" or "sgd" not in r["methods"]:
            continue
        c, m = r["config"], r["methods"]
        name = r["candidate"] + "".join(f" `{o}`" for o in r["overrides"])
        horizon = c["metatest.steps_per_task"]
        for step in sorted({s for s in (200, 300, 500, horizon) if s in m["sgd"]["eval_steps"]}):
            cells = [mean_std(forgetting(m[k], step)) if k in m else "" for k in ("sgd", "teacher", "sgd_x0.1")]
            task_b = statistics.fmean(run[m["sgd"]["eval_steps"].index(step)] for run in m["sgd"]["task_b_readout"])
            seconds = ", ".join(str(m[k]["seconds_per_run"]) for k in ("sgd", "teacher") if k in m)
            print(f"| {name} | {c['task_a']} | {c['meta_test_b']} | {c['arch']} | {c['pretrain.epochs']:g} "
                  f"({100 * r['w0_test_accuracy']:.1f}) | {c['readout.max_train']}/{c['readout.max_test']} | {step} | "
                  f"{r['runs']} | " + " | ".join(cells) + f" | {task_b:.1f} | {seconds} |")
    print("\n| candidate | runs | date | seconds per run of each method |")
    print("|---|---|---|---|")
    for r in records:
        if r["kind"] == "screen":
            seconds = ", ".join(f"{k} {v['seconds_per_run']}" for k, v in r["methods"].items())
            name = r["candidate"] + "".join(f" `{o}`" for o in r["overrides"])
            print(f"| {name} | {r['runs']} | {r['date']} | {seconds} |")
    print("\n| candidate | arch | Task A | pre-training epochs | steps | Task A test accuracy % | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        if r["kind"] == "plateau":
            print(f"| {r['candidate']} | {r['arch']} | {r['task_a']} | {r['epochs']:g} | {r['steps']} | "
                  f"{r['test_accuracy']:.2f} | {r['seconds']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("testbed-search.jsonl"),
                        help="the JSON-lines file measurements are appended to (default ./testbed-search.jsonl)")
    parser.add_argument("--data-root", default=None, help="datasets and cached w0 checkpoints "
                                                          "(default $FASTL2R_DATA, else ~/.cache/fastl2r)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    commands = parser.add_subparsers(dest="command", required=True)
    screen_parser = commands.add_parser("screen", help="meta-test methods on a candidate")
    screen_parser.add_argument("candidate")
    screen_parser.add_argument("--runs", type=int, default=1)
    screen_parser.add_argument("--methods", default="sgd,teacher,sgd_x0.1")
    plateau_parser = commands.add_parser("plateau", help="w0's Task A test accuracy against pre-training epochs")
    plateau_parser.add_argument("candidate")
    plateau_parser.add_argument("--epochs", type=float, nargs="+", required=True)
    for sub in (screen_parser, plateau_parser):
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a further override of the candidate's configuration (repeatable)")
    commands.add_parser("table", help="the search table (markdown) from the results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"screen": run_screen, "plateau": run_plateau, "table": run_table}[args.command](args)


if __name__ == "__main__":
    main()
