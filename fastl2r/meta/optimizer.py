"""Apply a trained meta-learner to any supported model, like an optimizer.

    meta = load_metalearner("runs/exp1-.../metalearner.pt", model)
    opt = LearnedOptimizer(model, meta)
    for x, y in batches:
        loss = F.cross_entropy(model.heads[task](model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

Forward hooks gather the activation means of the most recent forward pass, so
``step()`` needs nothing beyond the gradients.  Tensors without a meta-net (heads,
biases) get plain SGD at the meta-learner's learning rate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .. import _io
from ..errors import UserError, first_line
from ..models.taps import ActivationTaps
from .metalearner import MetaLearner, MetaState


class LearnedOptimizer:
    def __init__(self, model: nn.Module, meta: MetaLearner):
        self.model = model
        self.meta = meta
        names = {n for n, _ in model.named_parameters()}
        expected = {t.name for t in meta.meta_tensors}
        missing = expected - names
        if missing:
            raise ValueError(f"the model lacks tensors the meta-learner was built for: {sorted(missing)[:5]}")
        self.taps = ActivationTaps(model, meta.head_prefix)
        device = next(model.parameters()).device
        self.state: MetaState = meta.initial_state(device, next(model.parameters()).dtype)
        self.last_deltas: list[torch.Tensor] = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def reset_state(self) -> None:
        """Start the meta-nets' recurrent state afresh (a new episode)."""
        p = next(self.model.parameters())
        self.state = self.meta.initial_state(p.device, p.dtype)

    @torch.no_grad()
    def step(self) -> None:
        """Update the model from its gradients and the last forward's activation means."""
        params = dict(self.model.named_parameters())
        missing = [t.name for t in self.meta.meta_tensors if params[t.name].grad is None]
        if missing:
            raise RuntimeError(f"no gradient for {missing[:3]}...: call backward() before step()")
        weights = self.meta.flatten(params)
        grads = self.meta.flatten({n: p.grad for n, p in params.items() if p.grad is not None})
        means = self.taps.means()
        new_weights, self.state, self.last_deltas = self.meta.step(weights, grads, means, self.state)
        for name, value in self.meta.unflatten(new_weights).items():
            params[name].copy_(value)
        for name in self.meta.plain_names(params):
            if params[name].grad is not None:
                params[name].sub_(self.meta.lr * params[name].grad)
        self.taps.clear()

    def close(self) -> None:
        """Remove the hooks from the model."""
        self.taps.remove()


def save_metalearner(meta: MetaLearner, path: str | Path, **extra) -> None:
    _io.torch_save({"meta": meta.state_dict(), **extra}, path)


def load_metalearner(path: str | Path, model: nn.Module, device: Optional[torch.device | str] = None,
                     lr: float = 0.1, arch: Optional[str] = None) -> MetaLearner:
    """A ``MetaLearner`` for models shaped like ``model`` (whose architecture is named ``arch``, if
    given), with the weights saved at ``path``.  A file that cannot be read, holds something else,
    was trained for another network or holds non-finite weights is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no meta-learner at {path}: pass the metalearner.pt of a finished meta-training run")
    saved = _io.torch_load(path, "the meta-learner", "pass the metalearner.pt of a finished meta-training run")
    state = saved.get("meta", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a meta-learner (it holds a {type(saved).__name__} of other things); "
                        "pass the metalearner.pt of a finished meta-training run")
    trained_for = saved.get("arch") if isinstance(saved.get("arch"), str) else "another network"
    if arch is not None and trained_for != arch:
        raise UserError(f"the meta-learner {path} was trained for {trained_for}, but this run's network is {arch}")
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise UserError(f"the meta-learner {path} has non-finite weights (a diverged meta-training?); it cannot be used")
    meta = MetaLearner(model, lr=lr)
    try:
        meta.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"the meta-learner {path} does not fit this run's {arch or 'network'} "
                        f"({first_line(exc)}): it was trained for {trained_for} with other input channels "
                        "or another layout") from None
    return meta.to(device) if device is not None else meta
