"""Layers as thin modules over `nanolstm.functional`: parameters, their gradients and the last cache.

Parameters are named and shaped as PyTorch names them, so `state_dict()` of a PyTorch layer (as NumPy
arrays) loads here unchanged and back. Each module computes in its own dtype (float32 unless asked),
and every output, state and gradient keeps it.

Shapes: T time, N batch, D input, H hidden, L layers, V vocabulary, E embedding size.
"""

import math
from typing import NamedTuple

import numpy as np

from nanolstm import functional as F


class Module:
    """What every layer has: named parameters with gradients, sub-modules, a train/eval switch.

    `params` and `grads` hold this module's own arrays; `state_dict()` and `named_grads()` gather
    those of its sub-modules too, under "child.name" as in PyTorch.
    """

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"dtype must be a floating type, got {self.dtype}")
        self.params = {}
        self.grads = {}
        self.children = {}
        self.training = True

    def add_param(self, name, value):
        self.params[name] = np.ascontiguousarray(value, dtype=self.dtype)
        self.grads[name] = np.zeros_like(self.params[name])

    def state_dict(self):
        """Every parameter by its PyTorch name. The arrays are the live ones, not copies."""
        out = dict(self.params)
        for cname, child in self.children.items():
            out.update({f"{cname}.{k}": v for k, v in child.state_dict().items()})
        return out

    def named_grads(self):
        """The gradient of every parameter, under the names of state_dict()."""
        out = dict(self.grads)
        for cname, child in self.children.items():
            out.update({f"{cname}.{k}": v for k, v in child.named_grads().items()})
        return out

    def load_state_dict(self, state):
        """Copy arrays in by name. Missing or unexpected names, or a wrong shape: ValueError naming them."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"state_dict does not fit: missing {missing}, unexpected {unexpected}")
        wrong = [f"{k} {np.shape(state[k])} (expected {own[k].shape})"
                 for k in own if np.shape(state[k]) != own[k].shape]
        if wrong:
            raise ValueError("state_dict shapes do not fit: " + ", ".join(wrong))
        for k, v in own.items():
            np.copyto(v, np.asarray(state[k]), casting="unsafe")

    def zero_grad(self):
        for g in self.named_grads().values():
            g.fill(0)

    def train(self, mode=True):
        self.training = mode
        for child in self.children.values():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def num_parameters(self):
        return sum(p.size for p in self.state_dict().values())

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Recurrent layers: LSTM, GRU and RNN share everything but one layer's forward and backward.


def _with_zero_biases(params, names, size, dtype):
    """The arrays of a layer's names (weight_ih, weight_hh, bias_ih, bias_hh), zeros for biases
    it was made without (bias=False): the same functions serve with and without."""
    return tuple(params[name] if name in params else np.zeros(size, dtype) for name in names)


def _read_only(a):
    """A view of a that cannot be written. A forward returns its output from the cache that its
    backward reads; changed in place, it would make backward's gradients silently wrong, so the
    change raises at once instead (PyTorch raises in backward). Copy it to change it."""
    view = a.view()
    view.flags.writeable = False
    return view


def _shapes_text(shapes):
    """'(2, 3, 4)', or '(2, 3, 2) and (2, 3, 4)' where the parts differ (an LSTM with proj_size)."""
    return " and ".join(dict.fromkeys(str(shape) for shape in shapes))


def _check_sizes(**sizes):
    for name, v in sizes.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


class _Packing(NamedTuple):
    """A batch of sequences of different lengths, run as PyTorch runs a packed sequence: the rows
    sorted longest first, so that at each step the sequences that have not ended are the first rows,
    and a step computes only those."""

    order: np.ndarray  # the batch's rows, longest first: sorted row i is the batch's row order[i]
    lengths: np.ndarray  # their lengths, in that order
    batch_sizes: np.ndarray  # (T,): how many sequences run at each step, PyTorch's batch_sizes

    @classmethod
    def of(cls, lengths, T, N):
        lengths = np.asarray(lengths)
        fits = (lengths.shape == (N,) and lengths.dtype.kind in "iu"
                and (N == 0 or 1 <= lengths.min() <= lengths.max() <= T))
        if not fits:
            raise ValueError(f"lengths must be {N} integers from 1 to T = {T}, one for each sequence of the batch")
        lengths = lengths.astype(np.int64)
        order = np.argsort(-lengths, kind="stable")
        lengths = lengths[order]
        return cls(order, lengths, np.sum(lengths > np.arange(T)[:, None], axis=1))

    def sort(self, a):
        """(T or L, N, ...) with the batch's rows -> the same with the rows longest first."""
        return a[:, self.order]

    def unsort(self, a):
        out = np.empty_like(a)
        out[:, self.order] = a
        return out

    def reverse(self, a):
        """(T, N, ...) with sorted rows -> each row's own steps in reverse order, the steps after its
        length zero: what a reverse direction reads, and how its output goes back in place."""
        back = self.lengths - 1 - np.arange(a.shape[0])[:, None]  # (T, N): the step each place takes
        out = a[np.maximum(back, 0), np.arange(a.shape[1])]
        out[back < 0] = 0
        return out


class _Recurrent(Module):
    gates = 1  # G: gate blocks per unit
    state_parts = 1  # arrays in the state: h, or (h, c) for the LSTM
    proj_size = 0  # P: the LSTM's projected h, when not 0

    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, batch_first=False,
                 dtype=np.float32, rng=None, bidirectional=False, bias=True):
        super().__init__(dtype)
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        if self.proj_size >= hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size, got {self.proj_size} and {hidden_size}")
        if not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be between 0 and 1, got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.bidirectional, self.bias = bool(bidirectional), bool(bias)
        self.num_directions = 2 if bidirectional else 1
        # the size of h, of each direction's output and of a layer's input from below: H, or P
        self.output_size = self.proj_size or hidden_size
        self._names = [[self._param_names(layer, direction) for direction in range(self.num_directions)]
                       for layer in range(num_layers)]
        self.rng = rng if rng is not None else np.random.default_rng()
        self.reset_parameters()
        self._cache = None
        self._unbatched = False  # whether the last forward took one sequence without a batch axis
        # the large arrays of a pass, kept from one call to the next (functional._scratch): the
        # pre-activations of each layer and direction, live from forward to backward, and their
        # gradient, which one layer's backward at a time needs
        self._work_forward = [{} for _ in range(num_layers * self.num_directions)]
        self._work_backward = {}

    def reset_parameters(self):
        """Uniform in +-1/sqrt(H) for every weight and bias, as PyTorch does."""
        H, G, R = self.hidden_size, self.gates, self.output_size
        k = 1 / math.sqrt(H)
        for layer in range(self.num_layers):
            D = self.input_size if layer == 0 else R * self.num_directions
            shapes = ((G * H, D), (G * H, R), (G * H,), (G * H,), (R, H))  # the last, W_hr, with proj_size only
            for direction in range(self.num_directions):
                for name, shape in zip(self._names[layer][direction], shapes):
                    if self.bias or name.startswith("weight"):  # bias=False: no biases, as in PyTorch
                        self.add_param(name, self.rng.uniform(-k, k, shape))

    def _param_names(self, layer, direction=0):
        """PyTorch's names of a layer's weight_ih, weight_hh, bias_ih and bias_hh, and weight_hr
        with proj_size; the reverse direction's (bidirectional) end in _reverse."""
        suffix = "_reverse" if direction else ""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + ("weight_hr",) * bool(self.proj_size)
        return tuple(f"{name}_l{layer}{suffix}" for name in names)

    def layer_params(self, layer, direction=0):
        p = self.params
        return _with_zero_biases(p, self._names[layer][direction], self.gates * self.hidden_size, self.dtype)

    # The state is a tuple of (L, N, size) arrays (2L rows when bidirectional): (h, c) for the LSTM, (h,) for the
    # others; h's size is output_size (P with proj_size), c's H.
    def _state_in(self, state):
        return state if isinstance(state, tuple) else (state,)

    def _state_out(self, parts):
        return parts[0]

    def zero_state(self, N):
        """The zero state of N streams, in the form forward takes and returns."""
        return self._state_out(self._state_parts(None, N, "state"))

    def _state_shapes(self, *batch):
        """The shape of each part of the state: (L, *batch, size)."""
        L = self.num_layers * self.num_directions
        return tuple((L, *batch, size) for size in (self.output_size, self.hidden_size)[: self.state_parts])

    def _state_parts(self, state, N, what):
        """A state (or its gradient) as the user passes it -> a tuple of (L, N, size) arrays in our
        dtype; None means zeros. A wrong number or shape of arrays: ValueError."""
        shapes = self._state_shapes(N)
        if state is None:
            return tuple(np.zeros(shape, self.dtype) for shape in shapes)
        parts = tuple(np.asarray(s, dtype=self.dtype) for s in self._state_in(state))
        if len(parts) != self.state_parts or any(s.shape != shape for s, shape in zip(parts, shapes)):
            raise ValueError(f"expected {what} as {self.state_parts} array(s) of shape {_shapes_text(shapes)}")
        return parts

    def forward(self, x, state=None, lengths=None):
        """x (T, N, D), or (N, T, D) with batch_first; state as described by the subclass, or None
        for zeros. Returns out (T, N, H) (or batch first; H is P for an LSTM with proj_size) and the
        final state, of the same form.

        lengths: None, or each sequence's length (N integers, 1 to T), for a batch of sequences of
        different lengths, each padded at its end, as PyTorch runs them packed
        (pack_padded_sequence): a sequence's steps past its length are not computed, its output
        there is zero (pad_packed_sequence's padding), and its final state is the one after its
        last step. A reverse direction (bidirectional) reads each sequence from its own last step.

        As in PyTorch, x may also be one sequence without a batch axis, (T, D) whatever batch_first
        says; out is then (T, H) and each part of the state (L, H), as a batch of one would have them.

        Bidirectional, as in PyTorch: each layer runs a second time loop of its own weights over the
        sequence reversed in time, and its output is the two loops' outputs side by side, (T, N, 2H),
        the forward's first. The state's rows are then 2L, layer l's forward one at 2l and its
        reverse one at 2l + 1."""
        unbatched = False
        if isinstance(x, F.Lookup):  # an embedding for the first layer to fold in (LanguageModel)
            if (self.batch_first or self.bidirectional or x.shape[2] != self.input_size or x.dtype != self.dtype
                    or lengths is not None):
                raise ValueError(f"expected a Lookup of {self.dtype} rows of size {self.input_size}, time first, "
                                 "without lengths")
        else:
            x = np.asarray(x, dtype=self.dtype)
            if x.ndim == 2 and x.shape[1] == self.input_size:  # one sequence: a batch of one, time first
                unbatched = True
                x, state = x[:, None], self._batch_of_one(state, "state")
            elif x.ndim != 3 or x.shape[2] != self.input_size:
                raise ValueError(f"expected input of shape (T, N, {self.input_size}), or (T, {self.input_size}) "
                                 f"for one sequence, got {x.shape}")
            elif self.batch_first:
                x = x.transpose(1, 0, 2)
            x = np.ascontiguousarray(x)
        N, K = x.shape[1], self.num_directions
        state = self._state_parts(state, N, "state")
        packing = None
        if lengths is not None:
            if unbatched:
                raise ValueError("lengths are for a batch of sequences, (T, N, D); one sequence has its own length")
            packing = _Packing.of(lengths, x.shape[0], N)
            x, state = packing.sort(x), tuple(packing.sort(s) for s in state)
        flip = packing.reverse if packing else (lambda a: a[::-1])  # a sequence's steps reversed
        batch_sizes = packing.batch_sizes if packing else None  # each step runs only the rows still running
        finals = [np.empty_like(s) for s in state]
        caches, masks = [], []
        for layer in range(self.num_layers):
            mask = None
            if layer > 0 and self.training and self.dropout > 0:
                mask = F.dropout_mask(x.shape, self.dropout, self.rng, self.dtype)
                x = x * mask
            outs = []
            for direction in range(K):  # the reverse direction: the same loop on the sequence reversed
                row = layer * K + direction
                out, last, cache = self._layer_forward(x if direction == 0 else np.ascontiguousarray(flip(x)),
                                                       tuple(s[row] for s in state), self.layer_params(layer, direction),
                                                       self._work_forward[row], batch_sizes)
                outs.append(out if direction == 0 else flip(out))
                for f, s in zip(finals, last):
                    f[row] = s
                caches.append(cache)
            x = outs[0] if K == 1 else np.concatenate(outs, axis=2)
            masks.append(mask)
        if packing:
            x, finals = packing.unsort(x), [packing.unsort(f) for f in finals]
        self._cache, self._unbatched = (caches, masks, packing), unbatched  # for backward, together
        x = _read_only(x)
        if unbatched:
            return x[:, 0], self._state_out(tuple(f[:, 0] for f in finals))
        out = x.transpose(1, 0, 2) if self.batch_first else x
        return out, self._state_out(tuple(finals))

    def _batch_of_one(self, state, what):
        """An unbatched input's state (or its gradient), each part (L, H), as a batch of one: (L, 1, H)."""
        if state is None:
            return None
        parts = tuple(np.asarray(s, dtype=self.dtype) for s in self._state_in(state))
        shapes = self._state_shapes()
        if len(parts) != self.state_parts or any(s.shape != shape for s, shape in zip(parts, shapes)):
            raise ValueError(f"expected {what} for one sequence as {self.state_parts} array(s) "
                             f"of shape {_shapes_text(shapes)}")
        return tuple(s[:, None] for s in parts)

    def backward(self, dout, dstate_n=None):
        """dout like out, dstate_n like the final state (or None for zeros) -> dx like x (for a
        Lookup: the gradient of its weight), and the gradient of the initial state like the state.
        Parameter gradients add up in .grads."""
        if self._cache is None:
            raise RuntimeError("backward called before forward")
        caches, masks, packing = self._cache
        dout = np.asarray(dout, dtype=self.dtype)
        if self._unbatched:
            dout, dstate_n = dout[:, None], self._batch_of_one(dstate_n, "dstate_n")
        elif self.batch_first:
            dout = dout.transpose(1, 0, 2)
        dx = np.ascontiguousarray(dout)
        N, R, K = dx.shape[1], self.output_size, self.num_directions
        dstate_n = self._state_parts(dstate_n, N, "dstate_n")
        if packing:
            dx, dstate_n = packing.sort(dx), tuple(packing.sort(d) for d in dstate_n)
        flip = packing.reverse if packing else (lambda a: a[::-1])
        dstate_0 = [np.empty_like(d) for d in dstate_n]
        for layer in reversed(range(self.num_layers)):
            dxs = []
            for direction in range(K):  # each direction's part of the output's gradient, in its own time order
                row = layer * K + direction
                part = dx if K == 1 else dx[:, :, direction * R : (direction + 1) * R]
                dx_part, d0, dparams = self._layer_backward(part if direction == 0 else flip(part),
                                                            tuple(s[row] for s in dstate_n), caches[row],
                                                            self._work_backward)
                dxs.append(dx_part if direction == 0 else flip(dx_part))
                for d, s in zip(dstate_0, d0):
                    d[row] = s
                for name, g in zip(self._names[layer][direction], dparams):
                    if name in self.grads:  # bias=False: the biases' gradients have nowhere to go
                        self.grads[name] += g
            dx = dxs[0] if K == 1 else dxs[0] + dxs[1]
            if masks[layer] is not None:
                dx *= masks[layer]
        if packing:
            dx, dstate_0 = packing.unsort(dx), [packing.unsort(d) for d in dstate_0]
        if self._unbatched:
            return dx[:, 0], self._state_out(tuple(d[:, 0] for d in dstate_0))
        if self.batch_first:
            dx = dx.transpose(1, 0, 2)
        return dx, self._state_out(tuple(dstate_0))

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, "
                f"bidirectional={self.bidirectional}, bias={self.bias}, dtype={self.dtype}")

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class LSTM(_Recurrent):
    """Long short-term memory, as torch.nn.LSTM: gates i, f, g, o; the state is (h0, c0).

    proj_size=P (0 < P < H), as PyTorch's: h_t = (o * tanh(c_t)) W_hr^T, P units, is the output and
    what the next step's W_hh (4H, P) multiplies; c_t keeps H units. The output is then (T, N, P),
    h0 (L, N, P), c0 (L, N, H), and each layer has a weight_hr_l{k} (P, H) more."""

    gates = 4
    state_parts = 2

    def __init__(self, input_size, hidden_size, num_layers=1, dropout=0.0, batch_first=False,
                 dtype=np.float32, rng=None, bidirectional=False, bias=True, proj_size=0):
        if not isinstance(proj_size, (int, np.integer)) or isinstance(proj_size, bool) or proj_size < 0:
            raise ValueError(f"proj_size must be a positive integer, or 0 for none, got {proj_size!r}")
        self.proj_size = int(proj_size)
        super().__init__(input_size, hidden_size, num_layers, dropout, batch_first, dtype, rng, bidirectional, bias)

    def _state_in(self, state):
        return tuple(state)

    def _state_out(self, parts):
        return parts

    def _layer_forward(self, x, state, params, work, batch_sizes):
        forward = F.lstmp_forward if self.proj_size else F.lstm_forward
        out, h, c, cache = forward(x, *state, *params, work=work, batch_sizes=batch_sizes)
        return out, (h, c), cache

    def _layer_backward(self, dout, dstate, cache, work):
        backward = F.lstmp_backward if self.proj_size else F.lstm_backward
        dx, dh0, dc0, dparams = backward(dout, *dstate, cache, work=work)
        return dx, (dh0, dc0), dparams

    def extra_repr(self):
        return super().extra_repr() + (f", proj_size={self.proj_size}" if self.proj_size else "")


class GRU(_Recurrent):
    """Gated recurrent unit, as torch.nn.GRU: gates r, z, n; the state is h0."""

    gates = 3

    def _layer_forward(self, x, state, params, work, batch_sizes):
        out, h, cache = F.gru_forward(x, state[0], *params, work=work, batch_sizes=batch_sizes)
        return out, (h,), cache

    def _layer_backward(self, dout, dstate, cache, work):
        dx, dh0, dparams = F.gru_backward(dout, dstate[0], cache, work=work)
        return dx, (dh0,), dparams


class RNN(_Recurrent):
    """Elman RNN with tanh or relu, as torch.nn.RNN; the state is h0."""

    gates = 1

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", dropout=0.0,
                 batch_first=False, dtype=np.float32, rng=None, bidirectional=False, bias=True):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, dropout, batch_first, dtype, rng, bidirectional, bias)

    def _layer_forward(self, x, state, params, work, batch_sizes):
        out, h, cache = F.rnn_forward(x, state[0], *params, self.nonlinearity, work=work, batch_sizes=batch_sizes)
        return out, (h,), cache

    def _layer_backward(self, dout, dstate, cache, work):
        dx, dh0, dparams = F.rnn_backward(dout, dstate[0], cache, work=work)
        return dx, (dh0,), dparams

    def extra_repr(self):
        return super().extra_repr() + f", nonlinearity={self.nonlinearity!r}"


# ---------------------------------------------------------------------------------------------
# Cells: one time step, for loops written by hand, as torch.nn.LSTMCell, GRUCell and RNNCell.


class _Cell(Module):
    """One step of a one-layer recurrent network, for a time loop of your own. Each forward in
    train() mode keeps what its backward needs on a stack, and each backward takes the most recent
    off it: call backward once per forward, last step first, as backpropagation through time runs
    (the gradients add up in .grads). In eval() mode nothing is kept.

    x (N, D), or (D,) for one sequence; each part of the state (N, H), or (H,)."""

    gates = 1
    state_parts = 1
    _NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def __init__(self, input_size, hidden_size, dtype=np.float32, rng=None, bias=True):
        super().__init__(dtype)
        _check_sizes(input_size=input_size, hidden_size=hidden_size)
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bool(bias)
        rng = rng if rng is not None else np.random.default_rng()
        G, H, k = self.gates, hidden_size, 1 / math.sqrt(hidden_size)  # PyTorch's initialization
        for name, shape in zip(self._NAMES, ((G * H, input_size), (G * H, H), (G * H,), (G * H,))):
            if self.bias or name.startswith("weight"):
                self.add_param(name, rng.uniform(-k, k, shape))
        self._caches = []

    def _parts(self, state, N, unbatched, what):
        """A state or its gradient -> a tuple of (N, H) arrays; None (or None for a part): zeros."""
        shape = (self.hidden_size,) if unbatched else (N, self.hidden_size)
        if state is None or self.state_parts == 1:
            given = (state,) * self.state_parts
        elif isinstance(state, (tuple, list)):
            given = tuple(state)
        else:
            given = ()  # one array where the LSTM's (h, c) was expected
        if len(given) != self.state_parts:
            raise ValueError(f"expected {what} as {self.state_parts} array(s) of shape {shape}")
        parts = tuple(np.zeros(shape, self.dtype) if s is None else np.asarray(s, self.dtype) for s in given)
        if any(s.shape != shape for s in parts):
            raise ValueError(f"expected {what} as {self.state_parts} array(s) of shape {shape}")
        return tuple(s.reshape(N, self.hidden_size) for s in parts)

    def forward(self, x, state=None):
        """x (N, D) and the state (None for zeros) -> the next state, of the same form."""
        x = np.asarray(x, self.dtype)
        unbatched = x.ndim == 1
        if x.shape[-1:] != (self.input_size,) or x.ndim not in (1, 2):
            raise ValueError(f"expected input of shape (N, {self.input_size}) or ({self.input_size},), "
                             f"got {x.shape}")
        x = x.reshape(1, -1, self.input_size)  # one time step of the layer's functions
        N = x.shape[1]
        new, cache = self._step(x, self._parts(state, N, unbatched, "state"))
        if self.training:
            self._caches.append((cache, N, unbatched))
            new = tuple(_read_only(s) for s in new)
        return self._out(tuple(s[0] if unbatched else s for s in new))

    def backward(self, dstate):
        """The gradient of the state the most recent forward returned -> (dx, the gradient of the
        state that forward took), shaped as they were."""
        if not self._caches:
            raise RuntimeError("backward called more times than forward (in train() mode)")
        cache, N, unbatched = self._caches[-1]
        dparts = self._parts(dstate, N, unbatched, "dstate")  # checked before the step is taken off
        self._caches.pop()
        dx, dstate0, dparams = self._step_backward(np.zeros((1, N, self.hidden_size), self.dtype), dparts, cache)
        for name, g in zip(self._NAMES, dparams):
            if name in self.grads:
                self.grads[name] += g
        if unbatched:
            return dx[0, 0], self._out(tuple(d[0] for d in dstate0))
        return dx[0], self._out(dstate0)

    def _out(self, parts):
        return parts if self.state_parts > 1 else parts[0]

    def _params(self):
        return _with_zero_biases(self.params, self._NAMES, self.gates * self.hidden_size, self.dtype)

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}, dtype={self.dtype}"

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class LSTMCell(_Cell):
    """One LSTM step, as torch.nn.LSTMCell: (h, c) -> (h', c')."""

    gates = 4
    state_parts = 2

    def _step(self, x, state):
        _, h, c, cache = F.lstm_forward(x, *state, *self._params())
        return (h, c), cache

    def _step_backward(self, dout, dstate, cache):
        dx, dh0, dc0, dparams = F.lstm_backward(dout, *dstate, cache)
        return dx, (dh0, dc0), dparams


class GRUCell(_Cell):
    """One GRU step, as torch.nn.GRUCell: h -> h'."""

    gates = 3

    def _step(self, x, state):
        _, h, cache = F.gru_forward(x, state[0], *self._params())
        return (h,), cache

    def _step_backward(self, dout, dstate, cache):
        dx, dh0, dparams = F.gru_backward(dout, dstate[0], cache)
        return dx, (dh0,), dparams


class RNNCell(_Cell):
    """One Elman RNN step with tanh or relu, as torch.nn.RNNCell: h -> h'."""

    def __init__(self, input_size, hidden_size, nonlinearity="tanh", dtype=np.float32, rng=None, bias=True):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, dtype, rng, bias)

    def _step(self, x, state):
        _, h, cache = F.rnn_forward(x, state[0], *self._params(), self.nonlinearity)
        return (h,), cache

    def _step_backward(self, dout, dstate, cache):
        dx, dh0, dparams = F.rnn_backward(dout, dstate[0], cache)
        return dx, (dh0,), dparams

    def extra_repr(self):
        return super().extra_repr() + f", nonlinearity={self.nonlinearity!r}"


# ---------------------------------------------------------------------------------------------
# Embedding, Linear, Dropout, CrossEntropyLoss.


class Embedding(Module):
    """A table of V vectors of size E, looked up by integer index; weight (V, E) ~ N(0, 1)."""

    def __init__(self, num_embeddings, embedding_dim, dtype=np.float32, rng=None):
        super().__init__(dtype)
        rng = rng if rng is not None else np.random.default_rng()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.add_param("weight", rng.standard_normal((num_embeddings, embedding_dim)))
        self._cache = None

    def forward(self, idx):
        """idx: integers of any shape S, each in [0, V) -> out (*S, E)."""
        out, self._cache = F.embedding_forward(self._checked(idx), self.params["weight"])
        return out

    def backward(self, dout):
        self.grads["weight"] += F.embedding_backward(np.asarray(dout, self.dtype), self._cache)

    def lookup(self, idx):
        """idx (T, N), checked as forward checks it -> F.Lookup: the rows not gathered, for a first
        recurrent layer to fold in. The gradient of the weight comes back from that layer's backward."""
        return F.Lookup(self.params["weight"], self._checked(idx))

    def _checked(self, idx):
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise ValueError(f"Embedding takes integer indices, got {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_embeddings):
            raise ValueError(f"index out of range [0, {self.num_embeddings})")
        return idx


class Linear(Module):
    """out = x W^T + b; weight (O, I) and bias (O,) uniform in +-1/sqrt(I) as in PyTorch."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None):
        super().__init__(dtype)
        rng = rng if rng is not None else np.random.default_rng()
        self.in_features, self.out_features = in_features, out_features
        k = 1 / math.sqrt(in_features)
        self.add_param("weight", rng.uniform(-k, k, (out_features, in_features)))
        if bias:
            self.add_param("bias", rng.uniform(-k, k, (out_features,)))
        self._cache = None

    def forward(self, x):
        """x (..., I) -> out (..., O)."""
        out, self._cache = F.linear_forward(np.asarray(x, self.dtype), self.params["weight"],
                                            self.params.get("bias"))
        return out

    def backward(self, dout):
        """dout (..., O) -> dx (..., I); the weight and bias gradients add up in .grads."""
        dx, dweight, dbias = F.linear_backward(np.asarray(dout, self.dtype), self._cache)
        self.grads["weight"] += dweight
        if dbias is not None:
            self.grads["bias"] += dbias
        return dx


class Dropout(Module):
    """Inverted dropout with probability p, active only in train() mode."""

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be between 0 and 1, got {p!r}")
        self.p = p
        self.rng = rng if rng is not None else np.random.default_rng()
        self._mask = None

    def forward(self, x):
        x = np.asarray(x)
        if not self.training or self.p == 0:
            self._mask = None
            return x
        self._mask = F.dropout_mask(x.shape, self.p, self.rng, x.dtype)
        return x * self._mask

    def backward(self, dout):
        return dout if self._mask is None else dout * self._mask


class CrossEntropyLoss(Module):
    """Mean cross-entropy of logits (..., V) against integer targets (...), ignoring ignore_index."""

    def __init__(self, ignore_index=None):
        super().__init__()
        self.ignore_index = ignore_index
        self._cache = None

    def forward(self, logits, targets):
        logits = np.asarray(logits)
        if logits.dtype.kind != "f":
            logits = logits.astype(np.float64)
        targets = np.asarray(targets)
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"targets of shape {targets.shape} do not fit logits of shape {logits.shape}")
        kept = targets if self.ignore_index is None else targets[targets != self.ignore_index]
        if kept.size and (kept.min() < 0 or kept.max() >= logits.shape[-1]):
            raise ValueError(f"targets must lie in [0, {logits.shape[-1]}) or equal ignore_index")
        loss, self._cache = F.cross_entropy_forward(logits, targets, self.ignore_index)
        return loss[()]

    def backward(self, dloss=1.0):
        """-> dlogits of the logits' shape (the gradient of dloss * loss)."""
        return F.cross_entropy_backward(self._cache, dloss)
