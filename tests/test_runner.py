"""The meta-test loop: a run of a method repeats exactly, whatever the global RNG did before; a task
spec's transform shifts that task's images only."""
import json

import torch

from fastl2r.data import load_dataset, make_task
from fastl2r.experiments import build_config
from fastl2r.methods import method_class
from fastl2r.metatest import run_method, run_tasks
from fastl2r.workspace import Workspace


def test_a_run_repeats_exactly_whatever_the_global_generator_state(tmp_path):
    config = build_config("exp2", "fmnist", "smoke", overrides=[
        'arch="resnet8_gn"', "pretrain.epochs=0.03", "metatest.steps_per_task=2", "metatest.eval_every=2",
        "readout.steps=20"])
    workspace = Workspace(config, data_root=tmp_path, progress=False)
    method = method_class("sgd")(workspace, config["methods"]["sgd"])
    method.prepare()
    tasks = run_tasks(workspace, 1)
    curves = []
    for noise in (0, 1):
        torch.manual_seed(noise)  # new heads must not depend on this
        torch.rand(17)
        curves.append(run_method(workspace, method, 1, tasks))
    assert curves[0] == curves[1]
    assert set(curves[0]) == {0, 2} and set(curves[0][2]) == {0, 1}


def test_a_task_spec_transform_shifts_that_task_images_only(tmp_path):
    shifted = {"dataset": "digits", "pool": [0, 1, 2], "ways": 2, "train_part": "all", "transform": "invert"}
    config = build_config("exp4", "fmnist", "smoke", overrides=[f"tasks.meta_test={json.dumps([shifted])}"])
    workspace = Workspace(config, data_root=tmp_path, progress=False)
    task = workspace.task(config["tasks"]["meta_test"][0], (1, 2))
    plain = make_task(load_dataset("digits"), (1, 2))
    assert task.name == "digits+invert[1,2]"
    assert torch.equal(task.train_images(), 255 - plain.train_images())
    assert torch.equal(task.test_images(), 255 - plain.test_images())
    assert torch.equal(task.train_labels(), plain.train_labels())
    unshifted = workspace.task({"dataset": "digits", "train_part": "all"}, (1, 2))
    assert unshifted.name == "digits[1,2]" and torch.equal(unshifted.train_images(), plain.train_images())
    assert workspace.dataset("digits") is workspace.dataset("digits")  # loaded once, shifted once
    assert workspace.dataset("digits", "invert") is workspace.dataset("digits", "invert")
