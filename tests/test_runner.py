"""The meta-test loop: a run of a method repeats exactly, whatever the global RNG did before."""
import torch

from fastl2r.experiments import build_config
from fastl2r.methods import method_class
from fastl2r.runner import Experiment


def test_a_run_repeats_exactly_whatever_the_global_generator_state(tmp_path):
    config = build_config("exp2", "fmnist", "smoke", overrides=[
        'arch="resnet8_gn"', "pretrain.epochs=0.03", "metatest.steps_per_task=2", "metatest.eval_every=2",
        "readout.steps=20"])
    experiment = Experiment(config, data_root=tmp_path, progress=False)
    method = method_class("sgd")(experiment, config["methods"]["sgd"])
    method.prepare()
    tasks = experiment.run_tasks(1)
    curves = []
    for noise in (0, 1):
        torch.manual_seed(noise)  # new heads must not depend on this
        torch.rand(17)
        curves.append(experiment.run_method(method, 1, tasks))
    assert curves[0] == curves[1]
    assert set(curves[0]) == {0, 2} and set(curves[0][2]) == {0, 1}
