"""Print BENCHMARKS.md's ratio table from pytest-benchmark's JSON.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python -m benchmarks.ratio_table bench.json [--out table.md]

One row per benchmark: op (and its episode slots, if more than one), backend, device, median;
how many times faster than the eager reference and than ``torch.compile`` of the reference
(their median / this median, same benchmark, same slots, same device, same run); the achieved
memory bandwidth (the op's bytes model, stated in its benchmark file, / median) beside the
device's copy bandwidth (``bench_copy``).
The median is the CUDA-events median on a GPU, pytest-benchmark's median on a CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from fastl2r import _io
from fastl2r.errors import UserError

from .harness import COMPILED, EAGER, VARIANTS

OPS = ("channel_means", "meta_lstm", "gated_update", "meta_update", "inner_step", "episode", "copy")
OP_LABELS = {"channel_means": "channel means, resnet32_gn, batch 64",
             "meta_lstm": "meta-LSTM fwd+bwd, all resnet32_gn groups",
             "gated_update": "gated update fwd+bwd, all resnet32_gn groups",
             "meta_update": "meta-learner update fwd+bwd, resnet32_gn",
             "inner_step": "inner step, Exp 1 shapes, 9th of a T-BPTT window",
             "episode": "short episode, exp1 fmnist quick",
             "copy": "tensor copy"}


def load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}; pass the file written by "
                        "`pytest benchmarks/ --benchmark-only --benchmark-json=FILE`") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not JSON ({exc}); pass the file written by --benchmark-json") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise UserError(f"{path} has no 'benchmarks' list: it is not pytest-benchmark's --benchmark-json output")
    return data


def rows_of(data: dict, path: str) -> list[dict]:
    """Each benchmark run by ``benchmarks/`` (extra_info written by ``harness.measure``)."""
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "op" not in info:
            raise UserError(f"{path}: benchmark {bench.get('name')!r} has no op in its extra_info; "
                            "the file was not written by fastl2r's benchmarks/")
        median = info.get("median_s", bench["stats"]["median"])
        rows.append(dict(op=info["op"], slots=info.get("slots", 1), variant=info["variant"], device=info["device"],
                         median=median, bytes=info.get("bytes"), rounds=bench["stats"]["rounds"]))
    return rows


def format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def table(rows: Sequence[dict]) -> str:
    def order(r):
        return (r["device"], OPS.index(r["op"]) if r["op"] in OPS else len(OPS), r["op"], r["slots"],
                VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else len(VARIANTS))
    medians = {(r["device"], r["op"], r["slots"], r["variant"]): r["median"] for r in rows}
    copy = {r["device"]: r["bytes"] / r["median"] for r in rows if r["op"] == "copy" and r["bytes"]}
    lines = ["| op | backend | device | median | × vs eager reference | × vs compiled reference "
             "| achieved GB/s | copy GB/s | rounds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=order):
        ratios = []
        for baseline in (EAGER, COMPILED):
            base = medians.get((r["device"], r["op"], r["slots"], baseline))
            ratios.append("—" if base is None or r["op"] == "copy" else f"{base / r['median']:.2f}")
        achieved = f"{r['bytes'] / r['median'] / 1e9:.3g}" if r["bytes"] else "—"
        device_copy = f"{copy[r['device']] / 1e9:.3g}" if r["bytes"] and r["device"] in copy else "—"
        slots = f", {r['slots']} episode slots" if r["slots"] > 1 else ""
        label = OP_LABELS.get(r["op"], r["op"]) + slots
        lines.append(f"| {label} | {r['variant']} | {r['device']} "
                     f"| {format_seconds(r['median'])} | {ratios[0]} | {ratios[1]} | {achieved} | {device_copy} "
                     f"| {r['rounds']} |")
    return "\n".join(lines)


def header(data: dict) -> str:
    m = data.get("machine_info", {})
    return (f"Measured {data.get('datetime', '?')[:10]}: torch {m.get('torch', '?')} "
            f"(CPU threads: {m.get('torch_threads', '?')}), Triton {m.get('triton') or '—'}, "
            f"Python {m.get('python', '?')}, GPU {m.get('gpu') or 'none'}, CPU {m.get('cpu', {}).get('brand_raw', '?')}.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Print the ratio table from pytest-benchmark's JSON.")
    parser.add_argument("json", nargs="+", help="files written by --benchmark-json")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    try:
        parts, rows = [], []
        for path in args.json:
            data = load(path)
            parts.append(header(data))
            rows += rows_of(data, path)
        if not rows:
            raise UserError("no benchmark ran in " + ", ".join(args.json) + " (were they all skipped?)")
        text = "\n".join(parts) + "\n\n" + table(rows) + "\n"
        if args.out:
            _io.write_text(args.out, text)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
