"""The meta-learner ``f`` (DESIGN §1.3): one stacked-LSTM meta-net per student tensor.

Every conv weight, GroupNorm γ and β (and non-head linear weight) of the student
gets its own meta-net; that tensor's rows (conv: output channels; GroupNorm:
channels) share it.  Tensors whose meta-nets have the same shape form a *group*:
their rows are stacked into one ``[R, K]`` matrix and their meta-nets into two
parameter matrices (``fastl2r.ops.layout``), so that one op call updates a group.

The student's weights travel in that grouped form ("flat" tensors, one per group);
``unflatten`` gives per-parameter views for ``torch.func.functional_call``.  Every
other parameter (heads, biases) is updated by plain SGD.

The features include, for each conv / GroupNorm / (non-head) linear layer, the mean over
batch and space of its input and of its output: forward hooks keep references to those
activations as the forward runs (no second forward), and one ``fastl2r.ops.channel_means``
call computes every mean.  ``record_activations`` holds its hooks for one ``with`` block
only, so a network used for thousands of episodes never accumulates hooks;
``ActivationTaps`` keeps them for the life of a ``LearnedOptimizer``, which reads the
activations of its user's forward.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .. import ops
from ..ops import NUM_CELLS, GroupDims, unpack_head, unpack_lstm

# ----- the activation taps -----
TAPPED_TYPES = (nn.Conv2d, nn.GroupNorm, nn.Linear)


@dataclass(frozen=True)
class TappedLayer:
    """A layer whose input and output channel means feed the meta-nets, and where those means sit in the flat
    means of one slot."""

    name: str
    in_channels: int
    out_channels: int
    in_offset: int    # where this layer's input means start in the flat means vector (one slot)
    out_offset: int   # where its output means start


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_channels
    return module.in_features, module.out_features


def is_head(name: str, head_prefix: str) -> bool:
    """Whether the parameter or module ``name`` belongs to the heads (``head_prefix`` or below it), which get
    plain SGD, never a meta-net or a tap."""
    return name == head_prefix or name.startswith(head_prefix + ".")


def tapped_layers(model: nn.Module, head_prefix: str = "heads") -> list[TappedLayer]:
    """The tapped layers of ``model`` in registration order, with their offsets."""
    layers, offset = [], 0
    for name, module in model.named_modules():
        if isinstance(module, TAPPED_TYPES) and not is_head(name, head_prefix):
            c_in, c_out = _channels(module)
            layers.append(TappedLayer(name, c_in, c_out, offset, offset + c_in))
            offset += c_in + c_out
    return layers


def _register(model: nn.Module, layers: list[TappedLayer], slots: list[Optional[torch.Tensor]]) -> list:
    """Hooks writing each tapped layer's (input, output) into ``slots[2i]``, ``slots[2i + 1]``."""
    modules = dict(model.named_modules())

    def hook(index: int):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            slots[2 * index] = inputs[0]  # only their means are used, out of the graph
            slots[2 * index + 1] = output
        return record

    return [modules[layer.name].register_forward_hook(hook(i)) for i, layer in enumerate(layers)]


def activation_means(layers: list[TappedLayer], activations: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """Every recorded per-channel mean, flat, in ``layers`` order (input then output); folded
    activations give each layer's means slot by slot."""
    missing = [layers[i // 2].name for i, a in enumerate(activations) if a is None]
    if missing:
        raise RuntimeError(f"no activation was recorded for layers {missing[:5]}: did the forward pass "
                           "run through them?")
    return ops.channel_means(activations)


@contextmanager
def record_activations(model: nn.Module, layers: list[TappedLayer]) -> Iterator[list]:
    """Inside the block, forward passes of ``model`` write its tapped layers' inputs and outputs
    into the yielded list (the last pass wins); the hooks are gone when the block ends."""
    activations: list[Optional[torch.Tensor]] = [None] * (2 * len(layers))
    handles = _register(model, layers, activations)
    try:
        yield activations
    finally:
        for handle in handles:
            handle.remove()


class ActivationTaps:
    """Hooks on ``model``, until ``remove()``, recording the inputs and outputs of its tapped layers
    in every forward pass (the last one wins)."""

    def __init__(self, model: nn.Module, head_prefix: str = "heads"):
        self.layers = tapped_layers(model, head_prefix)
        self._activations: list[Optional[torch.Tensor]] = [None] * (2 * len(self.layers))
        self._handles = _register(model, self.layers, self._activations)

    def means(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The means of the last forward pass (see ``activation_means``), in ``dtype`` if given
        (under ``torch.autocast`` a network's activations come in several dtypes)."""
        activations = self._activations
        if dtype is not None:
            activations = [a if a is None or a.dtype == dtype else a.to(dtype) for a in activations]
        return activation_means(self.layers, activations)

    def clear(self) -> None:
        """Drop the recorded activations (they keep the forward's memory alive)."""
        self._activations[:] = [None] * len(self._activations)

    def remove(self) -> None:
        """Take the hooks off the model, so that it stops recording (``LearnedOptimizer.close``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ----- the meta-nets -----
CONV_HIDDEN = 64
NORM_HIDDEN = 32


@dataclass(frozen=True)
class MetaTensor:
    """One student tensor updated by a meta-net."""

    name: str             # parameter name in the student
    shape: tuple[int, ...]
    kind: str             # "conv" | "linear" | "norm"
    layer: TappedLayer    # where its layer's activation means are

    @property
    def rows(self) -> int:
        """The tensor's rows (its first dim: conv output channels, GroupNorm channels), which share its
        meta-net."""
        return self.shape[0]


@dataclass
class MetaGroup:
    """Tensors whose meta-nets have one shape (``dims``); ``index`` is the group's position."""

    index: int
    dims: GroupDims
    tensors: list[MetaTensor]

    @property
    def rows(self) -> tuple[int, ...]:
        """Each tensor's rows for one slot, in order: how the ops split the group's stacked rows among the
        tensors' meta-nets."""
        return tuple(t.rows for t in self.tensors)

    def row_index(self, slots: int = 1) -> torch.Tensor:
        """``[S·R, Ar]`` positions of each row's activation features in the flat means of ``slots``
        folded slots (a layer's S·C means are slot by slot), rows in the ops' slot layout."""
        index = []
        for t in self.tensors:
            c = t.layer.out_channels
            for s in range(slots):
                for r in range(t.rows):
                    if t.kind == "norm":
                        index.append([slots * t.layer.in_offset + s * c + r, slots * t.layer.out_offset + s * c + r])
                    else:
                        index.append([slots * t.layer.out_offset + s * c + r])
        return torch.tensor(index, dtype=torch.long).reshape(-1, self.dims.Ar)

    def shared_index(self, slots: int = 1) -> torch.Tensor:
        """``[G·S, Ds]`` positions of each (tensor, slot)'s shared features (its layer's input means)."""
        index = [[slots * t.layer.in_offset + s * t.layer.in_channels + j for j in range(self.dims.Ds)]
                 for t in self.tensors for s in range(slots)]
        return torch.tensor(index, dtype=torch.long).reshape(len(self.tensors) * slots, self.dims.Ds)


def find_meta_tensors(model: nn.Module, head_prefix: str = "heads", conv_hidden: int = CONV_HIDDEN,
                      norm_hidden: int = NORM_HIDDEN) -> tuple[list[tuple[MetaTensor, GroupDims]], list[str]]:
    """The tensors of ``model`` that get a meta-net, with their nets' dims, and the others' names."""
    layers = {layer.name: layer for layer in tapped_layers(model, head_prefix)}
    meta, plain = [], []
    for module_name, module in model.named_modules():
        layer = layers.get(module_name)
        for pname, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            shape = tuple(param.shape)
            if layer is not None and pname == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)):
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    raise ValueError(f"{name}: grouped convolutions have no meta-net (groups={module.groups}); "
                                     "use groups=1")
                kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
                dims = GroupDims(K=math.prod(shape[1:]), Ar=1, Ds=layer.in_channels, H=conv_hidden)
                meta.append((MetaTensor(name, shape, kind, layer), dims))
            elif layer is not None and isinstance(module, nn.GroupNorm):
                meta.append((MetaTensor(name, shape, "norm", layer), GroupDims(K=1, Ar=2, Ds=0, H=norm_hidden)))
            else:
                plain.append(name)
    return meta, plain


def architecture_name(model: nn.Module) -> str:
    """A name for ``model``'s architecture in messages: its ``arch_name`` if it has one, else its class."""
    return getattr(model, "arch_name", None) or type(model).__name__


@dataclass
class MetaState:
    """Per-group recurrent state ``h, c [3, R, H]`` of every row's meta-LSTM."""

    h: list[torch.Tensor]
    c: list[torch.Tensor]

    def detach(self) -> "MetaState":
        """Cut the graph here (a T-BPTT truncation) keeping the values."""
        return MetaState([x.detach() for x in self.h], [x.detach() for x in self.c])


@dataclass
class Theta:
    """The meta-parameters used by one step: the live ones or a snapshot of them."""

    lstm: Sequence[torch.Tensor]
    head: Sequence[torch.Tensor]


class MetaLearner(nn.Module):
    """Meta-nets for every conv / GroupNorm / linear tensor of models shaped like ``model``."""

    def __init__(self, model: nn.Module, *, lr: float = 0.1, head_prefix: str = "heads",
                 conv_hidden: int = CONV_HIDDEN, norm_hidden: int = NORM_HIDDEN, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.lr = float(lr)
        self.head_prefix = head_prefix
        self.conv_hidden, self.norm_hidden = conv_hidden, norm_hidden
        self.arch = architecture_name(model)
        found, plain = find_meta_tensors(model, head_prefix, conv_hidden, norm_hidden)
        if not found:
            raise ValueError("the model has no Conv2d, GroupNorm or non-head Linear layer for a meta-net")
        by_dims: dict[GroupDims, MetaGroup] = {}
        for tensor, dims in found:
            if dims not in by_dims:
                by_dims[dims] = MetaGroup(len(by_dims), dims, [])
            by_dims[dims].tensors.append(tensor)
        self.groups: list[MetaGroup] = list(by_dims.values())
        self.plain_parameters: tuple[str, ...] = tuple(plain)
        self.channel_count = sum(layer.in_channels + layer.out_channels
                                 for layer in tapped_layers(model, head_prefix))
        self.lstm = nn.ParameterList()
        self.head = nn.ParameterList()
        for group in self.groups:
            self.lstm.append(nn.Parameter(_init_lstm(len(group.tensors), group.dims, dtype)))
            self.head.append(nn.Parameter(_init_head(len(group.tensors), group.dims, dtype)))
            self.register_buffer(f"row_index_{group.index}", group.row_index(), persistent=False)
            self.register_buffer(f"shared_index_{group.index}", group.shared_index(), persistent=False)
        self._slot_index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # S > 1, built on first use

    # ----- the student's weights in grouped form -----
    @property
    def meta_tensors(self) -> list[MetaTensor]:
        """Every gated tensor, group by group: the order of the grouped (``flatten``) form and of ``layout``."""
        return [t for group in self.groups for t in group.tensors]

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """The gated tensors' names and shapes: what a saved meta-learner must match."""
        return [(t.name, t.shape) for t in self.meta_tensors]

    def plain_names(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` without a meta-net (heads, biases): they get plain SGD."""
        meta = {t.name for t in self.meta_tensors}
        return [n for n in names if n not in meta]

    def flatten(self, tensors: Mapping[str, torch.Tensor], slots: int = 1) -> list[torch.Tensor]:
        """Per group, the ``[S·R, K]`` rows of its tensors taken from ``tensors`` (by name, folded:
        ``[S·rows, ...]``), in the ops' slot layout."""
        return [torch.cat([tensors[t.name].reshape(slots * t.rows, group.dims.K) for t in group.tensors])
                for group in self.groups]

    def unflatten(self, flats: Sequence[torch.Tensor], slots: int = 1) -> dict[str, torch.Tensor]:
        """Views of the grouped ``flats`` shaped like the student's tensors (folded), by name.
        A group whose tensors share their shape but the first dim is one view and one split."""
        out = {}
        for group, flat in zip(self.groups, flats):
            sizes = [slots * r for r in group.rows]
            inner = {t.shape[1:] for t in group.tensors}
            if len(inner) == 1:
                parts = flat.view(flat.shape[0], *next(iter(inner))).split(sizes)
            else:
                parts = [rows.view(slots * t.shape[0], *t.shape[1:])
                         for t, rows in zip(group.tensors, flat.split(sizes))]
            out.update(zip((t.name for t in group.tensors), parts))
        return out

    # ----- the meta-learner itself -----
    def initial_state(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                      slots: int = 1) -> MetaState:
        """Zero recurrent state, as at the start of an episode, for ``slots`` slots."""
        shapes = [(NUM_CELLS, slots * sum(g.rows), g.dims.H) for g in self.groups]
        return MetaState([torch.zeros(s, device=device, dtype=dtype) for s in shapes],
                         [torch.zeros(s, device=device, dtype=dtype) for s in shapes])

    def theta(self) -> Theta:
        """The live meta-parameters θ, for a step that needs no ``snapshot``."""
        return Theta(list(self.lstm), list(self.head))

    def snapshot(self) -> Theta:
        """Copies of θ that stay in the graph: the optimizer may then update θ in place
        while later steps of a T-BPTT window still back-propagate through this one."""
        return Theta([p.clone() for p in self.lstm], [p.clone() for p in self.head])

    def features_of(self, means: torch.Tensor, group: MetaGroup, slots: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's per-row and shared activation features gathered from the flat means."""
        if slots == 1:
            row, shared = getattr(self, f"row_index_{group.index}"), getattr(self, f"shared_index_{group.index}")
        else:
            key = (group.index, slots, means.device)
            if key not in self._slot_index:
                self._slot_index[key] = (group.row_index(slots).to(means.device),
                                         group.shared_index(slots).to(means.device))
            row, shared = self._slot_index[key]
        return means[row], means[shared]

    def step(self, weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], means: torch.Tensor,
             state: MetaState, theta: Optional[Theta] = None
             ) -> tuple[list[torch.Tensor], MetaState, list[torch.Tensor]]:
        """One learned update of every group: returns ``(new weights, new state, δ)`` per group.

        ``weights``/``grads`` are grouped (``flatten``) for S slots, ``means`` the flat activation
        means (S·``channel_count``) of the forward pass that produced ``grads``.
        """
        slots, extra = divmod(means.numel(), self.channel_count)
        if extra or slots == 0:
            raise ValueError(f"means has {means.numel()} values, the student's layers have "
                             f"{self.channel_count} channels per slot: was it recorded on the same architecture?")
        theta = theta or self.theta()
        new_weights, deltas, hs, cs = [], [], [], []
        for group in self.groups:
            i = group.index
            a_row, a_shared = self.features_of(means, group, slots)
            h, c = ops.meta_lstm(weights[i], grads[i], a_row, a_shared, theta.lstm[i], group.rows,
                                 state.h[i], state.c[i])
            w_new, delta = ops.gated_update(h[NUM_CELLS - 1], theta.head[i], weights[i], grads[i],
                                            group.rows, self.lr)
            new_weights.append(w_new)
            deltas.append(delta)
            hs.append(h)
            cs.append(c)
        return new_weights, MetaState(hs, cs), deltas


def _init_lstm(count: int, dims: GroupDims, dtype: torch.dtype) -> torch.Tensor:
    """``torch.nn.LSTMCell``'s init, U(-1/√H, 1/√H); the bias is the sum of its two biases."""
    bound = 1.0 / math.sqrt(dims.H)
    lstm = torch.empty(count, dims.lstm_size, dtype=dtype).uniform_(-bound, bound)
    for _, _, b in unpack_lstm(lstm, dims):
        b.add_(torch.empty_like(b).uniform_(-bound, bound))
    return lstm


def _init_head(count: int, dims: GroupDims, dtype: torch.dtype) -> torch.Tensor:
    """``W_out = 0``, ``b_out = 1``, ``s = 1/tanh(1)``: δ ≡ 1 at the start, exactly when ``s`` is
    computed in the parameters' own dtype (converting a float32 ``s`` to float64 is not exact)."""
    head = torch.zeros(count, dims.head_size, dtype=dtype)
    _, b_out, scale = unpack_head(head, dims)
    b_out.fill_(1.0)
    scale.copy_(1.0 / torch.tanh(torch.ones((), dtype=dtype)))
    return head
