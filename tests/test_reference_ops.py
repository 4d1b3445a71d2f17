"""The reference ops are the contract: checked against torch.nn.LSTMCell, hand values and gradcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastl2r import ops
from fastl2r.ops import GroupDims, unpack_head, unpack_lstm
from fastl2r.ops.reference import rms_normalise


@pytest.fixture(autouse=True)
def reference_backend():
    """These tests pin down the contract itself: the reference ops, whatever else is built."""
    with ops.use_backend("reference"):
        yield


def group_inputs(dims: GroupDims, rows, dtype=torch.float64, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    R, G = sum(rows), len(rows)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return dict(w=rnd(R, dims.K), g=rnd(R, dims.K) * 0.01, a_row=rnd(R, dims.Ar), a_shared=rnd(G, dims.Ds),
                lstm=rnd(G, dims.lstm_size) * scale, h=rnd(3, R, dims.H) * 0.5, c=rnd(3, R, dims.H) * 0.5,
                head=rnd(G, dims.head_size) * scale)


CONV = GroupDims(K=90, Ar=1, Ds=10, H=8)   # a 3x3x10 kernel, as in the paper (H small for speed)
NORM = GroupDims(K=1, Ar=2, Ds=0, H=5)      # GroupNorm γ or β


def test_conv_row_input_size_is_191_as_in_the_paper():
    assert GroupDims(K=3 * 3 * 10, Ar=1, Ds=10, H=64).D == 191
    assert NORM.D == 4


def rms(x):
    return x.pow(2).mean().sqrt()


def lstmcell_step(x, dims, rows, w, w_rms=None):
    """The meta-nets rebuilt from ``torch.nn.LSTMCell``: per cell ``(h, c)`` per tensor, and the
    updated weights.  ``w_rms`` (per tensor) replaces the RMS of ``w`` when given."""
    cells = unpack_lstm(x["lstm"], dims)
    w_out, b_out, scale = unpack_head(x["head"], dims)
    states, updates, start = [], [], 0
    for t, n in enumerate(rows):
        r = slice(start, start + n)
        start += n
        # the features: each block over the whole tensor, divided by its RMS + 1e-8
        w_scale = rms(w[r]).detach() if w_rms is None else w_rms[t]
        feats = [w[r] / (w_scale + 1e-8), x["g"][r] / (rms(x["g"][r]) + 1e-8)]
        feats += [x["a_row"][r, j:j + 1] / (rms(x["a_row"][r, j]) + 1e-8) for j in range(dims.Ar)]
        if dims.Ds:
            feats.append((x["a_shared"][t] / (rms(x["a_shared"][t]) + 1e-8)).expand(n, dims.Ds))
        inp = torch.cat(feats, 1)
        assert inp.shape[1] == dims.D
        per_cell = []
        for k, (w_ih, w_hh, b) in enumerate(cells):
            cell = torch.nn.LSTMCell(w_ih.shape[2], dims.H).double()
            with torch.no_grad():
                cell.weight_ih.copy_(w_ih[t])
                cell.weight_hh.copy_(w_hh[t])
                cell.bias_ih.copy_(b[t])
                cell.bias_hh.zero_()
            h, c = cell(inp, (x["h"][k, r], x["c"][k, r]))
            per_cell.append((h, c))
            inp = F.relu(h)  # ReLU between cells
        states.append(per_cell)
        delta = scale[t] * torch.tanh(per_cell[-1][0] @ w_out[t].t() + b_out[t])
        updates.append(w[r] - 0.1 * delta * x["g"][r])
    return states, torch.cat(updates)


@pytest.mark.parametrize("dims,rows", [(CONV, (3, 5)), (NORM, (4, 1, 2))])
def test_meta_lstm_matches_lstmcell_cell_by_cell(dims, rows):
    x = group_inputs(dims, rows)
    h_new, c_new = ops.meta_lstm(x["w"], x["g"], x["a_row"], x["a_shared"], x["lstm"], rows, x["h"], x["c"])
    w_new, _ = ops.gated_update(h_new[2], x["head"], x["w"], x["g"], rows, 0.1)
    states, w_ref = lstmcell_step(x, dims, rows, x["w"])
    start = 0
    for t, n in enumerate(rows):
        for k, (h_ref, c_ref) in enumerate(states[t]):
            torch.testing.assert_close(h_new[k, start:start + n], h_ref)
            torch.testing.assert_close(c_new[k, start:start + n], c_ref)
        start += n
    torch.testing.assert_close(w_new, w_ref)


def test_gated_update_hand_computed():
    dims = GroupDims(K=2, Ar=0, Ds=0, H=3)
    head = torch.zeros(1, dims.head_size, dtype=torch.float64)
    w_out, b_out, scale = unpack_head(head, dims)
    w_out.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    b_out.copy_(torch.tensor([0.5, -1.0]))
    scale.fill_(2.0)
    h3 = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    g = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    w_new, delta = ops.gated_update(h3, head, w, g, (1,), 0.1)
    expected_delta = torch.tensor([[2 * math.tanh(0.1 + 0.5), 2 * math.tanh(0.4 - 1.0)]], dtype=torch.float64)
    torch.testing.assert_close(delta, expected_delta)
    torch.testing.assert_close(w_new, w - 0.1 * expected_delta * g)


def test_initial_head_gives_delta_one():
    from fastl2r.meta.metalearner import _init_head
    dims = GroupDims(K=4, Ar=1, Ds=3, H=6)
    head = _init_head(2, dims, torch.float64)
    _, delta = ops.gated_update(torch.randn(5, 6, dtype=torch.float64), head, torch.randn(5, 4, dtype=torch.float64),
                                torch.randn(5, 4, dtype=torch.float64), (2, 3), 0.1)
    torch.testing.assert_close(delta, torch.ones_like(delta), rtol=0, atol=0)


def test_rms_normalisation_is_constant_for_the_gradient():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(rms_normalise(x).sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 1.0) / (x.detach().pow(2).mean().sqrt() + 1e-8))


SMALL = [(GroupDims(K=6, Ar=1, Ds=2, H=3), (2, 1)), (GroupDims(K=1, Ar=2, Ds=0, H=2), (3,))]


@pytest.mark.parametrize("dims,rows", SMALL)
def test_reference_ops_gradcheck(dims, rows):
    """Meta-parameters, states and h3; w enters through the RMS, which finite differences move,
    so its gradient is checked separately below."""
    x = group_inputs(dims, rows, seed=3)
    lstm, h, c, head = (x[k].clone().requires_grad_() for k in ("lstm", "h", "c", "head"))

    def step(lstm, h, c, head):
        h_new, c_new = ops.meta_lstm(x["w"], x["g"], x["a_row"], x["a_shared"], lstm, rows, h, c)
        w_new, delta = ops.gated_update(h_new[2], head, x["w"], x["g"], rows, 0.1)
        return h_new, c_new, w_new, delta

    assert torch.autograd.gradcheck(step, (lstm, h, c, head))


@pytest.mark.parametrize("dims,rows", SMALL)
def test_weight_gradient_holds_the_rms_constant(dims, rows):
    """d w_new / d w (through the features and directly) against finite differences of the
    LSTMCell rebuild with each tensor's RMS frozen at its value: the RMS carries no gradient."""
    x = group_inputs(dims, rows, seed=4)
    starts = [sum(rows[:t]) for t in range(len(rows))]
    frozen = [rms(x["w"][s:s + n]) for s, n in zip(starts, rows)]
    w = x["w"].clone().requires_grad_()
    h_new, _ = ops.meta_lstm(w, x["g"], x["a_row"], x["a_shared"], x["lstm"], rows, x["h"], x["c"])
    w_new, _ = ops.gated_update(h_new[2], x["head"], w, x["g"], rows, 0.1)
    probe = torch.randn_like(w)
    (grad,) = torch.autograd.grad((w_new * probe).sum(), w)
    eps = 1e-6
    for i in range(0, w.numel(), max(1, w.numel() // 7)):
        e = torch.zeros(w.numel(), dtype=w.dtype)
        e[i] = eps
        e = e.view_as(w)
        with torch.no_grad():
            plus = lstmcell_step(x, dims, rows, x["w"] + e, frozen)[1]
            minus = lstmcell_step(x, dims, rows, x["w"] - e, frozen)[1]
        torch.testing.assert_close(grad.view(-1)[i], ((plus - minus) * probe).sum() / (2 * eps), rtol=1e-6, atol=1e-9)


def test_channel_means_of_a_list():
    xs = [torch.randn(3, 4, 5, 6), torch.randn(2, 7), torch.randn(1, 2, 3)]
    torch.testing.assert_close(ops.channel_means(xs), torch.cat([xs[0].mean((0, 2, 3)), xs[1].mean(0), xs[2].mean((0, 2))]))


def test_public_face_rejects_inconsistent_shapes():
    x = group_inputs(CONV, (3, 5))
    with pytest.raises(ValueError, match="rows"):
        ops.meta_lstm(x["w"], x["g"], x["a_row"], x["a_shared"], x["lstm"], (3, 4), x["h"], x["c"])
    with pytest.raises(ValueError, match="columns"):
        ops.gated_update(x["h"][2], x["head"][:, :-1], x["w"], x["g"], (3, 5), 0.1)
    with pytest.raises(ValueError, match="channel"):
        ops.channel_means([torch.randn(3)])


def test_forced_backends_fail_clearly():
    with ops.use_backend("nonexistent"):
        with pytest.raises(ops.BackendError, match="unknown backend 'nonexistent'.*reference"):
            ops.channel_means([torch.randn(2, 3)])
    with ops.use_backend("reference"):
        assert ops.backend_name("cpu") == "reference"


def stack_slots(per_slot, rows):
    """Per-slot ``[R, X]`` row tensors in the slot layout of the ops: tensor by tensor, slot by slot."""
    out, start = [], 0
    for n in rows:
        out += [x[start:start + n] for x in per_slot]
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("dims,rows", [(CONV, (3, 5)), (NORM, (4, 1, 2))])
def test_slots_are_independent_episodes(dims, rows):
    """S slots in one call = S separate calls: per-(tensor, slot) RMS and shared features, the
    meta-nets shared, so θ's gradient is the sum of the slots' gradients."""
    slots = [group_inputs(dims, rows, seed=s) for s in range(3)]
    shared = slots[0]["lstm"].clone().requires_grad_()
    head = slots[0]["head"].clone().requires_grad_()
    per_slot_outputs, lstm_grad, head_grad = [], torch.zeros_like(shared), torch.zeros_like(head)
    for x in slots:
        h_new, c_new = ops.meta_lstm(x["w"], x["g"], x["a_row"], x["a_shared"], shared, rows, x["h"], x["c"])
        w_new, delta = ops.gated_update(h_new[2], head, x["w"], x["g"], rows, 0.1)
        gl, gh = torch.autograd.grad(w_new.sum() + c_new.square().sum(), (shared, head))
        lstm_grad += gl
        head_grad += gh
        per_slot_outputs.append((h_new, c_new, w_new, delta))
    cat = {k: stack_slots([x[k] for x in slots], rows) for k in ("w", "g", "a_row")}
    cat["a_shared"] = torch.cat([torch.stack([x["a_shared"][t] for x in slots]) for t in range(len(rows))])
    cat["h"] = torch.stack([stack_slots([x["h"][k] for x in slots], rows) for k in range(3)])
    cat["c"] = torch.stack([stack_slots([x["c"][k] for x in slots], rows) for k in range(3)])
    h_new, c_new = ops.meta_lstm(cat["w"], cat["g"], cat["a_row"], cat["a_shared"], shared, rows, cat["h"], cat["c"])
    w_new, delta = ops.gated_update(h_new[2], head, cat["w"], cat["g"], rows, 0.1)
    gl, gh = torch.autograd.grad(w_new.sum() + c_new.square().sum(), (shared, head))
    for k in range(3):
        torch.testing.assert_close(h_new[k], stack_slots([o[0][k] for o in per_slot_outputs], rows))
        torch.testing.assert_close(c_new[k], stack_slots([o[1][k] for o in per_slot_outputs], rows))
    torch.testing.assert_close(w_new, stack_slots([o[2] for o in per_slot_outputs], rows))
    torch.testing.assert_close(delta, stack_slots([o[3] for o in per_slot_outputs], rows))
    torch.testing.assert_close(gl, lstm_grad)
    torch.testing.assert_close(gh, head_grad)


def test_rows_must_divide_the_group_into_slots():
    x = group_inputs(NORM, (4, 1, 2))
    with pytest.raises(ValueError, match="divide"):
        ops.meta_lstm(x["w"][:6], x["g"][:6], x["a_row"][:6], x["a_shared"], x["lstm"], (4, 1, 2),
                      x["h"][:, :6], x["c"][:, :6])
