"""The extension API: a user's own CNN, TensorDataset and method, registered by name, run
Experiment 1 (smoke) through the command line, meta-training on one slot included."""
import csv
import json
from pathlib import Path

import pytest
import torch

import fastl2r
from fastl2r.errors import UserError
from fastl2r.experiments import build_config
from fastl2r.methods import method_class, parse_methods
from fastl2r.models import MultiHeadNet
from fastl2r.train import main
from fastl2r.workspace import Workspace

PLUGIN = Path(__file__).parent / "blobs_plugin.py"


def read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_exp1_smoke_with_a_custom_cnn_dataset_and_method(registries, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["exp1", "--plugin", str(PLUGIN), "--suite", "blobs", "--arch", "small_cnn", "--preset", "smoke",
                 "--methods", "ours,sgd,momentum", "--runs", "1", "--data-root", str(tmp_path / "data"),
                 "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "small_cnn" and config["suite"] == "blobs"
    assert config["plugins"] == [str(PLUGIN.resolve())]
    assert config["methods"]["momentum"] == {"lr": 0.05, "momentum": 0.9}
    assert config["tasks"]["meta_test"][0] == {"dataset": "blobs", "classes": [4, 5], "train_part": "second_half"}
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["ours", "sgd", "momentum"]
    assert results["methods"]["ours"]["info"]["metatrain"]["episodes"] == 3
    for entry in results["methods"].values():
        assert entry["readout"]["task1"]["mean"][0] > 0.9  # the blobs are easy
    episodes = read_csv(out / "metatrain.csv")
    assert [int(row["episode"]) for row in episodes] == [0, 1, 2]
    readouts = read_csv(out / "readouts.csv")
    steps = results["eval_steps"]
    assert len(readouts) == 3 * (2 * len(steps))  # three methods, both tasks at every readout step
    assert {row["method"] for row in readouts} == {"ours", "sgd", "momentum"}
    assert readouts[0]["task_name"] == "blobs[0,1]"
    assert (out / "readout.png").exists() and (out / "metalearner.pt").exists()


def test_the_registered_names_work_from_python(registries):
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8)
    data = TensorDataset(images, torch.arange(4).repeat(6))
    fastl2r.register_dataset("tiny", lambda: (data, data), classes=["a", "b", "c", "d"], flip=True,
                             split=fastl2r.ClassSplit(source=[0], meta_train=[1], meta_test=[2, 3], ways=1))
    fastl2r.register_architecture("flat", lambda c, heads: MultiHeadNet(torch.nn.Flatten(), 3 * 8 * 8, heads))
    config = build_config("exp2", suite="tiny", preset="smoke", overrides=['arch="flat"'])
    assert config["tasks"]["meta_test"] == [{"dataset": "tiny", "pool": [2, 3], "ways": 1, "train_part": "all"}]
    with pytest.raises(UserError, match="the tiny suite has no exp5; it has exp1, exp2, exp3"):
        build_config("exp5", suite="tiny")
    workspace = Workspace(config, progress=False)
    dataset = workspace.dataset("tiny")
    assert dataset.name == "tiny" and dataset.classes == ("a", "b", "c", "d") and dataset.flip
    assert torch.equal(dataset.train_images, images)
    model = workspace.new_model([2])
    assert model.arch_name == "Flatten" and model(torch.zeros(5, 3, 8, 8)).shape == (5, 192)


def test_registration_mistakes_are_named(registries):
    with pytest.raises(UserError, match="'resnet32_gn' is a built-in architecture"):
        fastl2r.register_architecture("resnet32_gn", lambda c, h: None)
    with pytest.raises(UserError, match="disjoint"):
        fastl2r.ClassSplit(source=(0, 1), meta_train=(1, 2), meta_test=(3,), ways=1)
    with pytest.raises(TypeError, match="subclass of fastl2r.methods.Method"):
        fastl2r.register_method("mine", object)
    fastl2r.register_architecture("bare", lambda c, heads: torch.nn.Conv2d(c, 4, 3))
    workspace = Workspace(build_config("exp1", "fmnist", "smoke", overrides=['arch="bare"']), progress=False)
    workspace.dataset = lambda name: type("D", (), {"channels": 1})()
    with pytest.raises(UserError, match="without heads and add_head: wrap its backbone in"):
        workspace.new_model()
    with pytest.raises(UserError, match="bare is not one: leave hat out with --methods"):
        method_class("hat")(workspace, workspace.config["methods"]["hat"])
    with pytest.raises(UserError, match="unknown method 'nothing'"):
        parse_methods("ours,nothing")


def test_the_checkpoint_cache_tells_registered_data_and_networks_apart(registries, tmp_path):
    from torch.utils.data import TensorDataset

    def register(value, width):
        data = TensorDataset(torch.full((8, 1, 4, 4), value, dtype=torch.uint8), torch.arange(4).repeat(2))
        fastl2r.register_dataset("tiny", (data, data),
                                 split=fastl2r.ClassSplit(source=[0], meta_train=[1], meta_test=[2, 3], ways=1))
        fastl2r.register_architecture("flat", lambda c, heads: MultiHeadNet(torch.nn.Linear(16 * c, width), width,
                                                                            heads))

    def cached(build_number):
        config = build_config("exp2", suite="tiny", preset="smoke", overrides=['arch="flat"'])
        workspace = Workspace(config, data_root=tmp_path, progress=False)
        return workspace.cached_state("w0", 0, lambda: {"model": {}, "build": build_number})["build"]

    register(0, 5)
    assert cached(1) == 1 and cached(2) == 1  # the second time from the cache
    register(7, 5)  # same name, other images
    assert cached(3) == 3
    register(7, 6)  # same name, other network shapes
    assert cached(4) == 4 and cached(5) == 4
