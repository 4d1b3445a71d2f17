"""Whole-window capture on CUDA: one T-BPTT window of the vectorised meta-trainer as one CUDA graph.

A window (``MetaTrainer.window_steps``) reads nothing back to the host, so all its steps —
every slot's teacher step, student gradient, learned update, meta-loss, the backward through
the window and the masked Adam step on θ — can be captured once and replayed.  This check runs
on a CUDA machine, for S episode slots at Experiment 1's shapes (synthetic data, see
``harness.InnerStepRig``):

1. eager: two windows from the same start (the second timed with CUDA events);
2. capture: the same window captured into a ``torch.cuda.CUDAGraph`` from the same start,
   replayed, its θ compared with the eager one, then replays timed;

and prints episode-steps per second of both and their ratio; the last line sums it up for the
GPU check.  ``python -m benchmarks.capture_check [--arch resnet32_gn] [--slots 1,16] [--window 5]``.
Figures go to ``$GPU_CHECK_RUN/capture.json`` when that folder is set.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

from .harness import InnerStepRig

REPLAYS = 5


def _clone(tree):
    """A deep copy of a slot state (tensors cloned), to restart windows from the same point."""
    return copy.deepcopy(tree)


def _assign(target: dict, source: dict) -> None:
    """Copy every tensor of ``source`` into the same place of ``target`` (static capture inputs)."""
    for key, value in source.items():
        if isinstance(value, torch.Tensor):
            target[key].copy_(value)
        elif isinstance(value, dict):
            _assign(target[key], value)
        elif isinstance(value, list):
            _assign(dict(enumerate(target[key])), dict(enumerate(value)))


def check(arch: str, slots: int, window: int) -> dict:
    """Eager vs captured window of ``slots`` slots: θ agreement and episode-steps per second."""
    from fastl2r.meta.unroll import SlotState

    rig = InnerStepRig(arch, "cuda", slots=slots)
    trainer = rig.trainer
    trainer.window_steps(window)  # warm-up: autotuning, caches, allocator
    start = _clone(trainer.state.tensors())
    theta0 = [p.detach().clone() for p in trainer.meta.parameters()]
    adam0 = _clone(trainer.optimizer.state_dict())

    def restart() -> None:
        with torch.no_grad():
            for p, p0 in zip(trainer.meta.parameters(), theta0):
                p.copy_(p0)
        trainer.optimizer.load_state_dict(_clone(adam0))

    restart()
    trainer.state = SlotState.from_tensors(_clone(start))
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    trainer.window_steps(window)
    end.record()
    torch.cuda.synchronize()
    eager_seconds = begin.elapsed_time(end) / 1e3
    eager_theta = [p.detach().clone() for p in trainer.meta.parameters()]

    restart()
    static = _clone(start)
    trainer.state = SlotState.from_tensors(static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        trainer.window_steps(window)
    torch.cuda.current_stream().wait_stream(side)
    restart()
    trainer.state = SlotState.from_tensors(static)
    _assign(static, start)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        trainer.window_steps(window)
    restart()  # capture records the kernels; replay runs them from the start state
    _assign(static, start)
    graph.replay()
    torch.cuda.synchronize()
    difference = max((p - q).abs().max().item() for p, q in zip(trainer.meta.parameters(), eager_theta))
    scale = max(q.abs().max().item() for q in eager_theta)
    times = []
    for _ in range(REPLAYS):
        restart()
        _assign(static, start)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    captured_seconds = sorted(times)[len(times) // 2]
    steps = window * slots
    return {"arch": arch, "slots": slots, "window": window, "theta_max_abs_difference": difference,
            "theta_scale": scale, "eager_episode_steps_per_s": steps / eager_seconds,
            "captured_episode_steps_per_s": steps / captured_seconds,
            "speedup": eager_seconds / captured_seconds, "device": torch.cuda.get_device_name()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet32_gn")
    parser.add_argument("--slots", default="1,16", help="comma-separated slot counts (default 1,16)")
    parser.add_argument("--window", type=int, default=5, help="steps per window (default 5)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("capture: needs a CUDA GPU; none here", file=sys.stderr)
        return 2
    rows = []
    for slots in (int(s) for s in args.slots.split(",")):
        try:
            row = check(args.arch, slots, args.window)
        except Exception as exc:  # the check reports what broke and goes on with the next size
            row = {"arch": args.arch, "slots": slots, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        rows.append(row)
        print(json.dumps(row))
    out = os.environ.get("GPU_CHECK_RUN")
    if out:
        Path(out, "capture.json").write_text(json.dumps(rows, indent=2) + "\n")
    ok = [r for r in rows if "error" not in r and r["theta_max_abs_difference"] <= 1e-3 * max(r["theta_scale"], 1)]
    summary = ", ".join(f"S={r['slots']}: {r['captured_episode_steps_per_s']:.0f} vs {r['eager_episode_steps_per_s']:.0f} "
                        f"episode-steps/s ({r['speedup']:.1f}x)" for r in ok)
    failed = [r for r in rows if r not in ok]
    print(f"whole window captured: {summary or 'none'}" + (f"; failed: {failed}" if failed else ""))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
