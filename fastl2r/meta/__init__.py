"""The meta-learner and Algorithm 1 (meta-training from a multi-task teacher)."""
from .metalearner import MetaGroup, MetaLearner, MetaState, MetaTensor, Theta, find_meta_tensors

__all__ = ["MetaGroup", "MetaLearner", "MetaState", "MetaTensor", "Theta", "find_meta_tensors"]
