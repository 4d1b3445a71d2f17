"""Command-line conventions: choices in the help, per-experiment help, --version, the entry point."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastl2r import __version__
from fastl2r.train import main


def help_text(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_lists_the_choices(capsys):
    text = help_text(capsys, "--help")
    for choices in ("{exp1,exp2,exp3,exp4,exp5}", "--suite {paper,fmnist,fmnist_inverted}", "--preset {paper,quick,smoke,cpu}",
                    "--device {cpu,cuda}", "--arch {resnet32_gn,resnet14_gn,resnet8_gn}", "--tensorboard",
                    "--plugin MODULE", "EXP --help"):
        assert choices in text, choices


def test_an_experiments_help_describes_it(capsys):
    text = help_text(capsys, "exp5", "--help")
    assert text.startswith("usage: python -m fastl2r.train exp5 [options]")
    assert "fmnist: resnet14_gn; Task A = fashion_mnist classes 0, 1" in " ".join(text.split())
    assert "2000 meta-training episodes" in text and "λ = 200" in text
    assert "exp1 in each suite" in help_text(capsys, "exp1", "-h")


def test_version(capsys):
    version = help_text(capsys, "--version").strip()
    assert version == f"python -m fastl2r.train {__version__} (torch {torch.__version__})"


def test_the_installed_entry_point():
    script = shutil.which("fastl2r-train", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("fastl2r is not installed with its scripts here (pip install -e .)")
    proc = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith(f"fastl2r-train {__version__}")
