"""The README's Python examples run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> dict[str, str]:
    text = README.read_text()
    return dict(re.findall(r"<!-- example: ([\w-]+) -->\s*```python\n(.*?)```", text, re.S))


def test_the_readme_has_its_examples_and_a_two_command_quickstart():
    assert set(examples()) == {"readout", "experiment", "learned-optimizer"}
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


@pytest.mark.parametrize("name", ["readout", "experiment"])
def test_example_runs(name, workdir, capsys):
    exec(compile(examples()[name], f"README:{name}", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_learned_optimizer_example_updates_the_model(workdir):
    from fastl2r.meta import MetaLearner, save_metalearner
    from fastl2r.models import resnet32_gn

    save_metalearner(MetaLearner(resnet32_gn(1, [5])), workdir / "runs/exp1-fmnist-quick/metalearner.pt")
    scope = {}
    exec(compile(examples()["learned-optimizer"], "README:learned-optimizer", "exec"), scope)
    model, meta = scope["model"], scope["meta"]
    assert len(model.heads) == 2 and scope["step"] == 4
    assert scope["optimizer"].state.h[0].abs().sum() > 0  # the meta-nets ran and kept their state
