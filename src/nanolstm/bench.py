"""`nanolstm bench`: speed and memory, side by side with PyTorch, on this machine.

What it measures (each number in its own child process, so that the peak resident set, the
`ru_maxrss` of that process, belongs to that measurement alone):

- training throughput in tokens/s: forward, cross-entropy, backward, clipping to global norm 5 and an
  Adam step, in float32, as `nanolstm.train` does it; embedding 64, vocabulary 84, the state carried
  from batch to batch. The token ids are uniform random numbers: the speed does not depend on them.
  The same model in PyTorch: nn.Embedding + nn.LSTM/nn.GRU + nn.Linear, torch.optim.Adam and
  clip_grad_norm_, each with its defaults (threads too);
- generation in characters/s of a 2x512 LSTM, one token at a time with sampling, 1 and 32 streams;
  PyTorch's two step-by-step paths (an nn.LSTMCell per layer, and nn.LSTM called on one step);
- the float32 matrix-multiply peak of NumPy's BLAS (the median of a process's products, as training's
  figures are medians of steps), and each training figure as GFLOP/s and as a share of it. Training
  FLOPs per token: 3 * 2*(D_l + H)*G*H per layer l (D_0 = the embedding size, then H; G = 4 gates
  for the LSTM, 3 for the GRU) plus 6*H*V for the decoder;
- which BLAS ran and with which kernel (threadpoolctl), in two environments: "default", the BLAS as a
  user's machine has it (OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed), and "haswell", with
  OPENBLAS_CORETYPE=Haswell forced. PyTorch runs in both, and every ratio compares runs of one
  environment;
- the cost of data: encoding a 100 MB corpus with `encode_chars` (time, and peak memory beside the
  encoded array), and training tokens/s on a 1 MB and a 100 MB corpus through `Batches`;
- a baseline in the style of the tutorials (`TutorialLSTM` below), to say how many times faster
  nanolstm is.

Throughput is the median over the timed steps of a process, after warm-up steps (which also compile
numba's kernels or load them from its cache): the median resists short bursts of noise. Longer slow
spells of a shared (virtual) machine, which change a figure by a third from one minute to the next,
are met by rounds: each measurement runs in --rounds processes, ours and PyTorch's taking turns, and
the fastest process of each side counts, every run's figure kept in the JSON. The table's "by round"
column shows the spread: the median and range of the ratio of each round's two processes, which ran
one after the other.

Shapes: T time, N batch (streams), E embedding, H hidden, L layers, V vocabulary, G gates per unit.
"""

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nanolstm.errors import NanolstmError
from nanolstm.outdir import write_atomic

V = 84  # the vocabulary of ../shared/data/shakespeare.txt
E = 64  # embedding size, ours and PyTorch's
CLIP = 5.0
LR = 2e-3
PARTS = ("train", "generate", "data", "baseline")
MODELS = ("lstm", "gru")

# (layers, hidden, T, N) per configuration. --quick is a smoke test of the benchmark itself, not a
# measurement: one tiny two-layer configuration, since every configuration runs the same code, and
# PyTorch's start-up (about 3 s a process) would otherwise dominate.
TRAIN_CONFIGS = {"a": (1, 128, 64, 32), "b": (2, 256, 100, 32), "c": (2, 512, 100, 64),
                 "d": (3, 512, 128, 64)}
QUICK_TRAIN_CONFIGS = {"a": (2, 32, 16, 4)}
FULL = {"train": TRAIN_CONFIGS, "steps": 20, "warmup": 3,
        "peak": {"n": 2048, "reps": 20},
        "generate": {"layers": 2, "hidden": 512, "streams": (1, 32), "length": 300, "repeats": 3},
        "data": {"encode_chars": 100_000_000, "train_chars": (1_000_000, 100_000_000),
                 "layers": 1, "hidden": 128, "T": 64, "N": 32},
        "baseline": {"hidden": 128, "T": 64, "sequences": 20, "warmup": 2},
        "timeout": 1800}
QUICK = {"train": QUICK_TRAIN_CONFIGS, "steps": 2, "warmup": 1,
         "peak": {"n": 512, "reps": 3},
         "generate": {"layers": 2, "hidden": 64, "streams": (1, 32), "length": 20, "repeats": 1},
         "data": {"encode_chars": 4_000_000, "train_chars": (1_000_000, 4_000_000),
                  "layers": 1, "hidden": 32, "T": 16, "N": 4},
         "baseline": {"hidden": 32, "T": 16, "sequences": 2, "warmup": 1},
         "timeout": 300}

BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
SHOWN_VARS = BLAS_VARS + ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def train_flops_per_token(model, layers, hidden, embedding=E, vocab=V):
    """FLOPs of one token's forward and backward: three times the forward's products."""
    G = {"lstm": 4, "gru": 3}[model]
    total = 0
    for layer in range(layers):
        D = embedding if layer == 0 else hidden
        total += 3 * 2 * (D + hidden) * G * hidden
    return total + 6 * hidden * vocab


# ---------------------------------------------------------------------------------------------
# Measurements. Each runs inside a child process (`python -m nanolstm.bench --worker SPEC`) and
# returns a dict; the worker adds the process's peak resident set and the BLAS it loaded.


def _median_throughput(times, items_per_step):
    med = statistics.median(times)
    return {"timed_steps": len(times), "median_step_s": med, "min_step_s": min(times),
            "total_s": sum(times), "per_s": items_per_step / med,
            "per_s_mean": items_per_step * len(times) / sum(times)}


def _timed(step, warmup, steps):
    """The seconds of each of `steps` calls of step() after `warmup` more, and the minor page faults
    (memory the kernel hands over as it is first touched) a timed call."""
    for _ in range(warmup):
        step()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / max(steps, 1)


def _random_batches(T, N, count=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, V, (count, T, N), dtype=np.int32),
            rng.integers(0, V, (count, T, N), dtype=np.int32))


def measure_peak(spec, info):
    """spec["reps"] float32 (n, n) @ (n, n) products, timed one by one after one more, in GFLOP/s:
    their median, the statistic of the training figures that are shown as shares of it (the median
    of a process's steps), and beside it the fastest single product. On a machine whose cores are
    shared with other guests a product taken in a quiet moment can run half as fast again as the
    median: a share of that burst would compare two different machines."""
    n = spec["n"]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    times, _ = _timed(lambda: np.matmul(a, b, out=c), 1, spec["reps"])  # the first wakes the threads
    out = _median_throughput(times, 2 * n**3)
    return {"n": n, "dtype": "float32", "reps": len(times), "median_s": out["median_step_s"],
            "best_s": out["min_step_s"], "gflops": out["per_s"] / 1e9,
            "gflops_best": 2 * n**3 / out["min_step_s"] / 1e9}


def _ours_setup(spec):
    """Choose nanolstm's cells: numba's fused ones if asked for and available, else NumPy's; and say
    whether the time loops' products are numba's on packed weights (functional.loop_product), and with
    them the LSTM's and GRU's whole time loops (functional._loop); and whether the input side's
    products over all steps are too (functional.product: on Zen 4, and where OpenBLAS's kernel is
    narrower than the CPU's vectors)."""
    from nanolstm import functional

    fused = functional.use_numba(spec.get("numba", True))
    return {"fused": fused, "packed": bool(functional._compiled.get("packed_loops")),
            "packed_products": bool(functional._compiled.get("packed_products"))}


def _timed_training(model, batch, spec):
    """Time train.py's step (forward, loss, backward, clip, Adam) on `model`, step i on batch(i);
    the median of spec["steps"] timed steps after spec["warmup"], as tokens/s."""
    from nanolstm import optim
    from nanolstm.functional import cross_entropy_backward, cross_entropy_forward

    params, grads = model.state_dict(), model.named_grads()
    opt = optim.Adam(params, grads, lr=LR)
    run = {"i": 0, "state": None}

    def step():
        x, y = batch(run["i"])
        model.zero_grad()
        logits, new_state = model.forward(x, run["state"])
        loss, cache = cross_entropy_forward(logits, y)
        model.backward(cross_entropy_backward(cache))
        optim.clip_grad_norm(grads, CLIP)
        float(loss)
        opt.step()
        run["state"], run["i"] = new_state, run["i"] + 1

    times, faults = _timed(step, spec["warmup"], spec["steps"])
    out = _median_throughput(times, spec["T"] * spec["N"])
    out["page_faults_per_step"] = faults
    out["tokens_per_s"] = out.pop("per_s")
    return out


def measure_train_ours(spec, info):
    from nanolstm.model import LanguageModel, ModelConfig

    config = ModelConfig(vocab_size=V, model=spec["model"], num_layers=spec["layers"],
                         hidden_size=spec["hidden"], embedding_size=E)
    model = LanguageModel(config, seed=0, dtype=np.float32)
    xs, ys = _random_batches(spec["T"], spec["N"])
    return _timed_training(model, lambda i: (xs[i % len(xs)], ys[i % len(xs)]), spec)


def _torch_info():
    import torch

    return {"threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def measure_train_torch(spec, info):
    import torch
    from torch import nn

    info["torch"] = _torch_info()
    torch.manual_seed(0)
    T, N = spec["T"], spec["N"]
    rnn_class = {"lstm": nn.LSTM, "gru": nn.GRU}[spec["model"]]
    emb = nn.Embedding(V, E)
    rnn = rnn_class(E, spec["hidden"], num_layers=spec["layers"])
    dec = nn.Linear(spec["hidden"], V)
    params = [*emb.parameters(), *rnn.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=LR)
    xs, ys = (torch.from_numpy(a.astype(np.int64)) for a in _random_batches(T, N))
    run = {"k": 0, "state": None}

    def step():
        k = run["k"] % len(xs)
        opt.zero_grad()
        out, new_state = rnn(emb(xs[k]), run["state"])
        logits = dec(out)
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), ys[k].reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(params, CLIP)
        loss.item()
        opt.step()
        if isinstance(new_state, tuple):  # the LSTM's (h, c); the GRU's h
            run["state"] = tuple(s.detach() for s in new_state)
        else:
            run["state"] = new_state.detach()
        run["k"] += 1

    times, faults = _timed(step, spec["warmup"], spec["steps"])
    out = _median_throughput(times, T * N)
    out["tokens_per_s"] = out.pop("per_s")
    out["page_faults_per_step"] = faults
    return out


def _best_of(generate, warmup_length, length, repeats, streams):
    generate(warmup_length)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(length)
        times.append(time.perf_counter() - t0)
    return {"length": length, "streams": streams, "repeats": repeats, "best_s": min(times),
            "chars_per_s": streams * length / min(times),
            "all_chars_per_s": [streams * length / t for t in times]}


def measure_generate_ours(spec, info):
    from nanolstm.data import Vocab
    from nanolstm.model import LanguageModel, ModelConfig

    vocab = Vocab("char", ["\n"] + [chr(c) for c in range(32, 32 + V - 1)])
    config = ModelConfig(vocab_size=V, model="lstm", num_layers=spec["layers"], hidden_size=spec["hidden"],
                         embedding_size=E)
    model = LanguageModel(config, vocab, seed=0, dtype=np.float32)
    N = spec["streams"]

    def generate(length):
        model.generate(length=length, num_samples=N, temperature=1.0, seed=0)

    return _best_of(generate, 10, spec["length"], spec["repeats"], N)


def measure_generate_torch(spec, info):
    """PyTorch, step by step under no_grad: an nn.LSTMCell per layer ("cell"), or nn.LSTM on one
    step with the state carried ("lstm"); softmax and torch.multinomial draw each token."""
    import torch
    from torch import nn

    info["torch"] = _torch_info()
    torch.manual_seed(0)
    L, H, N = spec["layers"], spec["hidden"], spec["streams"]
    emb, dec = nn.Embedding(V, E), nn.Linear(H, V)
    if spec["path"] == "cell":
        cells = [nn.LSTMCell(E if layer == 0 else H, H) for layer in range(L)]

        def step(inp, state):  # state: one (h, c) per layer, None for zeros
            new = []
            for cell, hc in zip(cells, state):
                h, c = cell(inp, hc)
                new.append((h, c))
                inp = h
            return inp, new
    else:
        lstm = nn.LSTM(E, H, num_layers=L)

        def step(inp, state):  # state: (h, c) of shape (L, N, H), None for zeros
            out, state = lstm(inp[None], state)
            return out[0], state

    def generate(length, temperature=1.0):
        with torch.no_grad():
            x = torch.zeros(N, dtype=torch.long)
            out = torch.empty(length, N, dtype=torch.long)
            state = [None] * L if spec["path"] == "cell" else None
            for t in range(length):
                h, state = step(emb(x), state)  # (N, H)
                p = torch.softmax(dec(h) / temperature, dim=-1)  # (N, V)
                x = torch.multinomial(p, 1)[:, 0]
                out[t] = x
        return out

    return _best_of(generate, 10, spec["length"], spec["repeats"], N)


def _shakespeare():
    """../shared/data/shakespeare.txt beside the repository or the working directory, or None."""
    beside_repo = list(Path(__file__).resolve().parents)[3:4]  # src/nanolstm/bench.py -> ../shared
    for base in beside_repo + [Path.cwd().parent, Path.cwd()]:
        if (base / "shared" / "data" / "shakespeare.txt").is_file():
            return base / "shared" / "data" / "shakespeare.txt"
    return None


def _base_text():
    """(text, source): Shakespeare, or 1M random characters among V when it is not there."""
    path = _shakespeare()
    if path is not None:
        return path.read_text(encoding="utf-8"), f"{path.name} repeated"
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(("\n" + "".join(chr(c) for c in range(32, 32 + V - 1))).encode(), np.uint8)
    return alphabet[rng.integers(0, V, 1 << 20)].tobytes().decode("ascii"), "random text"


def _corpus(base, n_chars):
    """base repeated to n_chars characters, built in one allocation of the final size."""
    whole, rest = divmod(n_chars, len(base))
    return "".join([base] * whole + [base[:rest]])


def _rss_now_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak():
    """Reset the kernel's high-water mark of this process's resident set; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure_encode(spec, info):
    from nanolstm.data import encode_chars

    base, source = _base_text()
    text = _corpus(base, spec["chars"])
    del base
    before = _rss_now_mb()
    # the peak from here on, not that of building the text; where the kernel refuses the reset,
    # the process's whole peak: an upper bound
    exact = _reset_peak()
    t0 = time.perf_counter()
    ids, vocab = encode_chars(text)
    seconds = time.perf_counter() - t0
    extra = _peak_mb() - before
    return {"chars": len(text), "source": source, "text_mb": sys.getsizeof(text) / 2**20,
            "vocab": len(vocab), "encode_s": seconds, "encoded_mb": ids.nbytes / 2**20,
            "encoded_dtype": str(ids.dtype), "rss_before_mb": before, "peak_extra_mb": extra,
            "peak_extra_over_encoded": extra / (ids.nbytes / 2**20), "peak_exact": exact}


def measure_data_train(spec, info):
    """Training tokens/s through Batches on a corpus of spec["chars"] characters, the batches drawn
    from all over it."""
    from nanolstm.data import Batches, Vocab, encode_chars
    from nanolstm.model import LanguageModel, ModelConfig

    base, source = _base_text()
    vocab = Vocab.build_chars(base)  # the same vocabulary, so the same model, at every corpus size
    ids, _ = encode_chars(_corpus(base, spec["chars"]), vocab)
    del base
    batches = Batches(ids, spec["N"], spec["T"])
    config = ModelConfig(vocab_size=len(vocab), model="lstm", num_layers=spec["layers"],
                         hidden_size=spec["hidden"], embedding_size=E)
    model = LanguageModel(config, vocab, seed=0)
    order = np.linspace(0, len(batches) - 1, spec["warmup"] + spec["steps"]).astype(int)
    out = _timed_training(model, lambda i: batches[int(order[i])], spec)
    out.update(chars=len(ids), source=source, batches=len(batches), vocab=len(vocab),
               layers=spec["layers"], hidden=spec["hidden"], T=spec["T"], N=spec["N"])
    return out


# ---------------------------------------------------------------------------------------------
# THE BASELINE: an LSTM written the way the tutorials write it (min-char-rnn and its descendants).
# It is here to be measured against, not to be used: batch of one, column vectors, the input as a
# one-hot vector multiplied by a matrix, a separate product for each gate and side, Python per step,
# float64 as in the tutorials, and an Adagrad update once per sequence as in min-char-rnn.


def _sig(x):
    return 1 / (1 + np.exp(-x))


class TutorialLSTM:
    """BASELINE ONLY. One layer of H units over one-hot inputs of V; decoder to V; softmax loss."""

    GATES = "ifgo"

    def __init__(self, vocab_size, hidden_size, seed=0):
        rng = np.random.default_rng(seed)
        Vs, H = vocab_size, hidden_size
        self.p = {}
        for g in self.GATES:
            self.p["Wx" + g] = rng.standard_normal((H, Vs)) * 0.01  # (H, V)
            self.p["Wh" + g] = rng.standard_normal((H, H)) * 0.01  # (H, H)
            self.p["b" + g] = np.zeros((H, 1))
        self.p["Why"] = rng.standard_normal((Vs, H)) * 0.01
        self.p["by"] = np.zeros((Vs, 1))
        self.mem = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.V, self.H = Vs, H

    def loss_and_grads(self, inputs, targets, hprev, cprev):
        """inputs, targets: lists of T token ids; hprev, cprev (H, 1). Returns the summed loss, the
        gradients by parameter name (clipped to +-5 as min-char-rnn does), and the last h and c."""
        p, Vs = self.p, self.V
        xs, hs, cs, gate, ps = {}, {-1: hprev}, {-1: cprev}, {}, {}
        loss = 0.0
        for t in range(len(inputs)):
            xs[t] = np.zeros((Vs, 1))
            xs[t][inputs[t]] = 1
            i = _sig(p["Wxi"] @ xs[t] + p["Whi"] @ hs[t - 1] + p["bi"])
            f = _sig(p["Wxf"] @ xs[t] + p["Whf"] @ hs[t - 1] + p["bf"])
            g = np.tanh(p["Wxg"] @ xs[t] + p["Whg"] @ hs[t - 1] + p["bg"])
            o = _sig(p["Wxo"] @ xs[t] + p["Who"] @ hs[t - 1] + p["bo"])
            cs[t] = f * cs[t - 1] + i * g
            hs[t] = o * np.tanh(cs[t])
            gate[t] = (i, f, g, o)
            y = p["Why"] @ hs[t] + p["by"]
            ps[t] = np.exp(y - y.max()) / np.sum(np.exp(y - y.max()))
            loss += -np.log(ps[t][targets[t], 0])
        d = {k: np.zeros_like(v) for k, v in p.items()}
        dhnext, dcnext = np.zeros_like(hprev), np.zeros_like(cprev)
        for t in reversed(range(len(inputs))):
            i, f, g, o = gate[t]
            dy = ps[t].copy()
            dy[targets[t]] -= 1
            d["Why"] += dy @ hs[t].T
            d["by"] += dy
            dh = p["Why"].T @ dy + dhnext
            tc = np.tanh(cs[t])
            dc = dcnext + dh * o * (1 - tc * tc)
            da = {"i": dc * g * i * (1 - i), "f": dc * cs[t - 1] * f * (1 - f),
                  "g": dc * i * (1 - g * g), "o": dh * tc * o * (1 - o)}
            dhnext = np.zeros_like(hprev)
            for k in self.GATES:
                d["Wx" + k] += da[k] @ xs[t].T
                d["Wh" + k] += da[k] @ hs[t - 1].T
                d["b" + k] += da[k]
                dhnext += p["Wh" + k].T @ da[k]
            dcnext = f * dc
        for v in d.values():
            np.clip(v, -5, 5, out=v)
        return loss, d, hs[len(inputs) - 1], cs[len(inputs) - 1]

    def update(self, d, lr=0.1):
        for k, v in self.p.items():
            self.mem[k] += d[k] * d[k]
            v += -lr * d[k] / np.sqrt(self.mem[k] + 1e-8)


def measure_baseline(spec, info):
    H, T = spec["hidden"], spec["T"]
    model = TutorialLSTM(V, H)
    rng = np.random.default_rng(0)
    data = rng.integers(0, V, T * (spec["warmup"] + spec["sequences"]) + 1).tolist()
    run = {"k": 0, "h": np.zeros((H, 1)), "c": np.zeros((H, 1))}

    def step():
        s = run["k"] * T
        inputs, targets = data[s:s + T], data[s + 1:s + T + 1]
        _, d, run["h"], run["c"] = model.loss_and_grads(inputs, targets, run["h"], run["c"])
        model.update(d)
        run["k"] += 1

    times, _ = _timed(step, spec["warmup"], spec["sequences"])
    out = _median_throughput(times, T)
    out["tokens_per_s"] = out.pop("per_s")
    out.update(hidden=H, T=T, batch=1, dtype="float64", inputs=f"one-hot of {V}, no embedding",
               update="Adagrad once per sequence")
    return out


MEASUREMENTS = {"peak": measure_peak, "train_ours": measure_train_ours, "train_torch": measure_train_torch,
                "generate_ours": measure_generate_ours, "generate_torch": measure_generate_torch,
                "encode": measure_encode, "data_train": measure_data_train, "baseline": measure_baseline}
OURS = {"train_ours", "generate_ours", "data_train"}
# run with the process as the user's environment leaves it: `import nanolstm` (which the worker needs)
# makes none of its thread and malloc settings there
AS_THEY_ARE = {"peak", "train_torch", "generate_torch", "baseline"}


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    keys = ("internal_api", "version", "architecture", "num_threads", "threading_layer", "prefix")
    return [{k: d.get(k) for k in keys} for d in threadpool_info() if d.get("user_api") == "blas"]


def worker(spec):
    """Run one measurement in this process; return its result with the process's resources."""
    import nanolstm

    info = {"kind": spec["kind"]}
    if spec["kind"] in OURS:
        info.update(_ours_setup(spec))
    info["rss_start_mb"] = _rss_now_mb()  # the imports; the peak counts them too, as a user pays them
    t0 = time.perf_counter()
    info.update(MEASUREMENTS[spec["kind"]](spec, info))
    info["wall_s"] = time.perf_counter() - t0
    info["peak_rss_mb"] = _peak_mb()
    info["blas"] = _blas_info()
    info["env"] = {k: os.environ.get(k) for k in SHOWN_VARS + tuple(nanolstm.THREAD_SETTINGS)}
    info["malloc_set"] = nanolstm.MALLOC_SET  # whether `import nanolstm` set malloc's thresholds
    return info


# ---------------------------------------------------------------------------------------------
# The parent: one child process per measurement, then the table and the JSON.


def environments(which):
    """name -> environment for the child processes."""
    import nanolstm

    # not the thread settings that importing nanolstm made: ours set them again, PyTorch's go without
    base = {k: v for k, v in os.environ.items() if nanolstm.THREAD_ENV_SET.get(k) != v}
    src = str(Path(__file__).resolve().parents[1])  # the children import this very nanolstm
    base["PYTHONPATH"] = os.pathsep.join([src] + [p for p in [base.get("PYTHONPATH")] if p])
    envs = {}
    if which in ("default", "both"):
        envs["default"] = {k: v for k, v in base.items() if k not in BLAS_VARS}
    if which in ("haswell", "both"):
        envs["haswell"] = dict(base, OPENBLAS_CORETYPE="Haswell")  # OPENBLAS_L2_SIZE kept if set
    return envs


def measure(kind, spec, env, timeout):
    """Run one measurement in a child process; its result, or {"error": ...}."""
    spec = dict(spec, kind=kind)
    if spec.get("numba") is False:  # the NumPy reference, with the BLAS's threads as NumPy leaves them
        env = dict(env, NANOLSTM_NUMBA="0")
    if kind in AS_THEY_ARE:
        env = dict(env, NANOLSTM_PROCESS_SETTINGS="0")
    cmd = [sys.executable, "-m", "nanolstm.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "spec": spec}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": tail, "spec": spec}
    return json.loads(lines[-1])


def machine_info():
    cpu, cores = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name" and cpu is None:
                    cpu = value
                if key == "cpu cores" and cores is None:
                    cores = int(value)
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"cpu": cpu, "physical_cores": cores, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": version("torch"), "numba": version("numba"),
            "threadpoolctl": version("threadpoolctl"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _ok(r):
    return isinstance(r, dict) and "error" not in r


def _ratio(a, b):
    return a / b if a and b else None


def _speed(r):
    """A result's figure of speed, larger is faster."""
    for key in ("tokens_per_s", "chars_per_s", "gflops"):
        if key in r:
            return r[key]
    return -r["encode_s"]


class Runner:
    """Runs measurements in child processes for one bench run, and keeps the options they share."""

    def __init__(self, args, log):
        self.sizes = QUICK if args.quick else FULL
        self.steps = args.steps if args.steps is not None else self.sizes["steps"]
        self.warmup = self.sizes["warmup"]
        self.numba = not args.no_numba
        self.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
        self.use_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
        self.log = log
        self.failures = []

    def __call__(self, kind, spec, env_name, env, label):
        r = measure(kind, spec, env, self.sizes["timeout"])
        if not _ok(r):
            self.failures.append({"environment": env_name, "what": label, "error": r["error"]})
            self.log(f"  {env_name}: {label}: FAILED: {r['error']}")
            return r
        units = (("tokens_per_s", "tok/s"), ("chars_per_s", "char/s"), ("gflops", "GFLOP/s"),
                 ("encode_s", "s"))
        speed = next((f"{r[k]:,.2f} {unit}" if unit == "s" else f"{r[k]:,.0f} {unit}"
                      for k, unit in units if k in r), "")
        self.log(f"  {env_name}: {label}: {speed}, peak RSS {r['peak_rss_mb']:.0f} MB")
        return r

    def alternate(self, jobs, env_name, env):
        """Run the jobs, (key, kind, spec, label) each, `rounds` times round-robin, so that a slow
        spell of a shared machine falls on every side alike. Per key: the fastest run, whose figures
        are the key's, with the speed of every run under "runs" (None where one failed). Noise only
        ever slows a run down, so the fastest run is the one least disturbed."""
        runs = {key: [] for key, *_ in jobs}
        for k in range(self.rounds):
            for key, kind, spec, label in jobs:
                shown = label if self.rounds == 1 else f"{label} (run {k + 1}/{self.rounds})"
                runs[key].append(self(kind, spec, env_name, env, shown))
        best = {}
        for key, results in runs.items():
            ok = [r for r in results if _ok(r)]
            if not ok:
                best[key] = results[-1]
                continue
            best[key] = dict(max(ok, key=_speed))
            best[key]["runs"] = [_speed(r) if _ok(r) else None for r in results]
        return best

    def cells(self, flags, packed, packed_products):
        if all(flags):
            loops = "loop products " + ("on packed weights" if all(packed) else "by the BLAS")
            return f"numba fused, {loops}, input products " + (
                "on packed weights" if all(packed_products) else "by the BLAS")
        if not self.numba:
            return "NumPy reference (--no-numba)"
        return "NumPy reference (numba or nanolstm.fused not available)"


def train_entry(runner, env_name, env, model, letter, peak_gflops, with_torch=True):
    """Ours (and PyTorch's) training at one configuration, with GFLOP/s and the share of the peak."""
    layers, hidden, T, N = runner.sizes["train"][letter]
    spec = {"model": model, "layers": layers, "hidden": hidden, "T": T, "N": N,
            "steps": runner.steps, "warmup": runner.warmup, "numba": runner.numba}
    flops = train_flops_per_token(model, layers, hidden)
    entry = {"config": {"model": model, "layers": layers, "hidden": hidden, "T": T, "N": N,
                        "embedding": E, "vocab": V},
             "flops_per_token": flops}
    name = f"{model} {letter} {layers}x{hidden} T={T} N={N}"
    jobs = [("ours", "train_ours", spec, name + " ours")]
    if runner.use_torch and with_torch:
        jobs.append(("torch", "train_torch", spec, name + " torch"))
    entry.update(runner.alternate(jobs, env_name, env))
    for who in ("ours", "torch"):
        r = entry.get(who)
        if _ok(r):
            r["gflops"] = r["tokens_per_s"] * flops / 1e9
            r["share_of_peak"] = _ratio(r["gflops"], peak_gflops)
    tps = {who: entry[who]["tokens_per_s"] for who in ("ours", "torch") if _ok(entry.get(who))}
    entry["ours_over_torch"] = _ratio(tps.get("ours"), tps.get("torch"))
    if len(tps) == 2:  # each round's two processes ran one after the other: the spread of their ratio
        entry["ours_over_torch_by_round"] = [_ratio(a, b) for a, b in
                                             zip(entry["ours"]["runs"], entry["torch"]["runs"])]
    return entry


def generate_entry(runner, env_name, env, streams):
    """Ours and PyTorch's two step-by-step paths generating with `streams` streams."""
    g = runner.sizes["generate"]
    spec = {"layers": g["layers"], "hidden": g["hidden"], "streams": streams, "length": g["length"],
            "repeats": g["repeats"], "numba": runner.numba}
    name = f"generate lstm {g['layers']}x{g['hidden']} {streams} stream(s)"
    entry = {"config": {"model": "lstm", "layers": g["layers"], "hidden": g["hidden"], "streams": streams,
                        "embedding": E, "vocab": V}}
    jobs = [("ours", "generate_ours", spec, name + " ours")]
    if runner.use_torch:
        jobs += [(f"torch_{path}", "generate_torch", dict(spec, path=path), f"{name} torch {shown}")
                 for path, shown in (("cell", "nn.LSTMCell"), ("lstm", "nn.LSTM"))]
    entry.update(runner.alternate(jobs, env_name, env))
    if not runner.use_torch:
        return entry
    ran = [(entry[f"torch_{path}"]["chars_per_s"], path) for path in ("cell", "lstm")
           if _ok(entry[f"torch_{path}"])]
    if ran:
        speed, path = max(ran)
        entry["torch_best"] = {"path": path, "chars_per_s": speed,
                               "peak_rss_mb": entry[f"torch_{path}"]["peak_rss_mb"]}
        entry["ours_over_torch"] = _ratio(entry["ours"].get("chars_per_s"), speed)
    else:
        entry["torch_best"], entry["ours_over_torch"] = None, None
    # each round: ours against the faster of PyTorch's two paths in that round, run right after it
    runs = [entry[key].get("runs") or [None] * runner.rounds for key in ("ours", "torch_cell", "torch_lstm")]
    entry["ours_over_torch_by_round"] = [
        _ratio(ours, max((t for t in (cell, lstm) if t is not None), default=None))
        for ours, cell, lstm in zip(*runs)]
    return entry


def collect(args, log):
    """Run every measurement that args asks for; return the results as one JSON-able dict."""
    runner = Runner(args, log)
    only = args.only or PARTS
    sizes = runner.sizes
    result = {
        "command": "nanolstm bench " + " ".join(args.argv_shown),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick, "parts": list(only), "torch": runner.use_torch,
        "machine": machine_info(),
        "method": {"steps": runner.steps, "warmup": runner.warmup, "rounds": runner.rounds,
                   "embedding": E, "vocab": V,
                   "dtype": "float32", "clip_grad_norm": CLIP, "optimizer": f"Adam lr {LR}",
                   "tokens": "uniform random token ids: the speed does not depend on their values",
                   "throughput": "median over the timed steps of one process; the fastest process "
                                 "of the rounds, ours and PyTorch's taking turns",
                   "ours_over_torch_by_round": "training: the ratio of each round's two processes, "
                                               "ours then PyTorch's",
                   "flops_per_token": "sum over layers of 3*2*(D_l+H)*G*H, plus 6*H*V",
                   "peak_rss": "ru_maxrss of a process that made this one measurement, MB = 2**20 bytes"},
        "environments": {},
    }
    envs = environments(args.blas)
    for env_name, env in envs.items():
        log(f"environment {env_name}")
        out = result["environments"][env_name] = {"env": {k: env.get(k) for k in SHOWN_VARS}, "cells": None}
        peak = out["matmul_peak"] = runner.alternate([("peak", "peak", sizes["peak"], "matmul peak")],
                                                     env_name, env)["peak"]
        out["blas"] = peak.get("blas")
        if "train" in only:
            out["train"] = {f"{m}_{k}": train_entry(runner, env_name, env, m, k, peak.get("gflops"))
                            for m in MODELS for k in sizes["train"]
                            if args.configs is None or f"{m}_{k}" in args.configs}
        if "generate" in only:
            out["generate"] = {f"streams_{n}": generate_entry(runner, env_name, env, n)
                               for n in sizes["generate"]["streams"]}
        if "baseline" in only:
            base = runner.alternate([("base", "baseline", sizes["baseline"], "tutorial-style baseline")],
                                    env_name, env)["base"]
            ours_a = out.get("train", {}).get("lstm_a", {}).get("ours")
            if not _ok(ours_a):  # the comparison needs ours at config a in this environment
                ours_a = train_entry(runner, env_name, env, "lstm", "a", peak.get("gflops"),
                                     with_torch=False)["ours"]
            out["baseline"] = {"tutorial": base, "nanolstm_config_a_tokens_per_s": ours_a.get("tokens_per_s"),
                               "nanolstm_over_tutorial": _ratio(ours_a.get("tokens_per_s"),
                                                                base.get("tokens_per_s"))}
        ours = [e["ours"] for part in ("train", "generate") for e in out.get(part, {}).values() if _ok(e["ours"])]
        out["cells"] = runner.cells([o["fused"] for o in ours], [o.get("packed") for o in ours],
                                    [o.get("packed_products") for o in ours]) if ours else None
        out["malloc_set"] = all(o.get("malloc_set") for o in ours) if ours else None

    if "data" in only:  # the BLAS hardly matters here: one environment is enough
        env_name, env = next(iter(envs.items()))
        d = sizes["data"]
        log(f"data (environment {env_name})")
        data = result["data"] = {"environment": env_name}
        data["encode"] = runner("encode", {"chars": d["encode_chars"]}, env_name, env,
                                f"encode {d['encode_chars'] / 1e6:g} MB")
        spec = {k: d[k] for k in ("layers", "hidden", "T", "N")}
        spec.update(steps=runner.steps, warmup=runner.warmup, numba=runner.numba)
        data.update(runner.alternate(
            [(f"train_{key}", "data_train", dict(spec, chars=chars),
              f"train lstm {d['layers']}x{d['hidden']} on {chars / 1e6:g} MB")
             for key, chars in zip(("small", "large"), d["train_chars"])], env_name, env))
        data["large_over_small"] = _ratio(data["train_large"].get("tokens_per_s"),
                                          data["train_small"].get("tokens_per_s"))
    result["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["failures"] = runner.failures
    return result


# ---------------------------------------------------------------------------------------------
# Printing


def _num(x, fmt="{:,.0f}"):
    return "-" if x is None else fmt.format(x)


def _blas_line(blas):
    if not blas:
        return "BLAS: unknown (threadpoolctl not installed)"
    return "; ".join(f"{b['internal_api']} {b['version']} kernel {b['architecture']}, "
                     f"{b['num_threads']} threads" for b in blas)


def _by_round(ratios):
    """The median and range of the ratios of the rounds, as '1.26 (1.21-1.38)'; '-' for fewer than 2."""
    ratios = [r for r in ratios or () if r is not None]
    if len(ratios) < 2:
        return "-"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def _train_table(train):
    head = (f"{'training':<28} {'ours tok/s':>11} {'torch tok/s':>11} {'ours/torch':>10} "
            f"{'by round':>17} {'GFLOP/s':>8} {'% peak':>7} {'peak RSS MB ours / torch':>25}")
    lines = [head, "-" * len(head)]
    for key, e in train.items():
        c, o, t = e["config"], e["ours"], e.get("torch") or {}
        name = f"{c['model']} {key[-1]} {c['layers']}x{c['hidden']} T={c['T']} N={c['N']}"
        share = o.get("share_of_peak")
        rss = f"{_num(o.get('peak_rss_mb'))} / {_num(t.get('peak_rss_mb'))}"
        lines.append(f"{name:<28} {_num(o.get('tokens_per_s')):>11} {_num(t.get('tokens_per_s')):>11} "
                     f"{_num(e['ours_over_torch'], '{:.2f}x'):>10} "
                     f"{_by_round(e.get('ours_over_torch_by_round')):>17} {_num(o.get('gflops'), '{:.1f}'):>8} "
                     f"{_num(share and 100 * share, '{:.0f}%'):>7} {rss:>25}")
    return lines


def _generate_line(e):
    c, o = e["config"], e["ours"]
    line = (f"generate lstm {c['layers']}x{c['hidden']}, {c['streams']} stream(s): ours "
            f"{_num(o.get('chars_per_s'))} char/s (peak RSS {_num(o.get('peak_rss_mb'))} MB)")
    if "torch_cell" in e:
        best = e["torch_best"] or {}
        line += (f"; torch nn.LSTMCell {_num(e['torch_cell'].get('chars_per_s'))}, "
                 f"nn.LSTM step {_num(e['torch_lstm'].get('chars_per_s'))} "
                 f"(peak RSS {_num(best.get('peak_rss_mb'))} MB); "
                 f"ours/torch best {_num(e['ours_over_torch'], '{:.2f}x')}, "
                 f"by round {_by_round(e.get('ours_over_torch_by_round'))}")
    return line


def _baseline_line(b):
    t = b["tutorial"]
    return (f"baseline, tutorial style (batch 1, column vectors, one-hot inputs, a product per gate, "
            f"{t.get('dtype', '?')}), lstm 1x{t.get('hidden', '?')}: {_num(t.get('tokens_per_s'))} tok/s; "
            f"nanolstm at config a {_num(b['nanolstm_config_a_tokens_per_s'])} tok/s = "
            f"{_num(b['nanolstm_over_tutorial'], '{:.1f}x')} as fast")


def _data_lines(d):
    enc, small, large = d["encode"], d["train_small"], d["train_large"]
    lines = ["", f"== data (environment {d['environment']})"]
    if _ok(enc):
        lines.append(f"encode {enc['chars'] / 1e6:g} MB ({enc['source']}): {enc['encode_s']:.2f} s, "
                     f"peak memory beyond the text {enc['peak_extra_mb']:.0f} MB = "
                     f"{enc['peak_extra_over_encoded']:.2f}x the encoded array "
                     f"({enc['encoded_mb']:.0f} MB {enc['encoded_dtype']})")
    if _ok(small) and _ok(large):
        lines.append(f"training lstm {small['layers']}x{small['hidden']} through Batches: "
                     f"{small['chars'] / 1e6:g} MB corpus {small['tokens_per_s']:,.0f} tok/s, "
                     f"{large['chars'] / 1e6:g} MB corpus {large['tokens_per_s']:,.0f} tok/s "
                     f"(ratio {d['large_over_small']:.2f})")
    return lines


def report(result):
    """The tables and lines printed at the end, as one string."""
    m, method = result["machine"], result["method"]
    lines = [f"machine: {m['cpu']}, {m['physical_cores']} cores / {m['logical_cpus']} logical CPUs; "
             f"python {m['python']}, numpy {m['numpy']}, torch {m['torch'] or '-'}, "
             f"numba {m['numba'] or '-'}",
             f"command: {result['command']}; {method['steps']} timed steps after {method['warmup']} "
             f"warm-up, median; random token ids; the fastest of {method['rounds']} processes, "
             "ours and PyTorch's taking turns"]
    if result["quick"]:
        lines.append("--quick: a smoke test of the benchmark, at tiny sizes; these figures measure nothing")
    load = (m.get("load_average") or [None])[0]
    if load is not None:
        lines.append(f"load average (1 min) before the start: {load:.1f}"
                     + (": other programs shared the CPU, and the figures are noisy" if load > 0.5 else ""))
    for env_name, out in result["environments"].items():
        peak = out["matmul_peak"]
        set_vars = (", ".join(f"{k}={v}" for k, v in out["env"].items() if v is not None)
                    or "no BLAS variables set")
        lines += ["", f"== environment {env_name} ({set_vars})",
                  f"{_blas_line(out.get('blas'))}; matmul peak {_num(peak.get('gflops'), '{:.0f}')} "
                  f"GFLOP/s (float32 {peak.get('n', '?')}^2, the median of {peak.get('reps', '?')}; "
                  f"the fastest {_num(peak.get('gflops_best'), '{:.0f}')}); cells: {out['cells'] or '-'}"
                  + {True: "; malloc: freed memory kept", False: "; malloc: as glibc leaves it"}.get(
                      out.get("malloc_set"), "")]
        if "train" in out:
            lines += _train_table(out["train"])
        lines += [_generate_line(e) for e in out.get("generate", {}).values()]
        if "baseline" in out:
            lines.append(_baseline_line(out["baseline"]))
    if "data" in result:
        lines += _data_lines(result["data"])
    lines += [f"FAILED {f['environment']} {f['what']}: {f['error']}" for f in result["failures"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command line


def _parts(text):
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"--only takes a comma list among {','.join(PARTS)}, got {text!r}")
    return parts


def _configs(text):
    """--configs: a comma list of training configurations, each a letter (both models) or
    model_letter (lstm_d) -> the model_letter keys, in the order given."""
    keys = []
    for item in (p.strip() for p in text.split(",")):
        if item in TRAIN_CONFIGS:
            keys += [f"{m}_{item}" for m in MODELS]
        elif item.partition("_")[::2] in {(m, k) for m in MODELS for k in TRAIN_CONFIGS}:
            keys.append(item)
        elif item:
            raise argparse.ArgumentTypeError(
                f"--configs takes a comma list of {', '.join(TRAIN_CONFIGS)} or of those prefixed by "
                f"{' or '.join(m + '_' for m in MODELS)} (lstm_d), got {item!r}")
    if not keys:
        raise argparse.ArgumentTypeError(f"--configs takes at least one configuration, got {text!r}")
    return tuple(dict.fromkeys(keys))


def _positive(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


DESCRIPTION = ("Measure training and generation speed and memory, each in its own process, beside "
               "PyTorch; print a table and write JSON.")


def add_arguments(p):
    a = p.add_argument
    a("--json", default=os.path.join("bench", "results", "speed.json"), metavar="PATH",
      help="where to write the results (default bench/results/speed.json)")
    a("--quick", action="store_true",
      help="a smoke test of the benchmark itself: configuration a only, tiny sizes, 2 steps")
    a("--only", type=_parts, metavar="PARTS", help=f"comma list among {','.join(PARTS)} (default all)")
    a("--configs", type=_configs, metavar="CONFIGS",
      help="the training configurations to measure: a comma list of a, b, c, d (LSTM and GRU) or of "
           "lstm_a ... gru_d (default all; --quick has a only)")
    a("--no-torch", action="store_true", help="measure nanolstm only")
    a("--no-numba", action="store_true", help="use the NumPy reference cells even if numba is installed")
    a("--steps", type=_positive, help="timed training steps per configuration (default 20, after 3 warm-up)")
    a("--rounds", type=_positive,
      help="processes per measurement, ours and PyTorch's taking turns; the fastest counts "
           "(default 3; 1 with --quick)")
    a("--blas", choices=["default", "haswell", "both"], default="both",
      help="OpenBLAS environment: as a user has it, OPENBLAS_CORETYPE=Haswell forced, or both (default)")
    return p


def add_parser(subparsers):
    """Register `bench` on an argparse sub-parsers object; returns its parser."""
    p = subparsers.add_parser("bench", help="measure training and generation speed against PyTorch",
                              description=DESCRIPTION)
    return add_arguments(p)


def _shown_argv(args):
    shown = []
    for flag in ("quick", "no_torch", "no_numba"):
        if getattr(args, flag):
            shown.append("--" + flag.replace("_", "-"))
    if args.only:
        shown.append("--only " + ",".join(args.only))
    if args.configs:
        shown.append("--configs " + ",".join(args.configs))
    if args.steps is not None:
        shown.append(f"--steps {args.steps}")
    if args.rounds is not None:
        shown.append(f"--rounds {args.rounds}")
    shown.append(f"--blas {args.blas}")
    return shown


def say(msg):
    """Progress, on stderr: the table on stdout stays clean."""
    print(msg, file=sys.stderr, flush=True)


def run(args):
    """Run the benchmark as args says; print the table, write the JSON; 0 if every measurement ran."""
    args.argv_shown = _shown_argv(args)
    sizes = QUICK if args.quick else FULL
    if args.configs and not any(key.partition("_")[2] in sizes["train"] for key in args.configs):
        raise NanolstmError(f"--configs {','.join(args.configs)}: --quick has configuration "
                            f"{', '.join(sizes['train'])} only; leave out --quick or --configs")
    path = Path(args.json)  # checked before the measurements, which take minutes
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NanolstmError(f"--json {path}: cannot make its folder ({e.strerror or e}); "
                            "choose another path") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        problem = "is a folder" if path.is_dir() else "its folder is not writable"
        raise NanolstmError(f"--json {path}: {problem}; choose another path")
    load, cpus = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, os.cpu_count() or 1
    if load > 0.5:
        say(f"warning: load average {load:.1f} on {cpus} CPUs: other programs are running, and with "
            "BLAS threads competing for the cores the figures will be low and noisy")
    result = collect(args, say)
    print(report(result))  # the table first: a file that cannot be written now loses nothing
    write_atomic(str(path), json.dumps(result, indent=1) + "\n")
    print(f"\nwritten to {path}")
    return 1 if result["failures"] else 0


def main(argv=None):
    """`python -m nanolstm.bench [options]` and bench/speed.py; `--worker SPEC` runs one measurement."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print(json.dumps(worker(json.loads(argv[1]))), flush=True)
        return 0
    from nanolstm import cli  # the command line's handling of bad input: one line, status 2

    return cli.main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
