"""The README's examples run as written, in a fresh folder, after the Quickstart."""
import re
import shlex
from pathlib import Path

import pytest
import torch

from fastl2r.train import main

README = Path(__file__).resolve().parents[1] / "README.md"


def examples(language: str = "python") -> dict[str, str]:
    text = README.read_text()
    return dict(re.findall(rf"<!-- example: ([\w-]+) -->\s*```{language}\n(.*?)```", text, re.S))


def test_the_readme_has_its_examples_and_a_two_command_quickstart():
    assert set(examples()) == {"readout", "experiment", "learned-optimizer", "extension"}
    assert set(examples("bash")) == {"train-metalearner"}
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", quickstart, re.S)
                for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == ["bash .ci/setup && python -m fastl2r.train exp5 --suite fmnist --preset smoke",
                        "bash .ci/setup && python -m pytest tests/ -q"]
    assert "python -m pytest tests/ -q" in (README.parent / ".ci" / "run").read_text()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTL2R_DATA", str(tmp_path / "data"))
    return tmp_path


@pytest.mark.parametrize("name", ["readout", "experiment", "extension"])
def test_example_runs(name, workdir, registries, capsys):
    exec(compile(examples()[name], f"README:{name}", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_learned_optimizer_example_after_the_readme_command(workdir):
    argv = shlex.split(examples("bash")["train-metalearner"])
    assert argv[:3] == ["python", "-m", "fastl2r.train"]
    assert main(argv[3:]) == 0
    scope = {}
    exec(compile(examples()["learned-optimizer"], "README:learned-optimizer", "exec"), scope)
    model, optimizer = scope["model"], scope["optimizer"]
    assert len(model.heads) == 2 and scope["step"] == 4
    assert isinstance(optimizer, torch.optim.Optimizer)
    saved = torch.load(workdir / "runs" / "checkpoint.pt", weights_only=True)["optimizer"]
    assert any(state["h"].abs().sum() > 0 for state in saved["state"].values())  # the meta-nets ran, kept state


def test_the_readmes_train_commands_make_valid_runs(monkeypatch):
    """Every ``python -m fastl2r.train`` command of the README's bash blocks (continued lines joined)
    parses and builds its run's configuration, from the repository's root (the shipped meta-learner's
    path is relative to it); a CUDA command is checked as if CUDA were there."""
    from fastl2r import train

    monkeypatch.chdir(README.parent)
    monkeypatch.setattr(train.distributed, "resolve_device", lambda device: torch.device(device or "cpu"))
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = [line.split("python -m fastl2r.train", 1)[1].split("#", 1)[0]
                for block in blocks for line in block.replace("\\\n", " ").splitlines()
                if "python -m fastl2r.train" in line]
    assert len(commands) >= 6
    for command in commands:
        argv = shlex.split(command)
        args = train.build_parser(argv[0]).parse_args(argv)
        config, run, _ = train.new_run(args, [])
        assert run["methods_run"] and config["experiment"] == argv[0], command
