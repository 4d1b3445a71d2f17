"""Compile every Triton kernel of fastl2r for a CUDA GPU, without one, and report its resources.

A developer tool of the source tree (not installed with the package):
``python tools/compile_check.py [--arch 90] [--dtypes float32,float64] [--groups 1,4]
[--json]`` (with ``TRITON_INTERPRET`` unset) runs the Triton ops, forward and backward, on the
meta-net groups of ``resnet32_gn`` (and the channel means) with CPU tensors and every kernel
launch *captured* instead of run, then
compiles each distinct launch (kernel, constants, argument types: exactly what the
launchers would compile on a GPU, at the GPU block sizes) with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``, and reads registers, spills and shared memory from
``ptxas -v``.  It proves the kernels compile for a GPU this machine does not have, and
documents what each costs in registers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastl2r.kernels import INTERPRETED, channel_means, gated_update, meta_lstm
from fastl2r.meta import MetaLearner
from fastl2r.models import resnet32_gn
from fastl2r.ops.layout import NUM_CELLS

_MODULES = (channel_means, gated_update, meta_lstm)
_POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                  torch.int32: "*i32", torch.int64: "*i64"}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the launchers would issue it."""

    kernel: str
    signature: tuple[tuple[str, str], ...]   # (argument, Triton type) of every runtime argument
    constants: tuple[tuple[str, object], ...]

    def describe(self) -> str:
        """The constants that tell one launch of a kernel from another, for the report."""
        keep = ("K", "H", "D", "ACC", "DTYPE", "BR", "BK", "BG", "BC", "HAS_DH", "HAS_DC", "HAS_DW", "HAS_DDELTA")
        return ", ".join(f"{k}={v}" for k, v in self.constants if k in keep)


@dataclass
class Resources:
    """What one compiled launch costs a GPU: ptxas's registers and spills, Triton's shared memory."""

    kernel: str
    launch: str
    registers: int
    spill_stores: int   # bytes
    spill_loads: int    # bytes
    shared: int         # bytes of shared memory (Triton's allocation)


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


class _Capture:
    """Stands in for a kernel: records each launch instead of running it."""

    def __init__(self, kernel, launches: dict):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            values = dict(zip(self.kernel.arg_names, args), **kwargs)
            signature, constants = [], []
            for param in self.kernel.params:
                value = values[param.name]
                if param.is_constexpr:
                    constants.append((param.name, getattr(value, "value", value)))
                else:
                    signature.append((param.name, _type_of(value)))
            launch = Launch(self.kernel.fn.__name__, tuple(signature), tuple(constants))
            self.launches.setdefault(launch, self.kernel)
        return record


def capture_launches(dtypes: Sequence[torch.dtype] = (torch.float32,), groups: Sequence[int] | None = None) -> dict:
    """Every distinct kernel launch of the Triton ops, forward and backward, at the GPU block
    sizes, for the channel means and for each meta-net group of resnet32_gn (``groups``: their
    indices, default all) in each dtype: ``{Launch: kernel}``."""
    if INTERPRETED:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    launches: dict = {}
    saved = []
    for module in _MODULES:
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                saved.append((module, name, value))
                setattr(module, name, _Capture(value, launches))
        if hasattr(module, "default_blocks"):
            saved.append((module, "default_blocks", module.default_blocks))
            setattr(module, "default_blocks", lambda device, gpu=module.GPU_BLOCKS: gpu)
    try:
        for dtype in dtypes:
            activations = [torch.zeros(2, 16, 8, 8, dtype=dtype),
                           torch.zeros(2, 16, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)]
            channel_means.channel_means(activations)
            for group in MetaLearner(resnet32_gn(3, [5])).groups:
                if groups is not None and group.index not in groups:
                    continue
                dims, rows = group.dims, list(group.rows)
                R, G = sum(rows), len(rows)

                def zeros(*shape, grad=False):
                    return torch.zeros(shape, dtype=dtype, requires_grad=grad)
                w, lstm, head = zeros(R, dims.K, grad=True), zeros(G, dims.lstm_size, grad=True), zeros(
                    G, dims.head_size, grad=True)
                h, c, _, _ = meta_lstm.meta_lstm(w, zeros(R, dims.K), zeros(R, dims.Ar), zeros(G, dims.Ds), lstm, rows,
                                                 zeros(NUM_CELLS, R, dims.H), zeros(NUM_CELLS, R, dims.H))
                w_new, delta = gated_update.gated_update(h[-1], head, w, zeros(R, dims.K), rows, 0.1)
                torch.autograd.grad(w_new.sum() + delta.sum() + h.sum() + c.sum(), [w, lstm, head])
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    return launches


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (its PTX version follows that one's)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def compile_launch(launch: Launch, kernel, arch: int) -> Resources:
    """``launch`` compiled for sm_``arch`` as its launcher would compile it on a GPU, and what it costs."""
    signature = dict(launch.signature)
    constants = dict(launch.constants)
    signature.update({name: "constexpr" for name in constants})
    pointers = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                if signature.get(name, "").startswith("*")}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=pointers),
                              target=GPUTarget("cuda", arch, 32))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([_ptxas(arch), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", ptx,
                                 "-o", os.path.join(tmp, "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return Resources(launch.kernel, launch.describe(), int(registers.group(1)) if registers else -1,
                     int(spills.group(1)) if spills else 0, int(spills.group(2)) if spills else 0,
                     int(compiled.metadata.shared))


def main(argv: Sequence[str] | None = None) -> int:
    """Compile every launch and print the table (or JSON) of their resources."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,float64")
    parser.add_argument("--groups", help="comma-separated indices of resnet32_gn's meta-net groups (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    groups = None if args.groups is None else [int(i) for i in args.groups.split(",")]
    results = [compile_launch(launch, kernel, args.arch)
               for launch, kernel in capture_launches(dtypes, groups).items()]
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print(f"{'kernel':<26} {'regs':>4} {'spill st/ld':>12} {'shared':>7}  launch")
        for r in results:
            spills = f"{r.spill_stores}/{r.spill_loads}"
            print(f"{r.kernel:<26} {r.registers:>4} {spills:>12} {r.shared:>7}  {r.launch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
