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

from ..errors import UserError
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
    from .. import _io

    _io.torch_save({"meta": meta.state_dict(), **extra}, path)


def load_metalearner(path: str | Path, model: nn.Module, device: Optional[torch.device | str] = None,
                     lr: float = 0.1) -> MetaLearner:
    """A ``MetaLearner`` for models shaped like ``model``, with the weights saved at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no meta-learner at {path}: pass the metalearner.pt of a finished meta-training run")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        meta = MetaLearner(model, lr=lr)
        meta.load_state_dict(saved["meta"] if "meta" in saved else saved)
    except (RuntimeError, KeyError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"cannot load the meta-learner {path}: {str(exc).splitlines()[0]} "
                        "(was it trained for another architecture or input size?)") from None
    return meta.to(device) if device is not None else meta
