"""Building the C++/CUDA extension, and running without it.

setup.py is executed with ``setuptools.setup`` replaced by a recorder, so what it would
build is checked without building; the fallback runs in a fresh interpreter where the
extension cannot be imported, as on a machine where it was never built.
"""
from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import setuptools
import torch

REPO = Path(__file__).resolve().parents[1]


def setup_arguments(monkeypatch, capsys, **env: str) -> tuple[dict, list[str]]:
    """What setup.py passes to ``setuptools.setup`` under ``env``, and its stderr lines."""
    if not (REPO / "setup.py").is_file():
        pytest.skip("needs the source tree (setup.py)")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    recorded: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: recorded.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"))
    return recorded, capsys.readouterr().err.splitlines()


def test_setup_builds_the_cpu_extension_with_a_compiler(monkeypatch, capsys):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    args, err = setup_arguments(monkeypatch, capsys, CXX=compiler, FASTL2R_BUILD_CUDA="0")
    assert [ext.name for ext in args["ext_modules"]] == ["fastl2r._C"]
    sources = args["ext_modules"][0].sources
    # One folder per op: its schema and its CPU kernel; the shared pieces in csrc/common/.
    for op in ("channel_means", "meta_lstm", "gated_update"):
        assert {f"csrc/{op}/schema.cpp", f"csrc/{op}/cpu.cpp"} <= set(sources), sources
    assert "csrc/common/module.cpp" in sources and all(not s.endswith(".cu") for s in sources)
    assert "build_ext" in args["cmdclass"] and err == []


def test_setup_without_a_compiler_installs_the_package_without_the_extension(monkeypatch, capsys):
    args, err = setup_arguments(monkeypatch, capsys, CXX="/nonexistent/c++")
    assert args["ext_modules"] == [] and args["cmdclass"] == {}
    assert "fastl2r" in args["packages"]
    # The Triton kernels install as fastl2r.kernels from the top-level kernels/; developer tools do not.
    assert "fastl2r.kernels" in args["packages"] and args["package_dir"] == {"fastl2r.kernels": "kernels"}
    assert not any(p.split(".")[0] == "tools" for p in args["packages"])
    assert len(err) == 1
    assert "no C++ compiler (/nonexistent/c++) was found" in err[0]
    assert "reference ops" in err[0] and "pip install --no-build-isolation -e ." in err[0]


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_setup_refuses_a_forced_cuda_build_without_cuda(monkeypatch, capsys):
    with pytest.raises(SystemExit, match="FASTL2R_BUILD_CUDA=1, but the CUDA extension needs a CUDA build of torch"):
        setup_arguments(monkeypatch, capsys, FASTL2R_BUILD_CUDA="1")


# Runs in a fresh interpreter in which `import fastl2r._C` fails, as when it was never built.
WITHOUT_EXTENSION = textwrap.dedent("""
    import json, sys, warnings
    sys.modules["fastl2r._C"] = None
    import torch
    from fastl2r import ops
    from fastl2r.meta import MetaLearner
    from fastl2r.models import resnet8_gn

    torch.manual_seed(0)
    model = resnet8_gn(1, [2])
    meta = MetaLearner(model)
    weights = meta.flatten(dict(model.named_parameters()))
    grads = [torch.randn_like(w) * 0.01 for w in weights]
    means = torch.rand(meta.channel_count)
    state = meta.initial_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        automatic = [meta.step(weights, grads, means, state)[0] for _ in range(2)]
    chosen = ops.backend_name("cpu")
    with ops.use_backend("reference"):
        reference = meta.step(weights, grads, means, state)[0]
    try:
        with ops.use_backend("cpp"):
            ops.channel_means([torch.randn(2, 3)])
        forced = "no error"
    except ops.BackendError as exc:
        forced = str(exc)
    print(json.dumps({
        "chosen": chosen,
        "warnings": [str(w.message) for w in caught],
        "same_as_reference": all(torch.equal(a, r) for run in automatic for a, r in zip(run, reference)),
        "forced": forced,
    }))
""")


def test_without_the_extension_ops_fall_back_to_the_reference_with_one_warning():
    env = {k: v for k, v in os.environ.items() if k != "FASTL2R_BACKEND"}  # the automatic choice
    result = subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION], capture_output=True, text=True, timeout=300,
                            cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["chosen"] == "reference"
    assert out["same_as_reference"]
    # One warning for the whole run (not one per call), one line, naming the cause and the fix.
    assert len(out["warnings"]) == 1, out["warnings"]
    message = out["warnings"][0]
    assert "\n" not in message
    assert message.startswith("fastl2r: cpp backend skipped on cpu: its extension fastl2r._C is not built")
    assert "pip install --no-build-isolation -e ." in message
    # Forcing the missing backend is an error that says why.
    assert out["forced"].startswith("backend 'cpp' was requested but cannot run: its extension fastl2r._C")
