"""The language model: embedding -> stacked recurrent layers -> dropout -> linear decoder.

Shapes: T time, N batch (streams), V vocabulary, E embedding size, H hidden, L layers.
"""

import dataclasses
import os
import sys

import numpy as np

from nanolstm import checkpoint
from nanolstm import functional as F
from nanolstm.data import Vocab
from nanolstm.errors import CheckpointError, NanolstmError
from nanolstm.nn import GRU, LSTM, RNN, Dropout, Embedding, Linear, Module
from nanolstm.sample import check_sampling, next_tokens, plain_draw

RECURRENT = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # G: gate blocks per hidden unit
WARM_BY_STEPS = 16  # generate warms the state on a prime of up to this many tokens step by step
CALL_STEPS = 32  # tokens a call of the compiled sampling loop draws (model.compiled_sampler)


def physical_memory():
    """The machine's memory in bytes, or None where the system does not say (no sysconf: Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@dataclasses.dataclass
class ModelConfig:
    """The architecture: what a checkpoint must know to rebuild the model."""

    vocab_size: int
    model: str = "lstm"
    num_layers: int = 2
    hidden_size: int = 256
    embedding_size: int = 64
    dropout: float = 0.0

    def validate(self):
        if self.model not in RECURRENT:
            raise NanolstmError(f"unknown model {self.model!r}: use lstm, gru or rnn")
        for name in ("vocab_size", "num_layers", "hidden_size", "embedding_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise NanolstmError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
                and 0 <= self.dropout < 1):
            raise NanolstmError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def num_parameters(self):
        """The parameter count, by arithmetic alone: it sizes a model before any array is made."""
        G, H, E, V = GATES[self.model], self.hidden_size, self.embedding_size, self.vocab_size
        return V * E + G * H * (E + H + 2) + (self.num_layers - 1) * G * H * (2 * H + 2) + H * V + V

    def parameter_shapes(self):
        """Every parameter's shape under its state_dict name, without making the arrays."""
        G, H, E, V = GATES[self.model], self.hidden_size, self.embedding_size, self.vocab_size
        shapes = {"embedding.weight": (V, E)}
        for layer in range(self.num_layers):
            shapes.update({f"rnn.weight_ih_l{layer}": (G * H, E if layer == 0 else H),
                           f"rnn.weight_hh_l{layer}": (G * H, H),
                           f"rnn.bias_ih_l{layer}": (G * H,), f"rnn.bias_hh_l{layer}": (G * H,)})
        shapes.update({"decoder.weight": (V, H), "decoder.bias": (V,)})
        return shapes


class LanguageModel(Module):
    """Predicts the next token of each of N streams, given the tokens so far.

    >>> model = LanguageModel(ModelConfig(vocab_size=len(vocab)), vocab, seed=0)
    >>> logits, state = model.forward(x)       # x (T, N) token ids -> logits (T, N, V)
    >>> model.backward(dlogits)                # gradients add up in model.named_grads()
    """

    def __init__(self, config, vocab=None, seed=None, dtype=np.float32):
        super().__init__(dtype)
        config.validate()
        self.config, self.vocab = config, vocab
        # one generator for initialisation and every dropout mask, so a seed fixes the whole run
        self.rng = np.random.default_rng(seed)
        c = config
        self.children = {
            "embedding": Embedding(c.vocab_size, c.embedding_size, dtype, self.rng),
            "rnn": RECURRENT[c.model](c.embedding_size, c.hidden_size, num_layers=c.num_layers,
                                      dropout=c.dropout, dtype=dtype, rng=self.rng),
            "decoder": Linear(c.hidden_size, c.vocab_size, dtype=dtype, rng=self.rng),
        }
        self.embedding, self.rnn, self.decoder = (self.children[k] for k in ("embedding", "rnn", "decoder"))
        self.drop = Dropout(c.dropout, rng=self.rng)
        self.children["drop"] = self.drop

    def forward(self, x, state=None):
        """x (T, N) token ids; state from the previous call or None -> logits (T, N, V), state.

        With a small vocabulary the embedding is folded into the first layer's input product
        (functional.Lookup): the product over the V rows of the embedding, not the T*N of the batch.
        """
        x = np.asarray(x)
        self._folded = x.ndim == 2 and F.fold_lookup(self.config.vocab_size, x.size)
        e = self.embedding.lookup(x) if self._folded else self.embedding.forward(x)  # (T, N, E)
        out, state = self.rnn.forward(e, state)  # (T, N, H)
        logits = self.decoder.forward(self.drop.forward(out))  # (T, N, V)
        return logits, state

    def backward(self, dlogits):
        """dlogits (T, N, V): the reverse of forward, layer by layer."""
        dout = self.drop.backward(self.decoder.backward(dlogits))
        de, _ = self.rnn.backward(dout)
        if self._folded:
            self.embedding.grads["weight"] += de  # (V, E), summed by token in the first layer
        else:
            self.embedding.backward(de)

    # -----------------------------------------------------------------------------------------
    # Generation

    def input_table(self):
        """(V, G*H): every token's first-layer input pre-activation, embedding @ W_ih0^T plus the
        biases that fold in. Generation then starts each step with a row lookup, not a product."""
        rnn = self.rnn
        w_ih, _, b_ih, b_hh = rnn.layer_params(0)
        return self.embedding.params["weight"] @ w_ih.T + self._folded_bias(b_ih, b_hh)

    def _folded_bias(self, b_ih, b_hh):
        """The biases that add to the input side: all of both, except the GRU's b_hn (inside r * ...)."""
        return F.gru_input_bias(b_ih, b_hh) if self.config.model == "gru" else b_ih + b_hh

    def step_weights(self, streams):
        """What step() needs for `streams` streams, prepared once for many steps (valid until the
        parameters change): "table", input_table(); "layers", per layer (the product by W_ih, None
        for the first layer; the product by W_hh; the folded input-side bias; b_hh); "decoder",
        (the product by its weight, its bias). Each product is functional.loop_product's: the
        weight packed once for the compiled kernel, or transposed for the BLAS.
        """
        layers = []
        for layer in range(self.rnn.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.rnn.layer_params(layer)
            layers.append((None if layer == 0 else F.loop_product(w_ih, streams), F.loop_product(w_hh, streams),
                           self._folded_bias(b_ih, b_hh), b_hh))
        dec = self.decoder.params
        return {"table": self.input_table(), "layers": layers,
                "decoder": (F.loop_product(dec["weight"], streams), dec["bias"])}

    def step(self, tokens, state, weights=None):
        """One step of inference, without dropout and without a cache for backward.

        tokens (N,) ids; state as forward returns it (not None) -> logits (N, V), next state.
        weights: step_weights(N), if the caller prepared them once for many steps.
        """
        kind = self.config.model
        weights = self.step_weights(len(tokens)) if weights is None else weights
        hs = state[0] if kind == "lstm" else state
        cs = state[1] if kind == "lstm" else None
        new_h, new_c = np.empty_like(hs), (np.empty_like(cs) if cs is not None else None)
        x = None
        for layer, (times_w_ih_t, times_w_hh_t, bias, b_hh) in enumerate(weights["layers"]):
            if layer == 0:
                a = weights["table"][tokens]  # (N, G*H): a row lookup instead of a product
            else:
                a = times_w_ih_t(x)
                a += bias
            if kind == "lstm":
                F.lstm_step(a, hs[layer], cs[layer], times_w_hh_t, new_h[layer], new_c[layer])
            elif kind == "gru":
                F.gru_step(a, hs[layer], times_w_hh_t, b_hh, new_h[layer])
            else:
                new_h[layer] = F.rnn_step(a, hs[layer], times_w_hh_t, self.rnn.nonlinearity)
            x = new_h[layer]
        times_w_dec_t, b_dec = weights["decoder"]
        logits = times_w_dec_t(x)
        logits += b_dec  # (N, V)
        return logits, ((new_h, new_c) if kind == "lstm" else new_h)

    def compiled_sampler(self, logits, state, temperature=1.0, top_k=None, top_p=None, argmax=False):
        """generate's steps and draws as one compiled loop (fused.sample), or None where there is none:
        without numba or its packed products, for the plain RNN, in float64, and for top-k, top-p and
        argmax, which next_tokens draws with NumPy.

        From logits (N, V) (None if prime has rows) and state, returns run(prime, out, rng, on_token):
        it steps on each row of prime (P, N) token ids, then draws each row of out (T, N) with rng and
        steps on it, calling on_token(t) after each draw if given. The tokens are generate's own
        (the same kernels on the same numbers: see fused.py); the steps between them are not Python.
        """
        kind, V = self.config.model, self.config.vocab_size
        loop = F._compiled.get("sample") if F._compiled.get("packed_loops") else None
        if loop is None or kind == "rnn" or self.dtype != np.float32 or not plain_draw(V, top_k, top_p, argmax):
            return None
        pack, pack_stack = F._compiled["pack"], F._compiled["pack_stack"]
        L, H = self.rnn.num_layers, self.config.hidden_size
        params = [self.rnn.layer_params(layer) for layer in range(L)]
        bias = np.zeros((L - 1, GATES[kind] * H), self.dtype)  # the input side's, above the first layer
        for layer in range(1, L):
            bias[layer - 1] = self._folded_bias(params[layer][2], params[layer][3])
        h, c = (state if kind == "lstm" else (state, np.empty((0, 0, 0), self.dtype)))
        b_hn = np.array([p[3][2 * H:] for p in params]) if kind == "gru" else np.empty((0, 0), self.dtype)
        N = h.shape[1]
        args = (self.input_table(), pack_stack([p[0] for p in params[1:]]), bias,
                pack_stack([p[1] for p in params]), np.ascontiguousarray(c), b_hn,
                pack(self.decoder.params["weight"]), self.decoder.params["bias"], np.ascontiguousarray(h),
                np.empty((N, V), self.dtype) if logits is None else np.array(logits, self.dtype))
        temperature = float(temperature)

        def run(prime, out, rng, on_token=None):
            if len(prime):
                loop(*args, np.ascontiguousarray(prime, np.int64), len(prime), temperature, np.empty((0, N)))
            u = rng.random(out.shape)  # the numbers next_tokens would take, N at each step
            # CALL_STEPS tokens a call, one when streaming: Python answers Ctrl-C between calls
            steps = CALL_STEPS if on_token is None else 1
            for t in range(0, len(out), steps):
                loop(*args, out[t : t + steps], 0, temperature, u[t : t + steps])
                if on_token is not None:
                    on_token(t)

        return run

    def generate(self, prime="", length=200, temperature=1.0, top_k=None, top_p=None, argmax=False,
                 seed=None, num_samples=1, unknown="error", on_text=None):
        """Generate num_samples texts of `length` new tokens each, after warming the state on a line
        break (when the vocabulary has one) and then on prime.

        Returns a list of num_samples strings, the prime not included but spaced so that prime + text
        reads right (a word model's sample starts with a space where one belongs). on_text, if given,
        is called with each new piece of text of the first sample as soon as it is drawn, for streaming.
        unknown="skip" drops prime characters (or words) the vocabulary lacks instead of refusing.
        """
        vocab = self.vocab
        if vocab is None:
            raise NanolstmError("this model has no vocabulary to generate text with")
        check_sampling(temperature, top_k, top_p, len(vocab))
        if length < 0 or num_samples < 1:
            raise NanolstmError("--length must be >= 0 and --num-samples >= 1")
        if seed is not None and not (isinstance(seed, (int, np.integer)) and seed >= 0):
            raise NanolstmError(f"--seed must be an integer >= 0, got {seed!r}")
        if unknown not in ("error", "skip"):
            raise NanolstmError(f"unknown must be 'error' or 'skip', got {unknown!r}")
        prime = self.usable_prime(prime, unknown)
        ids = vocab.encode(prime) if prime else np.zeros(0, np.int64)
        # a word's spacing depends on the word before it: decode after the prime's last word, then cut
        # that word off again
        context = ids[-1:] if vocab.level == "word" and prime and not prime[-1].isspace() else ids[:0]
        skip = len(vocab.decode(context))

        def decode(seq):
            return vocab.decode(np.concatenate([context, seq]))[skip:]

        emitted = ""

        def piece(t):
            """The new text of the first sample once out[t] is drawn, for on_text: a character is its
            own text; a word's spacing depends on the words before it."""
            nonlocal emitted
            if vocab.level == "char":
                return vocab.tokens[out[t, 0]]
            text = decode(out[: t + 1, 0])
            new, emitted = text[len(emitted):], text
            return new

        # The state starts at zero and is warmed on a line break, then on the prime. A model trained
        # with its state carried from batch to batch has met a zero state only in its first steps;
        # from it, a prime that opens mid-line (a name in capitals, say) can derail the sample into
        # noise, while the start of a line is familiar ground (README, "Training").
        start = vocab.index.get("\n")
        if start is not None:
            ids = np.concatenate([[start], ids])
        elif len(ids) == 0:  # no prime and no line break: start from the first token
            ids = np.array([0])
        self._check_generation_memory(length, num_samples, len(ids))
        rng = np.random.default_rng(seed)
        was_training = self.training
        self.eval()
        try:
            try:
                out = np.empty((length, num_samples), np.int64)
            except (ValueError, OverflowError):  # more than any memory could hold (else MemoryError)
                raise NanolstmError(f"--length {length:,} is too large to generate; ask for fewer tokens") from None
            prime = np.repeat(np.asarray(ids)[:, None], num_samples, axis=1)  # (P, N)
            if len(prime) > WARM_BY_STEPS:  # the whole prime in one pass: products over all its steps
                logits, state = self.forward(prime)
                logits, prime = logits[-1], prime[:0]
            else:  # a few tokens: a step for each, cheaper than forward's setting up
                logits, state = None, self.rnn.zero_state(num_samples)
            sampler = self.compiled_sampler(logits, state, temperature, top_k, top_p, argmax)
            if sampler is not None:
                sampler(prime, out, rng, None if on_text is None else lambda t: on_text(piece(t)))
            else:
                weights = self.step_weights(num_samples)
                for tokens in prime:
                    logits, state = self.step(tokens, state, weights)
                for t in range(length):
                    out[t] = next_tokens(logits, rng, temperature, top_k, top_p, argmax)  # (N,)
                    if on_text is not None:
                        on_text(piece(t))
                    logits, state = self.step(out[t], state, weights)
        finally:
            self.train(was_training)
        return [decode(out[:, n]) for n in range(num_samples)]

    def usable_prime(self, prime, unknown="error"):
        """prime as generate reads it. Unknown words have <unk>, and a word model keeps them; unknown
        characters have nothing to stand for them: refused (unknown="error") or dropped ("skip")."""
        missing = self.vocab.missing(prime) if prime and self.vocab.unk_id is None else []
        if missing and unknown == "error":
            shown = " ".join(repr(m) for m in missing[:10])
            raise NanolstmError(f"the prime text has {len(missing)} character(s) the vocabulary lacks: "
                                f"{shown}; change the prime or pass --unknown skip")
        return "".join(ch for ch in prime if ch in self.vocab.index) if missing else prime

    def _check_generation_memory(self, length, num_samples, prime_tokens):
        """Refuse, before anything is allocated, a generation that cannot fit in the machine's memory.
        NumPy hands out such arrays without complaint and the kernel maps their pages only as they are
        written, so the process would not get a MemoryError but be killed, without a word, when the
        memory ran out. Counted: the tokens drawn, and each stream's activations and logits of a step
        (of the whole prime, where forward warms the state on it); a lower bound, so never a refusal
        of what fits."""
        c = self.config
        per_token = c.num_layers * (GATES[c.model] + 3) * c.hidden_size + c.vocab_size
        steps = prime_tokens if prime_tokens > WARM_BY_STEPS else 1
        need = num_samples * (8 * length + self.dtype.itemsize * steps * per_token)
        have = physical_memory()
        if have is not None and need > have:
            raise NanolstmError(f"{num_samples:,} sample(s) of {length:,} tokens need at least "
                                f"{need / 2**30:,.1f} GiB, more than this machine's {have / 2**30:,.1f} GiB; "
                                "ask for fewer --num-samples or a shorter --length or --prime")

    # -----------------------------------------------------------------------------------------
    # Checkpoints: arrays under "model." and the configuration and vocabulary as JSON

    def checkpoint_parts(self):
        arrays = {f"model.{k}": v for k, v in self.state_dict().items()}
        meta = {"model_config": dataclasses.asdict(self.config), "dtype": self.dtype.name,
                "vocab": self.vocab.to_json() if self.vocab is not None else None}
        return arrays, meta

    @classmethod
    def from_checkpoint_parts(cls, arrays, meta, where="checkpoint"):
        """The model that arrays and meta describe. The configuration is checked against the arrays
        before anything is built, so forged sizes cannot make a model larger than the file."""
        try:
            config = ModelConfig(**meta["model_config"])
            config.validate()
            vocab = Vocab.from_json(meta["vocab"]) if meta.get("vocab") is not None else None
            dtype = meta.get("dtype", "float32")
            if dtype not in ("float32", "float64"):
                raise ValueError(f"dtype {dtype!r} is not float32 or float64")
            weights = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
            check_fits(config, weights)
            if not all(np.isfinite(v).all() for v in weights.values()):
                raise ValueError("the weights are not all finite")
            model = cls(config, vocab, dtype=np.dtype(dtype))
            model.load_state_dict(weights)
        except (KeyError, TypeError, ValueError, NanolstmError) as e:
            raise CheckpointError(f"{where}: not a valid nanolstm model ({str(e).splitlines()[0]})") from None
        if vocab is not None and len(vocab) != config.vocab_size:
            raise CheckpointError(f"{where}: vocabulary of {len(vocab)} does not fit the model's {config.vocab_size}")
        return model

    def save(self, path):
        arrays, meta = self.checkpoint_parts()
        checkpoint.save(path, arrays, meta)

    @classmethod
    def load(cls, path):
        """A model from a checkpoint file written by save() or by the trainer."""
        arrays, meta = checkpoint.load(path)
        return cls.from_checkpoint_parts(arrays, meta, where=str(path))


def check_fits(config, weights):
    """Raise ValueError unless weights (state_dict name -> array) has exactly config's shapes.

    Counts first: a forged num_layers of 10**9 is refused without listing 10**9 layers."""
    if 4 * config.num_layers + 3 != len(weights):
        raise ValueError(f"{len(weights)} weight arrays, where {config.num_layers} layers have "
                         f"{4 * config.num_layers + 3}")
    total = sum(np.size(v) for v in weights.values())
    if config.num_parameters() != total:
        raise ValueError(f"{total:,} weights, where the configuration has {config.num_parameters():,}")
    shapes = config.parameter_shapes()
    wrong = [k for k in shapes if k not in weights or np.shape(weights[k]) != shapes[k]]
    if wrong:
        raise ValueError(f"the arrays do not fit the configuration: {', '.join(wrong[:3])}")


def stream_to_stdout(text):
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:  # a lone surrogate from the command line, or a terminal without the glyph
        enc = sys.stdout.encoding or "utf-8"
        sys.stdout.write(text.encode(enc, "backslashreplace").decode(enc))
    sys.stdout.flush()
