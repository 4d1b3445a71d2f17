"""Suites and presets as configuration (DESIGN §1.4, §1.7): what every configuration must keep."""
import itertools

import pytest

from fastl2r.errors import UserError
from fastl2r.experiments import EXPERIMENTS, PRESETS, TASKS, build_config

CONFIGS = [(e, s, p) for s, p in itertools.product(TASKS, PRESETS) for e in EXPERIMENTS if e in TASKS[s]]


def images_of(spec: dict) -> set[tuple[str, int, str]]:
    """The (dataset, class, half) images a task spec may use, whatever its transform: a transform
    of the same images is not other images."""
    classes = spec["classes"] if "classes" in spec else spec["pool"]
    halves = ("first_half", "second_half") if spec["train_part"] == "all" else (spec["train_part"],)
    return {(spec["dataset"], c, h) for c in classes for h in halves}


@pytest.mark.parametrize("experiment, suite, preset", CONFIGS)
def test_meta_training_episodes_run_to_the_meta_test_horizon(experiment, suite, preset):
    config = build_config(experiment, suite, preset)
    assert config["metatrain"]["episode_steps"] == config["metatest"]["steps_per_task"]


@pytest.mark.parametrize("experiment, suite", sorted({(e, s) for e, s, _ in CONFIGS}))
def test_task_a_meta_train_and_meta_test_images_are_disjoint(experiment, suite):
    tasks = build_config(experiment, suite)["tasks"]
    source = images_of(tasks["source"])
    meta_train = set().union(*map(images_of, tasks["meta_train"]))
    meta_test = set().union(*map(images_of, tasks["meta_test"]))
    assert not source & meta_train and not source & meta_test and not meta_train & meta_test


def test_the_paper_suite_and_preset_keep_the_paper_protocol():
    config = build_config("exp1")
    assert config["arch"] == "resnet32_gn" and config["runs"] == 5
    assert config["metatest"] == {"steps_per_task": 500, "batch_size": 64, "eval_every": 25, "checkpoint": 0}
    assert config["metatrain"]["objective"] == "huber"
    assert config["metatrain"]["episode_steps"] == 500 and config["metatrain"]["episodes"] == 900
    assert config["readout"] == {"steps": 500, "lr": 0.1, "max_train": 0, "max_test": 0}
    assert config["tasks"]["meta_test"] == [{"dataset": "cifar10", "classes": [5, 6, 7, 8, 9],
                                             "train_part": "second_half"}]
    assert build_config("exp5")["metatrain"]["episode_steps"] == 300


def test_the_fmnist_inverted_suite_shifts_task_b_and_holds_exp1_only():
    tasks = build_config("exp1", "fmnist_inverted", "cpu")["tasks"]
    assert tasks["source"] == {"dataset": "fashion_mnist", "classes": [0, 2, 3, 4, 6], "train_part": "all"}
    for spec, part in zip(tasks["meta_train"] + tasks["meta_test"], ("first_half", "second_half")):
        assert spec == {"dataset": "fashion_mnist", "classes": [1, 5, 7, 8, 9], "train_part": part,
                        "transform": "invert"}
    with pytest.raises(UserError, match="the fmnist_inverted suite has no exp2; it has exp1"):
        build_config("exp2", "fmnist_inverted", "cpu")


def test_the_cpu_preset_is_sized_for_two_cores():
    config = build_config("exp1", "fmnist_inverted", "cpu")
    assert config["arch"] == "resnet8_gn" and config["runs"] == 5
    assert config["metatest"] == {"steps_per_task": 500, "batch_size": 64, "eval_every": 50, "checkpoint": 0}
    assert config["pretrain"]["epochs"] == 40
    assert config["readout"] == {"steps": 500, "lr": 0.1, "max_train": 1000, "max_test": 1000}
    mt = config["metatrain"]
    assert mt["episode_steps"] == 500 and mt["episodes"] * mt["episode_steps"] >= 20_000
    # the headline run's meta-training (README): the centred objective, thresholds it crosses early
    assert (mt["episodes"], mt["curriculum_every"], mt["threshold"], mt["objective"]) == (
        47, 15, [5.0, 2.5, 10.0], "huber_centred")
    assert build_config("exp1", "fmnist", "paper")["metatrain"]["objective"] == "huber"


def test_a_task_spec_transform_is_checked_and_described():
    import json

    from fastl2r.experiments import describe_task

    bad = {"dataset": "digits", "classes": [0, 1], "train_part": "all", "transform": "blur"}
    with pytest.raises(UserError, match=r"unknown tasks.meta_test\[0\].transform 'blur'; choose one of: none, "
                                        "invert, rot90"):
        build_config("exp1", "fmnist", "smoke", overrides=[f"tasks.meta_test={json.dumps([bad])}"])
    with pytest.raises(UserError, match="transform must be a name"):
        build_config("exp1", "fmnist", "smoke", overrides=[f"tasks.meta_test={json.dumps([{**bad, 'transform': 1}])}"])
    assert describe_task({**bad, "transform": "invert"}) == "digits classes 0, 1, inverted (255 − x)"
    assert describe_task({**bad, "transform": "none"}) == "digits classes 0, 1"
