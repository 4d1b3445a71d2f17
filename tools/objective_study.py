"""What an update rule does to Algorithm 1's objectives, and how the student's representation drifts.

For each rule — ``delta=1`` (plain SGD: the meta-learner at its initialisation), ``delta=0``
(the body frozen) and every trained meta-learner given — this runs meta-training episodes with θ
held fixed (no Adam step) to the horizon, and reports:

- the mean along the trajectory of every objective of ``metatrain.objective`` (the paper's Huber
  on raw representations, and the centred / standardised variants), and its reduction against
  ``delta=1``;
- statistics of the rule's multipliers δ (mean, standard deviation, share negative, quantiles);
- the drift of the student's representation of Task A's test images at the horizon from ``w0``'s,
  split into the squared mean shift (which a linear readout with a bias ignores) and the rest.

    python tools/objective_study.py EXP --suite SUITE --preset PRESET [--metalearner NAME=PATH ...]
        [--episodes 3] [--set KEY=VALUE ...] [--out study.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastl2r import _io
from fastl2r.data import to_float
from fastl2r.experiments import build_config
from fastl2r.meta import MetaLearner, load_metalearner
from fastl2r.meta import unroll as unroll_module
from fastl2r.meta.trainer import MetaTrainer
from fastl2r.meta.unroll import OBJECTIVES, fold, representation_loss
from fastl2r.ops import unpack_head
from fastl2r.workspace import Workspace


def constant_rule(meta: MetaLearner, delta: float) -> MetaLearner:
    """``meta`` changed so that δ ≡ ``delta`` whatever the features: zero output weights, s = delta / tanh(b)."""
    with torch.no_grad():
        for group, head in zip(meta.groups, meta.head):
            w_out, b_out, scale = unpack_head(head, group.dims)
            w_out.zero_()
            scale.copy_(delta / torch.tanh(b_out[:, 0]))
    return meta


def study(trainer: MetaTrainer, episodes: int) -> dict:
    """Run ``episodes`` episodes with θ fixed and measure the objectives, δ and the drift."""
    trainer.optimizer.lr = 0.0
    objectives = {name: [] for name in OBJECTIVES}
    deltas = []
    real_loss, real_step = unroll_module.representation_loss, MetaLearner.step

    def every_objective(student, teacher, objective):  # the trajectory does not depend on the objective
        for name in OBJECTIVES:
            objectives[name].append(trainer.mt["loss_scale"] * representation_loss(student, teacher, name).item())
        return real_loss(student, teacher, objective)

    def recording_step(meta, weights, grads, means, state, theta=None):
        new_weights, new_state, delta = real_step(meta, weights, grads, means, state, theta)
        deltas.append(torch.cat([d.detach().flatten() for d in delta]))
        return new_weights, new_state, delta

    unroll_module.representation_loss = every_objective
    MetaLearner.step = recording_step
    drift = []
    try:
        source = trainer.workspace.source_task()
        images = to_float(source.test_images()[:500], source.dataset).to(trainer.device, next(
            trainer.meta.parameters()).dtype)
        pool = trainer._checkpoint_pool()
        while trainer.progress.episode < episodes:
            finished = trainer.run_window()
            for record in finished:
                st = trainer.state
                with torch.no_grad():
                    h = trainer.unroll.represent(st.student, st.student_plain, fold(images[None]))[:, 0]
                    h0 = trainer.unroll.represent([f[record.checkpoint] for f in pool["flats"]],
                                                  {n: t[record.checkpoint] for n, t in pool["plain"].items()},
                                                  fold(images[None]))[:, 0]
                shift = (h - h0).mean(0)
                drift.append({"mean_shift_squared": shift.square().sum().item(),
                              "rest": (h - h0 - shift).square().sum(1).mean().item(), "steps": record.steps})
    finally:
        unroll_module.representation_loss = real_loss
        MetaLearner.step = real_step
    all_deltas = torch.cat(deltas).double()
    quantiles = torch.quantile(all_deltas[torch.randperm(len(all_deltas))[:1_000_000]],
                               torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    return {"objectives": {k: sum(v) / len(v) for k, v in objectives.items()},
            "delta": {"mean": all_deltas.mean().item(), "std": all_deltas.std().item(),
                      "negative": (all_deltas < 0).double().mean().item(),
                      "quantiles_5_25_50_75_95": quantiles.tolist()},
            "drift": {k: sum(d[k] for d in drift) / len(drift) for k in ("mean_shift_squared", "rest")},
            "episodes": episodes, "steps": trainer.progress.inner_steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("--suite", default="fmnist")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--metalearner", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    config = build_config(args.experiment, args.suite, args.preset, overrides=[
        *args.overrides, "metatrain.threshold=[1e9, 0.0, 1e9]", "metatrain.parallel_episodes=1"])
    ws = Workspace(config, data_root=args.data_root, progress=False)
    rules = {"delta=1": None, "delta=0": 0.0}
    rules.update(dict(item.split("=", 1) for item in args.metalearner))
    report = {}
    for name, rule in rules.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])
            meta = MetaLearner(ws.new_model(), lr=config["metatrain"]["lr"])
        if isinstance(rule, str):
            meta = load_metalearner(rule, ws.new_model(), lr=config["metatrain"]["lr"])
        elif rule is not None:
            meta = constant_rule(meta, rule)
        report[name] = study(MetaTrainer(ws, meta=meta), args.episodes)
        base = report["delta=1"]["objectives"]
        report[name]["reduction_vs_delta_1"] = {k: 1 - v / base[k] for k, v in report[name]["objectives"].items()}
        print(name, json.dumps(report[name]), flush=True)
    if args.out:
        _io.write_json(Path(args.out), {"config": config, "rules": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
