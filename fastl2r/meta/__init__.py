"""The meta-learner and Algorithm 1 (meta-training from a multi-task teacher)."""
from .metalearner import MetaGroup, MetaLearner, MetaState, MetaTensor, Theta, find_meta_tensors
from .optimizer import LearnedOptimizer, load_metalearner, save_metalearner

__all__ = ["MetaGroup", "MetaLearner", "MetaState", "MetaTensor", "Theta", "find_meta_tensors",
           "LearnedOptimizer", "load_metalearner", "save_metalearner"]
