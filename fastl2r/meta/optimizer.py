"""A trained meta-learner as a ``torch.optim.Optimizer`` for any model (DESIGN §7.1).

    meta = load_metalearner("runs/exp1-fmnist-smoke/metalearner.pt", model)
    optimizer = LearnedOptimizer(model, meta)       # lr: the meta-learner's α unless given
    for x, y in batches:
        loss = F.cross_entropy(model.heads[task](model(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

A gated tensor (a conv weight, a GroupNorm γ or β, a non-head linear weight) moves by
``−lr·δ⊙g``, δ from its meta-net; every other parameter by plain SGD, ``−lr·g``; ``lr`` is
its param group's.  Forward hooks keep the activations of the latest forward pass, whose
means the meta-nets read in ``step()``: the forward that produced the gradients must be the
latest one (``step(closure)`` runs the closure's).  The meta-nets' LSTM states are the
optimizer's per-parameter state (``state[p]["h"]``, ``state[p]["c"]``, ``[3, rows, H]``), so
``state_dict()`` / ``load_state_dict()`` resume a loop exactly and ``state.clear()`` starts
a new episode.  The meta-learner computes in its own dtype (float32), also under
``torch.autocast``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from .. import _io
from ..errors import UserError, first_line
from .metalearner import ActivationTaps, MetaLearner, MetaState, architecture_name, is_head

METALEARNER_FORMAT = 1


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``d model wraps (its parameters lack the ``_orig_mod.`` prefix)."""
    return getattr(model, "_orig_mod", model)


class LearnedOptimizer(torch.optim.Optimizer):
    """Updates ``model`` (or the ``params`` of it given, as for any optimizer) with ``meta``.

    ``lr`` defaults to the meta-learner's α (``meta.lr``); param groups may set their own.
    Create it before the first forward of a ``torch.compile``d model: hooks added later are not
    seen by code already compiled.
    """

    def __init__(self, model: nn.Module, meta: MetaLearner, params: Optional[Iterable] = None,
                 lr: Optional[float] = None):
        self.model = unwrap_compiled(model)
        self.meta = meta
        self.compiled = self.model is not model
        own = dict(self.model.named_parameters())
        missing = [t.name for t in meta.meta_tensors if t.name not in own]
        mismatched = [t.name for t in meta.meta_tensors if t.name in own and tuple(own[t.name].shape) != t.shape]
        if missing or mismatched:
            raise ValueError(f"the meta-learner was built for {meta.arch}, the model is "
                             f"{architecture_name(self.model)}: missing {missing[:3]}, other shapes {mismatched[:3]}")
        meta_device = next(meta.parameters()).device
        model_device = next(iter(own.values())).device
        if meta_device != model_device:
            raise ValueError(f"the meta-learner is on {meta_device}, the model on {model_device}: "
                             "move one (load_metalearner puts it on the model's device)")
        self.meta_dtype = next(meta.parameters()).dtype
        self._initialised = False
        super().__init__(self.model.parameters() if params is None else params,
                         {"lr": meta.lr if lr is None else float(lr)})
        self._initialised = True
        self._warn_ungated([p for group in self.param_groups for p in group["params"]])
        self.taps = ActivationTaps(self.model, meta.head_prefix)
        self.last_deltas: list[torch.Tensor] = []  # per meta group, δ of the last step ([rows, K])

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer``'s (e.g. for a new task's head), but only the model's own parameters
        are accepted, and one warning lists those without a meta-net when any of them is not a head."""
        super().add_param_group(param_group)
        self.names = {p: n for n, p in self.model.named_parameters()}  # the model may have grown (a new head)
        foreign = [p for p in self.param_groups[-1]["params"] if p not in self.names]
        if foreign:
            self.param_groups.pop()
            raise ValueError(f"{len(foreign)} of the parameters given are not the model's: a LearnedOptimizer "
                             "updates parameters of the model it was created for")
        if self._initialised:
            self._warn_ungated(self.param_groups[-1]["params"])

    def _warn_ungated(self, params: list[torch.Tensor]) -> None:
        """One warning listing the parameters without a meta-net, when any is not a head (heads
        always get plain SGD, as in the paper)."""
        gated = {t.name for t in self.meta.meta_tensors}
        names = [self.names[p] for p in params if self.names[p] not in gated]
        if all(is_head(n, self.meta.head_prefix) for n in names):
            return
        modules = dict(self.model.named_modules())
        kinds: dict[str, list[str]] = {}
        for name in names:
            module_name = name.rpartition(".")[0]
            module = modules[module_name]
            kind = type(module).__name__
            if is_head(name, self.meta.head_prefix):
                kind = "head"
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                kind += " bias"
            kinds.setdefault(kind, []).append(name)
        listed = "; ".join(f"{kind}: {', '.join(group)}" for kind, group in kinds.items())
        warnings.warn(f"LearnedOptimizer: {len(names)} parameters have no meta-net and get plain SGD "
                      f"(p -= lr·grad) instead — {listed}. Meta-nets gate Conv2d (groups=1) and non-head Linear "
                      "weights and GroupNorm γ/β.", stacklevel=3)

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer``'s, but the LSTM states keep the meta-learner's dtype
        (the base class would cast them to each parameter's)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in saved.items():
            param = params[index]
            self.state[param] = {k: v.to(param.device, self.meta_dtype) for k, v in entry.items()}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """Update every parameter of the param groups that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr_of = {p: group["lr"] for group in self.param_groups for p in group["params"] if p.grad is not None}
        if not lr_of:
            return loss
        gated = {t.name for t in self.meta.meta_tensors}
        if any(self.names[p] in gated for p in lr_of):
            self._gated_step(lr_of)
        for p, lr in lr_of.items():
            if self.names[p] not in gated:
                p.add_(p.grad, alpha=-lr)
        self.taps.clear()
        return loss

    def _gated_step(self, lr_of: dict[torch.Tensor, float]) -> None:
        """One meta-learner step over every gated tensor; those with a gradient in the param
        groups move by ``−lr·δ⊙g`` and keep their new LSTM state, the others are left as they were."""
        params = dict(self.model.named_parameters())
        dtype, device = self.meta_dtype, next(iter(lr_of)).device
        try:
            means = self.taps.means(dtype)
        except RuntimeError as exc:
            hint = (" A torch.compile'd model sees only hooks that existed at its first compiled forward: "
                    "create the LearnedOptimizer before it.") if self.compiled else ""
            raise RuntimeError(f"{exc}{hint}") from None
        weights = self.meta.flatten({t.name: params[t.name].to(dtype) for t in self.meta.meta_tensors})
        grads = self.meta.flatten({t.name: params[t.name].grad.to(dtype) if params[t.name] in lr_of
                                   else torch.zeros(t.shape, dtype=dtype, device=device)
                                   for t in self.meta.meta_tensors})

        def lstm_state(t, group, key: str) -> torch.Tensor:
            p = params[t.name]
            return self.state[p][key] if p in self.state else torch.zeros(3, t.rows, group.dims.H, dtype=dtype,
                                                                          device=device)

        state = MetaState(*([torch.cat([lstm_state(t, group, key) for t in group.tensors], dim=1)
                             for group in self.meta.groups] for key in ("h", "c")))
        with torch.autocast(device.type, enabled=False):
            _, new_state, self.last_deltas = self.meta.step(weights, grads, means, state)
        for group, delta, h, c in zip(self.meta.groups, self.last_deltas, new_state.h, new_state.c):
            rows = list(group.rows)
            for t, d, h_t, c_t in zip(group.tensors, delta.split(rows), h.split(rows, 1), c.split(rows, 1)):
                p = params[t.name]
                if p in lr_of:
                    p.add_(d.view(p.shape).to(p.dtype) * p.grad, alpha=-lr_of[p])
                    self.state[p] = {"h": h_t, "c": c_t}

    def close(self) -> None:
        """Remove the activation hooks from the model, which would otherwise go on recording (and holding) its
        forward passes' activations."""
        self.taps.remove()


def save_metalearner(meta: MetaLearner, path: str | Path, **extra) -> Path:
    """Write ``meta`` to ``path`` with what ``load_metalearner`` needs to rebuild it: its
    architecture, hyperparameters and the gated tensors' names and shapes (``extra``: more facts)."""
    path = Path(path)
    _io.torch_save({"format": METALEARNER_FORMAT, "meta": meta.state_dict(), "lr": meta.lr,
                    "head_prefix": meta.head_prefix, "conv_hidden": meta.conv_hidden,
                    "norm_hidden": meta.norm_hidden, "layout": meta.layout(), "arch": meta.arch, **extra}, path)
    return path


def load_metalearner(path: str | Path, model: nn.Module, device: Optional[torch.device | str] = None,
                     lr: Optional[float] = None, arch: Optional[str] = None) -> MetaLearner:
    """The meta-learner saved at ``path`` (by ``save_metalearner`` or a meta-training run), for
    models shaped like ``model`` (whose architecture is named ``arch``, if given), on ``device``
    (default: the model's); ``lr`` replaces its α.  A file that cannot be read, holds something
    else, was trained for another network or holds non-finite weights is a UserError."""
    path = Path(path)
    fix = "pass the metalearner.pt of a finished meta-training run"
    if not path.is_file():
        raise UserError(f"no meta-learner at {path}: {fix}")
    saved = _io.torch_load(path, "the meta-learner", fix)
    state = saved.get("meta") if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a meta-learner (it holds a {type(saved).__name__} of other things); {fix}")
    model = unwrap_compiled(model)
    trained_for = saved["arch"] if isinstance(saved.get("arch"), str) else "an unrecorded architecture"
    if arch is not None and isinstance(saved.get("arch"), str) and trained_for != arch:
        raise UserError(f"the meta-learner {path} was trained for {trained_for}, but this run's network is {arch}")
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise UserError(f"the meta-learner {path} has non-finite weights (a diverged meta-training?); it cannot be used")
    options = {k: saved[k] for k in ("head_prefix", "conv_hidden", "norm_hidden") if k in saved}
    try:
        meta = MetaLearner(model, lr=saved.get("lr", 0.1) if lr is None else lr, **options)
    except ValueError as exc:
        raise UserError(f"cannot load the meta-learner {path}: it was trained for {trained_for}, and the model "
                        f"({architecture_name(model)}) has no tensor to gate: {first_line(exc)}") from None
    found = meta.layout()
    expected = [tuple(entry) for entry in saved.get("layout", found)]
    if expected != found:
        difference = next(((e, f) for e, f in zip(expected, found) if e != f), None)
        detail = (f"first difference: {difference[0][0]} {list(difference[0][1])} there, {difference[1][0]} "
                  f"{list(difference[1][1])} here" if difference else "the tensors are a prefix of the other's")
        raise UserError(f"cannot load the meta-learner {path}: it was trained for {trained_for} ({len(expected)} "
                        f"gated tensors), the model is {architecture_name(model)} ({len(found)}); {detail}")
    try:
        meta.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"cannot load the meta-learner {path}: it was trained for {trained_for}, the model is "
                        f"{architecture_name(model)}: {first_line(exc)}") from None
    if device is None:
        device = next(model.parameters()).device
    return meta.to(device)
