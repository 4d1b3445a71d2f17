"""The meta-test loop: a run of a method repeats exactly, whatever the global RNG did before."""
import torch

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
