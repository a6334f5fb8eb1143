"""The training loop: data, model, optimizer, evaluation, checkpoints, progress and metrics.

`train(TrainConfig(...))` runs it from Python; `nanolstm train` is a thin shell over it. A run can be
stopped at any step (Ctrl-C, SIGTERM, or a crash) and resumed from `last.ckpt` to end with the same
weights, bit for bit, as a run that never stopped: the checkpoint holds the weights, the optimizer's
moments, the random generator, the step (which fixes the data position) and the hidden state carried
between batches.
"""

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time

import numpy as np

from nanolstm import checkpoint, optim
from nanolstm.data import Batches, Vocab, default_corpus, encode_chars, read_corpus, split_ids
from nanolstm.errors import CheckpointError, DataError, NanolstmError
from nanolstm.functional import cross_entropy_backward, cross_entropy_forward
from nanolstm.model import GATES, LanguageModel, ModelConfig, check_fits, physical_memory
from nanolstm.outdir import OutputLock, write_atomic


MAX_SAMPLE_LENGTH = 1_000_000


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run; the command line's flags have the same names."""

    data: str = None  # a UTF-8 file or a folder of .txt files; None: Python's own help texts
    out: str = "out"
    level: str = "char"  # or "word"
    min_count: int = 1  # words seen fewer times become <unk>
    model: str = "lstm"  # lstm, gru or rnn
    num_layers: int = 2
    hidden_size: int = 256
    embedding_size: int = 64
    dropout: float = 0.0
    val_frac: float = 0.05
    batch_size: int = 32
    seq_length: int = 64
    optimizer: str = "adam"
    lr: float = 2e-3
    lr_schedule: str = "constant"  # constant, step or cosine
    warmup: int = 0
    lr_step_size: int = 1000
    lr_gamma: float = 0.5
    min_lr: float = 0.0
    grad_clip: float = 5.0  # by global norm; 0 turns it off
    grad_clip_value: float = None  # by value, instead of by norm
    weight_decay: float = None  # None: the optimizer's own, 1e-2 for adamw (as PyTorch's AdamW), 0 for the others
    max_steps: int = None  # default: 1500, unless epochs is given
    epochs: float = None
    eval_every: int = 250
    sample_length: int = 200  # characters (or words) of the preview at each evaluation
    seed: int = 0
    on_nan: str = "stop"  # or "skip"
    dtype: str = "float32"
    quiet: bool = False
    plot: bool = True
    resume: str = None  # a checkpoint, or a folder holding last.ckpt
    overwrite: bool = False  # replace the run that out holds, instead of refusing to start

    def validate(self):
        """Raise NanolstmError, one line, for any option that is not of its kind and range. The values
        may come from a checkpoint's JSON, so no type is taken for granted."""

        def flag(name):
            return "--" + name.replace("_", "-")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v):  # NaN and infinity are never a sensible setting
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("num_layers", "hidden_size", "embedding_size", "batch_size", "seq_length",
                     "eval_every", "min_count", "lr_step_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise NanolstmError(f"{flag(name)} must be a positive integer, got {v!r}")
        for name in ("warmup", "sample_length", "seed"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise NanolstmError(f"{flag(name)} must be an integer >= 0, got {v!r}")
        if self.sample_length > MAX_SAMPLE_LENGTH:  # refused now, not at the first evaluation
            raise NanolstmError(f"--sample-length must be at most {MAX_SAMPLE_LENGTH:,} (a preview printed at "
                                f"each evaluation), got {self.sample_length:,}")
        choices = {"level": ("char", "word"), "model": ("lstm", "gru", "rnn"),
                   "optimizer": tuple(optim.OPTIMIZERS), "lr_schedule": ("constant", "step", "cosine"),
                   "on_nan": ("stop", "skip"), "dtype": ("float32", "float64")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise NanolstmError(f"{flag(name)} must be one of {', '.join(allowed)}, "
                                    f"got {getattr(self, name)!r}")
        if not (is_real(self.lr) and self.lr > 0):
            raise NanolstmError(f"--lr must be a positive number, got {self.lr!r}")
        for name in ("dropout", "val_frac"):
            v = getattr(self, name)
            if not (is_real(v) and 0 <= v < 1):
                raise NanolstmError(f"{flag(name)} must be in [0, 1), got {v!r}")
        if self.max_steps is not None and not (is_int(self.max_steps) and self.max_steps >= 1):
            raise NanolstmError(f"--max-steps must be a positive integer, got {self.max_steps!r}")
        if self.epochs is not None and not (is_real(self.epochs) and self.epochs > 0):
            raise NanolstmError(f"--epochs must be positive, got {self.epochs!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise NanolstmError("--epochs and --max-steps both say when to stop; pass one of them")
        for name in ("grad_clip", "weight_decay", "min_lr"):
            v = getattr(self, name)
            if not (is_real(v) and v >= 0) and not (name == "weight_decay" and v is None):
                raise NanolstmError(f"{flag(name)} must be a number >= 0, got {v!r}")
        for name in ("lr_gamma", "grad_clip_value"):
            v = getattr(self, name)
            if not (is_real(v) and v > 0) and not (name == "grad_clip_value" and v is None):
                raise NanolstmError(f"{flag(name)} must be a positive number, got {v!r}")
        # an empty path would name the working folder: its .txt files as the corpus, its last.ckpt
        for name in ("data", "resume"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v):
                raise NanolstmError(f"{flag(name)} must be a path, got {v!r}")
        if not (isinstance(self.out, str) and self.out):
            raise NanolstmError(f"--out must be a folder name, got {self.out!r}")
        for name in ("quiet", "plot", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise NanolstmError(f"{name} must be true or false, got {getattr(self, name)!r}")


# Options that may differ between a checkpoint and the run that resumes it: they change neither the
# model nor the sequence of updates that came before. The corpus may move: its SHA-256 is checked.
RESUMABLE = {"out", "max_steps", "epochs", "eval_every", "sample_length", "quiet", "plot", "resume",
             "overwrite", "on_nan", "data"}

# The files of a run in its folder; the first three mean the folder holds a run
RUN_FILES = ("last.ckpt", "best.ckpt", "metrics.jsonl", "loss.png")


class Interrupted(Exception):
    """Training stopped by a signal after writing last.ckpt; exit status 128 + signum."""

    def __init__(self, signum, step, path):
        super().__init__(f"stopped at step {step} by signal {signum}; checkpoint saved to {path}")
        self.signum, self.step, self.path = signum, step, path


class Diverged(NanolstmError):
    """The loss or the gradient became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    step: int
    val_loss: float
    best_val_loss: float
    out: str
    val_tokens: int = 0  # 0: there was no validation split


# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(path):
    """A checkpoint file, or the given name inside a folder (last.ckpt by default)."""
    if os.path.isdir(path):
        return os.path.join(path, "last.ckpt")
    return path


def _given_options(config):
    """The options of config that differ from TrainConfig's defaults: what counts as given when the
    caller does not say (an option set to its default value cannot be told from one left alone)."""
    defaults = TrainConfig()
    return {f.name for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) != getattr(defaults, f.name)}


def resumed_config(config, given=None):
    """The configuration stored in config.resume's checkpoint, with the options that may change taken
    from config. given is the set of option names set explicitly; the command line passes the flags
    it was given. Without it, an option counts as given when its value differs from TrainConfig's
    default, so one set to its default value is not taken. A given option that may not change and
    disagrees with the checkpoint is refused, and so is a checkpoint that lacks anything a resume
    restores. --epochs and --max-steps both say when the run ends: the one given replaces the other.

    The run resumes into the folder that holds the checkpoint, or into config.out if it was given;
    never into the folder named inside the checkpoint, which may have been copied from elsewhere."""
    if given is None:
        given = _given_options(config)
    path = resolve_checkpoint(config.resume)
    arrays, meta = checkpoint.load(path)
    if not isinstance(meta.get("train_config"), dict):
        raise CheckpointError(f"{path}: holds a model but no training state; it cannot be resumed")
    saved = dict(meta["train_config"])
    # what to do with this invocation is never the checkpoint's to say
    saved["resume"], saved["overwrite"] = config.resume, config.overwrite
    if "epochs" in given:
        saved["max_steps"] = None
    elif "max_steps" in given or saved.get("max_steps") is not None:  # an older run may hold both: max_steps won
        saved["epochs"] = None
    clashes = []
    for field in dataclasses.fields(TrainConfig):
        name, value = field.name, getattr(config, field.name)
        if name not in given or name in ("resume", "overwrite"):
            continue
        if name in RESUMABLE:
            saved[name] = value
        elif value != saved.get(name):
            clashes.append(f"--{name.replace('_', '-')} {value} (checkpoint: {saved.get(name)})")
    if clashes:
        raise NanolstmError(f"--resume: options do not fit the checkpoint {path}: {'; '.join(clashes)}; "
                            "drop them or start a new run")
    if "out" not in given:  # resume into the checkpoint's own folder unless told otherwise
        saved["out"] = os.path.dirname(os.path.abspath(path))
    try:
        resumed = TrainConfig(**saved)
        resumed.validate()
        _check_resumable(resumed, arrays, meta)
    except (TypeError, ValueError, KeyError, OverflowError, NanolstmError) as e:
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: cannot be resumed ({type(e).__name__}: {detail}); "
                              "use another checkpoint") from None
    if "data" not in given and resumed.data is not None and not os.path.exists(resumed.data):
        raise NanolstmError(f"--resume: the corpus {resumed.data} that the run was trained on is not there; "
                            "pass --data with that corpus")
    return resumed, arrays, meta


def _check_resumable(config, arrays, meta):
    """Raise unless meta and arrays hold everything that _train_locked restores, in the shapes that
    config implies. A forged or damaged checkpoint fails here, before a model is built for it: forged
    sizes cannot make the trainer allocate more than the file holds."""
    vocab = Vocab.from_json(meta["vocab"])
    if vocab.level != config.level:
        raise ValueError(f"a {vocab.level} vocabulary for a {config.level} model")
    model_config = ModelConfig(len(vocab), config.model, config.num_layers, config.hidden_size,
                               config.embedding_size, config.dropout)
    check_fits(model_config, {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")})
    shapes = model_config.parameter_shapes()
    for name, v in arrays.items():
        if name.startswith("optim.") and np.shape(v) != shapes.get(name.split(".", 2)[-1]):
            raise ValueError(f"optimizer state {name} does not fit the model")
    carried = sorted(k for k in arrays if k.startswith("carry."))
    parts = [f"carry.{i}" for i in range(2 if config.model == "lstm" else 1)]  # (h, c) or h
    state_shape = (config.num_layers, config.batch_size, config.hidden_size)
    if carried not in ([], parts) or any(arrays[k].shape != state_shape for k in carried):
        raise ValueError("the carried hidden state does not fit the model")
    # counts from 0 to the step (Adam divides by 1 - beta**steps), losses >= 0 (best may be inf)
    step, opt, best = meta["step"], meta["optimizer"], meta["best_val_loss"]
    interval = meta.get("interval", [0.0, 0, 0])
    if not (type(step) is int and step >= 0):
        raise ValueError(f"step {step!r} is not an integer >= 0")

    def count(v):
        return type(v) is int and 0 <= v <= step

    def loss(v):
        return type(v) in (int, float) and v >= 0

    if not (isinstance(opt, dict) and count(opt["steps"]) and type(opt["lr"]) in (int, float)):
        raise ValueError("the optimizer's steps must be an integer from 0 to the step, and its lr a number")
    if not (isinstance(interval, list) and len(interval) == 3 and loss(interval[0]) and math.isfinite(interval[0])
            and count(interval[1]) and count(interval[2])):
        raise ValueError("interval must be a finite loss >= 0 and two counts from 0 to the step")
    if not (loss(best) and isinstance(meta["corpus_sha256"], str)):
        raise ValueError("best_val_loss or corpus_sha256 is malformed")
    np.random.default_rng().bit_generator.state = meta["rng"]  # raises unless it is a valid state


def load_data(config, vocab=None, corpus_sha256=None):
    """Read and encode the corpus. Returns (vocab, train ids, val ids, corpus fingerprint). A resume
    gives the fingerprint of its corpus, so that another corpus is refused as such, before its
    characters or its size are."""
    text = read_corpus(config.data) if config.data is not None else default_corpus()
    fingerprint = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    if corpus_sha256 is not None and fingerprint != corpus_sha256:
        raise NanolstmError("--resume: the corpus differs from the one the checkpoint was trained on; "
                            "pass --data with the corpus the run was trained on")
    if config.level == "char":
        ids, vocab = encode_chars(text, vocab)
    else:
        vocab = vocab or Vocab.build_words(text, config.min_count)
        ids = vocab.encode(text)
    del text
    train_ids, val_ids = split_ids(ids, config.val_frac)
    return vocab, train_ids, val_ids, fingerprint


def evaluate(model, ids, batch_size, seq_length):
    """Mean loss in nats over the whole of ids, cut into at most batch_size streams.

    Every token but the first of each stream (and fewer than batch_size left over at the end) is
    predicted once, with the hidden state carried along each stream.
    """
    N = max(1, min(batch_size, (len(ids) - 1) // 2))
    L = (len(ids) - 1) // N
    x_all = ids[: N * L].reshape(N, L).T  # (L, N)
    y_all = ids[1 : N * L + 1].reshape(N, L).T
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    for start in range(0, L, seq_length):
        x = np.ascontiguousarray(x_all[start : start + seq_length])
        y = y_all[start : start + seq_length]
        logits, state = model.forward(x, state)
        loss, _ = cross_entropy_forward(logits, y)
        total += float(loss) * y.size
        count += y.size
    model.train(was_training)
    return total / count


def bits(nats):
    return nats / math.log(2)


# ---------------------------------------------------------------------------------------------


def train(config, log=None, given=None):
    """Train a language model as config says; returns a TrainResult. Raises NanolstmError for bad
    input, Diverged for a loss that became NaN, and Interrupted after a signal.

    log, if given, is called with each line of progress instead of printing it. given is the set of
    option names set explicitly, which --resume takes or checks against the checkpoint (see
    resumed_config); without it, an option counts as given when its value differs from the default.
    A folder that holds another run is refused unless config.overwrite says to replace it."""
    meta, arrays, resumed_from = None, None, None
    config.validate()
    if config.resume is not None:
        resumed_from = os.path.dirname(os.path.abspath(resolve_checkpoint(config.resume)))
        config, arrays, meta = resumed_config(config, given)
    created = not os.path.exists(config.out)
    try:
        os.makedirs(config.out, exist_ok=True)
    except OSError as e:
        raise NanolstmError(f"cannot create the output folder {config.out}: {e.strerror or e}; "
                            "choose another --out") from None
    try:
        with OutputLock(config.out):
            _check_out_folder(config, resumed_from)
            return _train_locked(config, arrays, meta, log)
    except (NanolstmError, KeyboardInterrupt):
        # bad input, or Ctrl-C while a large corpus loads, before anything was written: leave no trace
        # of the folder we made for it. Only a tidying: the folder may be going away under us (removed
        # while we ran), and then the error to report is still the one that stopped the run.
        if created:
            try:
                if os.listdir(config.out) == [".lock"]:
                    os.remove(os.path.join(config.out, ".lock"))
                    os.rmdir(config.out)
            except OSError:
                pass
        raise


def _check_out_folder(config, resumed_from):
    """Refuse a folder that holds another run: a fresh run would overwrite its checkpoints and leave
    a stale best.ckpt, and a resume would mix the two logs. --overwrite replaces that run, but not the
    one being resumed."""
    try:
        own = resumed_from is not None and os.path.samefile(config.out, resumed_from)
    except OSError:  # the checkpoint's folder is gone or unreadable: it is not this one
        own = False
    if own:
        if config.overwrite:
            raise NanolstmError(f"--overwrite would remove the run that --resume continues in {config.out}; "
                                "drop --overwrite")
        return
    if config.overwrite or not any(os.path.lexists(os.path.join(config.out, n)) for n in RUN_FILES[:3]):
        return
    if not os.path.lexists(os.path.join(config.out, "last.ckpt")):  # killed in its first evaluation
        raise NanolstmError(f"{config.out} already holds a run that has no last.ckpt to resume; choose another "
                            "--out, or pass --overwrite to replace it")
    raise NanolstmError(f"{config.out} already holds a run; continue it with --resume {config.out}, "
                        "choose another --out, or pass --overwrite to replace it")


def _remove_replaced_run(folder):
    """With --overwrite, the files of the run that folder held, removed once the new run has checked
    its input and built its model: bad input still leaves them as they were."""
    for name in RUN_FILES:  # a folder under one of the names would fail half-way through: none goes
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            raise NanolstmError(f"{path} is a folder; move it away to replace the run in {folder}")
    for name in RUN_FILES:
        path = os.path.join(folder, name)
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise NanolstmError(f"cannot remove {path} of the run being replaced: {e.strerror or e}; "
                                "move it away or choose another --out") from None


def print_stdout(text):
    """Print a line on stdout as well as it can show it: characters its encoding lacks (a non-ASCII
    preview under PYTHONIOENCODING=ascii) as backslash escapes. Once the reader has gone (| head),
    what follows goes to os.devnull, so that a training run still ends with its checkpoints."""
    try:
        print(_printable(text, sys.stdout), flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())  # the buffer's unwritten rest goes there too
        except (OSError, ValueError, AttributeError):  # no file behind stdout (a test's capture)
            sys.stdout = open(os.devnull, "w")
        finally:
            os.close(devnull)


def _printable(text, stream):
    """text, with what stream's encoding cannot show as backslash escapes."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    return text


def _train_locked(config, arrays, meta, log):
    stdout_tty = sys.stdout.isatty()
    say = log or (lambda msg: None if config.quiet else print_stdout(msg))
    dtype = np.dtype(config.dtype)

    # ---- data
    vocab = Vocab.from_json(meta["vocab"]) if meta else None
    vocab, train_ids, val_ids, fingerprint = load_data(config, vocab, meta["corpus_sha256"] if meta else None)
    need = Batches.min_tokens(config.batch_size, config.seq_length)
    if len(val_ids) and len(train_ids) < need:  # the split took it: say so
        raise DataError(f"corpus too small for one batch: the training split has {len(train_ids)} tokens "
                        f"once --val-frac {config.val_frac} kept {len(val_ids)} for validation, need at least "
                        f"batch_size*seq_length+1 = {need}; lower --val-frac, --batch-size or --seq-length")
    batches = Batches(train_ids, config.batch_size, config.seq_length)
    if config.val_frac > 0 and len(val_ids) < 2:
        raise NanolstmError("the validation split is empty; raise --val-frac or use a larger corpus")
    if config.max_steps is not None:
        max_steps = config.max_steps
    elif config.epochs is not None:
        max_steps = max(1, int(config.epochs * len(batches)))
    else:
        max_steps = 1500

    # ---- model and optimizer
    model_config = ModelConfig(len(vocab), config.model, config.num_layers, config.hidden_size,
                               config.embedding_size, config.dropout)
    _check_memory(model_config, dtype, config.batch_size, config.seq_length)
    model = LanguageModel(model_config, vocab, seed=config.seed, dtype=dtype)
    params, grads = model.state_dict(), model.named_grads()
    opt_kwargs = {"lr": config.lr}
    if config.weight_decay is not None:  # None: the optimizer's own default, 1e-2 for AdamW, else 0
        opt_kwargs["weight_decay"] = config.weight_decay
    opt = optim.OPTIMIZERS[config.optimizer](params, grads, **opt_kwargs)
    step, best_val, state = 0, math.inf, None
    if meta:
        model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model.")})
        opt.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("optim.")}, meta["optimizer"])
        model.rng.bit_generator.state = meta["rng"]
        step, best_val = meta["step"], meta["best_val_loss"]
        carried = [arrays[k] for k in sorted(arrays) if k.startswith("carry.")]
        state = (tuple(carried) if config.model == "lstm" else carried[0]) if carried else None
    crit_scale = "bpc" if config.level == "char" else "ppl"

    # ---- checkpoints, metrics and the plot, all inside config.out
    last_path = os.path.join(config.out, "last.ckpt")
    best_path = os.path.join(config.out, "best.ckpt")
    metrics_path = os.path.join(config.out, "metrics.jsonl")

    def save(path):
        if not all(np.all(np.isfinite(p)) for p in params.values()):
            say(f"not saving {path}: the weights are not finite")
            return
        m_arrays, m_meta = model.checkpoint_parts()
        o_arrays, o_scalars = opt.state_dict()
        m_arrays.update({f"optim.{k}": v for k, v in o_arrays.items()})
        if state is not None:
            parts = state if isinstance(state, tuple) else (state,)
            m_arrays.update({f"carry.{i}": s for i, s in enumerate(parts)})
        train_config = dataclasses.asdict(config)
        # absolute, so that the run resumes from any working folder; the weight decay that was used
        train_config.update(resume=None, overwrite=False, weight_decay=opt.weight_decay,
                            data=None if config.data is None else os.path.abspath(config.data))
        m_meta.update({"train_config": train_config, "step": step, "optimizer": o_scalars,
                       "rng": model.rng.bit_generator.state, "best_val_loss": best_val,
                       "interval": [interval_loss, interval_steps, skipped],
                       "corpus_sha256": fingerprint})
        checkpoint.save(path, m_arrays, m_meta)

    if config.overwrite:
        _remove_replaced_run(config.out)
    history = _read_metrics(metrics_path, step) if meta else []

    # ---- signals: finish the step under way, then save and stop
    stop = {"signum": None}

    def on_signal(signum, frame):
        stop["signum"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = None
    if stdout_tty and not config.quiet and log is None:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is optional: without it, plain log lines
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True)

            def say(msg):
                bar.write(_printable(msg, sys.stdout))

    say(f"nanolstm: {config.model} {config.num_layers}x{config.hidden_size}, "
        f"{model.num_parameters():,} parameters, vocabulary {len(vocab)}, "
        f"{len(train_ids):,} training and {len(val_ids):,} validation tokens, {len(batches)} batches per epoch"
        + (f"; resuming at step {step}" if meta else ""))

    tokens_per_step = config.batch_size * config.seq_length
    t_start = time.perf_counter()
    t_interval = 0.0
    # the loss summed since the last evaluation carries over a resume, so the metrics match too
    interval_loss, interval_steps, skipped = meta.get("interval", (0.0, 0, 0)) if meta else (0.0, 0, 0)
    val_loss = history[-1]["val_loss"] if history else math.nan
    # NumPy's overflow warnings would only repeat, unreadably, what the check of every step reports
    numpy_errors = np.seterr(over="ignore", invalid="ignore", divide="ignore")
    try:
        while step < max_steps and stop["signum"] is None:
            t0 = time.perf_counter()
            k = step % len(batches)
            if k == 0:
                state = None  # a new epoch starts every stream from the beginning
            x, y = batches[k]
            lr = optim.lr_at(step, config.lr, config.lr_schedule, max_steps, config.warmup,
                             config.lr_step_size, config.lr_gamma, config.min_lr)
            opt.lr = lr

            # forward, loss, backward
            model.zero_grad()
            logits, new_state = model.forward(x, state)
            loss, cache = cross_entropy_forward(logits, y)
            model.backward(cross_entropy_backward(cache))

            # clip, check, update
            if config.grad_clip_value is not None:
                optim.clip_grad_value(grads, config.grad_clip_value)
                norm = optim.global_norm(grads)
            elif config.grad_clip > 0:
                norm = optim.clip_grad_norm(grads, config.grad_clip)
            else:
                norm = optim.global_norm(grads)
            loss = float(loss)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                if config.on_nan == "stop":
                    kept = (f"{last_path} keeps the last good weights" if os.path.exists(last_path)
                            else "no checkpoint was written")
                    raise Diverged(f"training diverged at step {step + 1}: the {what} is not finite; "
                                   f"{kept}; lower --lr or pass --on-nan skip")
                say(f"step {step + 1}: the {what} is not finite; update skipped")
                skipped += 1
                new_state = None  # the state it left may be poisoned too: the streams start afresh
            else:
                opt.step()
                interval_loss += loss
                interval_steps += 1
            state = new_state
            step += 1
            t_interval += time.perf_counter() - t0

            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {loss:.3f} {crit_scale} "
                                    f"{bits(loss) if crit_scale == 'bpc' else math.exp(min(loss, 50)):.3f} "
                                    f"{tokens_per_step * interval_steps / max(t_interval, 1e-9):,.0f} tok/s")

            if step % config.eval_every == 0 or step == max_steps:
                checkpoint.pause_for_test("evaluate")
                val_loss = evaluate(model, val_ids, config.batch_size, config.seq_length) if len(val_ids) > 1 \
                    else math.nan
                # NaN when every update since the last evaluation was skipped: there was no loss to average
                train_loss = interval_loss / interval_steps if interval_steps else math.nan
                record = {"step": step, "epoch": step / len(batches), "tokens": step * tokens_per_step,
                          "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                          "tokens_per_s": tokens_per_step * interval_steps / max(t_interval, 1e-9),
                          "elapsed_s": time.perf_counter() - t_start, "grad_norm": norm,
                          "skipped_steps": skipped}
                if crit_scale == "bpc":
                    record.update(train_bpc=bits(train_loss), val_bpc=bits(val_loss))
                else:
                    record.update(train_ppl=math.exp(min(train_loss, 50)), val_ppl=math.exp(min(val_loss, 50)))
                history.append(record)
                t_interval, interval_loss, interval_steps = 0.0, 0.0, 0
                improved = val_loss < best_val
                if improved:
                    best_val = val_loss
                # last.ckpt last: after a kill -9 between these writes it never claims a step whose
                # record or best.ckpt is missing; the log may run ahead, and a resume writes it again
                write_atomic(metrics_path, "".join(_json_line(r) for r in history))
                if config.plot:
                    plot_history(history, os.path.join(config.out, "loss.png"), crit_scale)
                if improved:
                    save(best_path)
                save(last_path)
                say(_log_line(record, max_steps, crit_scale))
                if config.sample_length and stop["signum"] is None:
                    checkpoint.pause_for_test("preview")
                    preview = model.generate(length=config.sample_length, temperature=0.8, seed=step)[0]
                    say("---- sample ----\n" + preview + "\n----")
            elif bar is None and not config.quiet and step % max(1, config.eval_every // 5) == 0:
                say(f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"{tokens_per_step * interval_steps / max(t_interval, 1e-9):,.0f} tok/s")

        if stop["signum"] is not None:
            save(last_path)
            raise Interrupted(stop["signum"], step, last_path)
    finally:
        np.seterr(**numpy_errors)
        if bar is not None:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return TrainResult(step=step, val_loss=val_loss, best_val_loss=best_val, out=config.out,
                       val_tokens=len(val_ids))


def _log_line(r, max_steps, scale):
    score = f"val bpc {r['val_bpc']:.4f}" if scale == "bpc" else f"val ppl {r['val_ppl']:.2f}"
    return (f"step {r['step']}/{max_steps} | train loss {r['train_loss']:.4f} | val loss {r['val_loss']:.4f} | "
            f"{score} | lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s | {r['elapsed_s']:.1f}s")


def step_memory(model_config, batch_size, seq_length, dtype=np.float32):
    """A lower bound, in bytes, of the memory a training step holds: (weights, step), the weights and
    their gradients, and what the step keeps of a batch of seq_length x batch_size tokens: every
    layer's pre-activations (G*H a token) and outputs (H), the gradient of one layer's
    pre-activations, the logits and their gradient."""
    G, H, V = GATES[model_config.model], model_config.hidden_size, model_config.vocab_size
    itemsize = np.dtype(dtype).itemsize
    weights = 2 * model_config.num_parameters() * itemsize
    per_token = model_config.num_layers * (G * H + H) + G * H + 2 * V
    return weights, batch_size * seq_length * per_token * itemsize


def _check_memory(model_config, dtype, batch_size, seq_length):
    """Refuse, before anything is allocated, a training step that cannot fit in the machine's memory.
    NumPy hands out large arrays without complaint and the kernel maps their pages only as they are
    written, so a step too large would not raise MemoryError but have the process killed, without a
    word, minutes into its first forward pass. step_memory is a lower bound: what fits is never
    refused."""
    have = physical_memory()  # None where the system does not say: then the allocation decides
    if have is None:
        return
    weights, step = step_memory(model_config, batch_size, seq_length, dtype)
    if weights > have:
        raise NanolstmError(f"the model's weights and gradients need {weights / 2**30:,.1f} GiB, more than this "
                            f"machine's {have / 2**30:,.1f} GiB; lower --hidden-size, --num-layers or "
                            "--embedding-size")
    if weights + step > have:
        raise NanolstmError(f"a training step needs at least {(weights + step) / 2**30:,.1f} GiB (a batch of "
                            f"{batch_size:,} x {seq_length:,} tokens through {model_config.num_layers:,} layer(s) "
                            f"of {model_config.hidden_size:,} units), more than this machine's {have / 2**30:,.1f} "
                            "GiB; lower --batch-size, --seq-length, --hidden-size or --num-layers")


def _json_line(record):
    """A record as a line of strict JSON: a loss that is NaN (no validation split, an interval whose
    updates were all skipped) or a gradient norm that is infinite is written null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in record.items()}, allow_nan=False) + "\n"


def _is_record(r):
    """Whether r holds what plot_history and a resume read: an integer step, and losses that are
    numbers or null."""
    return (isinstance(r, dict) and type(r.get("step")) is int
            and all(k in r and (r[k] is None or type(r[k]) in (int, float)) for k in ("train_loss", "val_loss")))


def _read_metrics(path, upto):
    """The records of metrics.jsonl up to step upto, the checkpoint's: a resume writes the later ones
    again (a kill may have come between the log and the checkpoint). null reads back as NaN."""
    if not os.path.lexists(path):
        return []
    records, number = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                if not _is_record(r):  # one the trainer did not write: it would fail later, in plot_history
                    raise ValueError("not a record with a step, train_loss and val_loss")
                if r["step"] <= upto:
                    records.append({k: math.nan if v is None else v for k, v in r.items()})
    except OSError as e:
        raise NanolstmError(f"cannot read {path}: {e.strerror or e}; move it away to resume with a new log") from None
    except ValueError as e:  # not UTF-8, not JSON, or not a record
        detail = " ".join((getattr(e, "msg", None) or str(e)).split())[:100]
        raise NanolstmError(f"{path} is damaged at line {number} ({type(e).__name__}: {detail}); "
                            "move it away to resume with a new log") from None
    return records


def plot_history(history, path, scale):
    """Training and validation loss against the step, written atomically as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["train_loss"] for r in history], label="train")
    ax.plot(steps, [r["val_loss"] for r in history], label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per " + ("character" if scale == "bpc" else "word") + ")")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise NanolstmError(f"cannot write {path}: {e.strerror or e}; check free space and permissions") from None
    finally:
        plt.close(fig)
