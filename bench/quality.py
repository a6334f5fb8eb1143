"""Quality: nanolstm against PyTorch's nn.LSTM, trained side by side on Shakespeare (issue 3, "Quality").

Both models start from the same weights (nanolstm's initialisation, copied into PyTorch by parameter
name), see the same batches in the same order (nanolstm.data.Batches, the state carried from batch to
batch and reset at each epoch, as nanolstm.train does), take the same Adam updates with the same
clipping, and are scored by the same evaluation over the whole validation split. So the two curves can
differ only by float32 rounding, and the issue asks that they agree within 0.02 bits per character at
every evaluation.

nanolstm is trained by nanolstm.train.train, the loop users run; its curve comes from metrics.jsonl.
PyTorch is trained by a loop written here that mirrors that one step for step.

    python bench/quality.py            # 2x512, 3000 steps, about 30 minutes on 2 cores
    python bench/quality.py --quick    # 2x64, 60 steps on the first 200 KB: a smoke test, under a minute

Prints a table and writes bench/results/quality.json (quality-quick.json with --quick). The exit
status is 0 when every point agrees within the tolerance, 1 when one does not.
"""

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import nanolstm
from nanolstm.data import Batches, encode_chars, read_corpus, split_ids
from nanolstm.functional import cross_entropy_backward, cross_entropy_forward
from nanolstm.model import LanguageModel, ModelConfig
from nanolstm.train import TrainConfig, bits, load_data, train

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/shakespeare.txt"
TOLERANCE_BPC = 0.02  # the criterion
QUICK_CHARS = 200_000


# ---------------------------------------------------------------------------------------------
# The PyTorch twin: the same three layers, under the same parameter names as nanolstm's LanguageModel.


class TorchLanguageModel(torch.nn.Module):
    def __init__(self, vocab_size, embedding_size, hidden_size, num_layers):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, embedding_size)
        self.rnn = torch.nn.LSTM(embedding_size, hidden_size, num_layers=num_layers)
        self.decoder = torch.nn.Linear(hidden_size, vocab_size)

    def forward(self, x, state=None):
        """x (T, N) int64 -> logits (T, N, V), (h, c) each (L, N, H)."""
        out, state = self.rnn(self.embedding(x), state)
        return self.decoder(out), state


def torch_twin(ours):
    """A TorchLanguageModel holding exactly the weights of nanolstm's LanguageModel `ours`."""
    c = ours.config
    twin = TorchLanguageModel(c.vocab_size, c.embedding_size, c.hidden_size, c.num_layers)
    # strict: every name must match both ways, so a parameter cannot be silently left at torch's init
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()}, strict=True)
    return twin


def as_long(a):
    return torch.from_numpy(np.asarray(a, dtype=np.int64))


def torch_evaluate(model, ids, batch_size, seq_length):
    """nanolstm.train.evaluate, in PyTorch: the same streams, chunks and carried state."""
    N = max(1, min(batch_size, (len(ids) - 1) // 2))
    L = (len(ids) - 1) // N
    x_all = ids[: N * L].reshape(N, L).T  # (L, N)
    y_all = ids[1 : N * L + 1].reshape(N, L).T
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for start in range(0, L, seq_length):
            x, y = as_long(x_all[start : start + seq_length]), as_long(y_all[start : start + seq_length])
            logits, state = model(x, state)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            total += float(loss) * y.numel()
            count += y.numel()
    model.train()
    return total / count


def torch_train(model, train_ids, val_ids, cfg, log):
    """nanolstm.train's loop (constant learning rate, clip by global norm), in PyTorch.

    Returns one record per evaluation, with the same keys as nanolstm's metrics.jsonl uses.
    """
    batches = Batches(train_ids, cfg.batch_size, cfg.seq_length)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    tokens_per_step = cfg.batch_size * cfg.seq_length
    history, state = [], None
    t_start = time.perf_counter()
    t_interval, interval_loss, interval_steps = 0.0, 0.0, 0
    model.train()
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        k = (step - 1) % len(batches)
        if k == 0:
            state = None  # a new epoch starts every stream from the beginning
        x, y = batches[k]
        x, y = as_long(x), as_long(y)

        opt.zero_grad(set_to_none=False)
        logits, new_state = model(x, state)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        state = tuple(s.detach() for s in new_state)  # truncated BPTT: carry the value, not the graph
        interval_loss += loss.item()
        interval_steps += 1
        t_interval += time.perf_counter() - t0

        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            val_loss = torch_evaluate(model, val_ids, cfg.batch_size, cfg.seq_length)
            train_loss = interval_loss / interval_steps
            r = {"step": step, "train_loss": train_loss, "val_loss": val_loss,
                 "train_bpc": bits(train_loss), "val_bpc": bits(val_loss), "grad_norm": norm,
                 "tokens_per_s": tokens_per_step * interval_steps / max(t_interval, 1e-9),
                 "elapsed_s": time.perf_counter() - t_start}
            history.append(r)
            log(f"pytorch: step {step}/{cfg.max_steps} | train loss {train_loss:.4f} | val loss {val_loss:.4f}"
                f" | val bpc {r['val_bpc']:.4f} | {r['tokens_per_s']:,.0f} tok/s | {r['elapsed_s']:.1f}s")
            t_interval, interval_loss, interval_steps = 0.0, 0.0, 0
    return history


# ---------------------------------------------------------------------------------------------
# Checks before the long runs: the weights and the first gradient agree, so a mapping error shows up
# in seconds rather than as a drifting curve half an hour later.


def first_step_check(ours, twin, batches):
    """Loss and every parameter gradient of batch 0 in both; returns (|loss diff|, worst gradient
    name, its max relative difference)."""
    x, y = batches[0]
    ours.zero_grad()
    logits, _ = ours.forward(x)
    loss, cache = cross_entropy_forward(logits, y)
    ours.backward(cross_entropy_backward(cache))

    twin.zero_grad()
    t_logits, _ = twin(as_long(x))
    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, t_logits.shape[-1]), as_long(y).reshape(-1))
    t_loss.backward()
    t_grads = {k: p.grad.numpy() for k, p in twin.named_parameters()}

    worst, worst_name = 0.0, None
    for name, g in ours.named_grads().items():
        diff = float(np.max(np.abs(g - t_grads[name])) / (np.max(np.abs(t_grads[name])) + 1e-30))
        if diff >= worst:
            worst, worst_name = diff, name
    ours.zero_grad()
    twin.zero_grad()
    return abs(float(loss) - t_loss.item()), worst_name, worst


def weight_difference(ours, twin):
    """(parameter name, max |ours - theirs| / max |theirs|) for the parameter where that is largest."""
    theirs = {k: v.detach().numpy() for k, v in twin.state_dict().items()}
    diffs = {k: float(np.max(np.abs(v - theirs[k])) / (np.max(np.abs(theirs[k])) + 1e-30))
             for k, v in ours.state_dict().items()}
    name = max(diffs, key=diffs.get)
    return name, diffs[name]


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help=f"corpus (default: {DEFAULT_DATA})")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--embedding-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of nanolstm's initialisation, shared by both")
    p.add_argument("--numba", action="store_true", help="nanolstm with its compiled cells (use_numba)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: 2x64 units, 60 steps, evaluation every 20, first {QUICK_CHARS:,} characters")
    p.add_argument("--results", default=None, help="JSON output (default bench/results/quality[-quick].json)")
    p.add_argument("--quiet", action="store_true", help="only the final table")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.hidden_size = 60, 20, 64
    return args


def main(argv=None):
    args = parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    tag = "quality-quick" if args.quick else "quality"
    results_path = Path(args.results) if args.results else HERE / "results" / f"{tag}.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    out_dir = results_path.parent / f"{tag}-nanolstm"  # last.ckpt of our run: the sample comes from it
    cells = "numba" if args.numba and nanolstm.use_numba(True) else "numpy"
    if not args.numba:
        nanolstm.use_numba(False)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data)
        if args.quick:  # train() reads a path, so the shortened corpus goes to a file of its own
            data = Path(tmp) / "quick.txt"
            data.write_text(read_corpus(args.data)[:QUICK_CHARS], encoding="utf-8")
        cfg = TrainConfig(data=str(data), out=str(out_dir), model="lstm", num_layers=args.num_layers,
                          hidden_size=args.hidden_size, embedding_size=args.embedding_size, dropout=0.0,
                          val_frac=0.05, batch_size=32, seq_length=100, optimizer="adam", lr=2e-3,
                          lr_schedule="constant", grad_clip=5.0, max_steps=args.steps, eval_every=args.eval_every,
                          sample_length=0, seed=args.seed, dtype="float32", quiet=args.quiet, plot=False,
                          overwrite=True)  # a run of this script replaces the last one's

        # ---- data: the trainer's own loader, checked against the split the data README prescribes
        vocab, train_ids, val_ids, _ = load_data(cfg)
        ids, _ = encode_chars(read_corpus(cfg.data), vocab)
        ref_train, ref_val = split_ids(ids, 0.05)
        assert np.array_equal(train_ids, ref_train) and np.array_equal(val_ids, ref_val)
        log(f"data: {data} | {len(ids):,} characters, vocabulary {len(vocab)} | "
            f"{len(train_ids):,} train, {len(val_ids):,} validation")

        # ---- the same initial weights: train() builds LanguageModel(config, vocab, seed) exactly so
        model_cfg = ModelConfig(len(vocab), "lstm", cfg.num_layers, cfg.hidden_size, cfg.embedding_size, 0.0)
        init = LanguageModel(model_cfg, vocab, seed=cfg.seed, dtype=np.float32)
        twin = torch_twin(init)
        batches = Batches(train_ids, cfg.batch_size, cfg.seq_length)
        loss_diff, grad_name, grad_diff = first_step_check(init, twin, batches)
        log(f"first batch: |loss difference| {loss_diff:.2e}, largest relative gradient difference "
            f"{grad_diff:.2e} ({grad_name})")
        del init

        # ---- nanolstm, through the trainer users run
        log(f"nanolstm ({cells} cells, {nanolstm.__version__}) ...")
        t0 = time.perf_counter()
        train(cfg)
        ours_wall = time.perf_counter() - t0
        with open(out_dir / "metrics.jsonl", encoding="utf-8") as f:
            ours = [json.loads(line) for line in f if line.strip()]

        # ---- PyTorch, the same loop by hand
        log(f"pytorch ({torch.__version__}, {torch.get_num_threads()} threads) ...")
        t0 = time.perf_counter()
        theirs = torch_train(twin, train_ids, val_ids, cfg, log)
        theirs_wall = time.perf_counter() - t0

    # ---- compare, point by point
    tokens_per_step = cfg.batch_size * cfg.seq_length
    points = []
    for a, b in zip(ours, theirs, strict=True):
        assert a["step"] == b["step"]
        points.append({"step": a["step"], "nanolstm_val_bpc": a["val_bpc"], "pytorch_val_bpc": b["val_bpc"],
                       "difference": a["val_bpc"] - b["val_bpc"],
                       "nanolstm_train_bpc": a["train_bpc"], "pytorch_train_bpc": b["train_bpc"]})
    worst = max(abs(p["difference"]) for p in points)
    agree = worst <= TOLERANCE_BPC

    def train_tokens_per_s(history):
        """Training throughput over the whole run, evaluations excluded."""
        seconds, prev = 0.0, 0
        for r in history:
            seconds += (r["step"] - prev) * tokens_per_step / r["tokens_per_s"]
            prev = r["step"]
        return prev * tokens_per_step / seconds

    final = LanguageModel.load(out_dir / "last.ckpt")
    weight_name, weight_diff = weight_difference(final, twin)
    sample = final.generate(prime="ROMEO:", length=300, temperature=0.8, seed=0, unknown="skip")[0]
    result = {
        "config": {"data": str(args.data), "quick": args.quick, "characters": int(len(ids)),
                   "vocab_size": len(vocab), "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
                   "model": f"lstm {cfg.num_layers}x{cfg.hidden_size}", "embedding_size": cfg.embedding_size,
                   "seq_length": cfg.seq_length, "batch_size": cfg.batch_size, "optimizer": "adam", "lr": cfg.lr,
                   "grad_clip": cfg.grad_clip, "dtype": cfg.dtype, "dropout": 0.0, "steps": cfg.max_steps,
                   "eval_every": cfg.eval_every, "seed": cfg.seed, "nanolstm_cells": cells},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "first_batch": {"loss_abs_difference": loss_diff, "max_rel_grad_difference": grad_diff,
                        "worst_parameter": grad_name},
        "final_weights": {"max_rel_difference": weight_diff, "worst_parameter": weight_name},
        "points": points,
        "max_abs_difference_bpc": worst, "tolerance_bpc": TOLERANCE_BPC, "agree": agree,
        # wall: from the first training step to the end of the last evaluation (nanolstm's includes
        # writing last.ckpt/best.ckpt at each evaluation); tokens/s: training steps only
        "nanolstm": {"wall_s": ours[-1]["elapsed_s"], "wall_s_with_setup": ours_wall,
                     "train_tokens_per_s": train_tokens_per_s(ours)},
        "pytorch": {"wall_s": theirs[-1]["elapsed_s"], "wall_s_with_setup": theirs_wall,
                    "train_tokens_per_s": train_tokens_per_s(theirs)},
        "sample": {"prime": "ROMEO:", "temperature": 0.8, "seed": 0, "length": 300, "text": sample},
    }
    results_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(report(result))
    print(f"\nwritten: {results_path}")
    return 0 if agree else 1


def report(r):
    c = r["config"]
    lines = [f"\n{c['model']} (embedding {c['embedding_size']}), T={c['seq_length']}, N={c['batch_size']}, "
             f"Adam {c['lr']:g}, clip {c['grad_clip']:g}, {c['dtype']}, {c['steps']} steps, "
             f"{c['characters']:,} characters" + (" (--quick)" if c["quick"] else ""),
             "",
             f"{'step':>6} | {'nanolstm val bpc':>16} | {'PyTorch val bpc':>15} | {'difference':>10}",
             f"{'-' * 6}-+-{'-' * 16}-+-{'-' * 15}-+-{'-' * 10}"]
    for p in r["points"]:
        lines.append(f"{p['step']:>6} | {p['nanolstm_val_bpc']:>16.4f} | {p['pytorch_val_bpc']:>15.4f} | "
                     f"{p['difference']:>+10.1e}")
    lines.append("")
    for name, label in (("nanolstm", f"nanolstm ({c['nanolstm_cells']} cells)"),
                        ("pytorch", f"PyTorch ({r['machine']['torch_threads']} threads)")):
        lines.append(f"{label:<28} wall {r[name]['wall_s']:8.1f} s | "
                     f"{r[name]['train_tokens_per_s']:>9,.0f} training tok/s")
    f, w = r["first_batch"], r["final_weights"]
    lines.append(f"first batch: |loss difference| {f['loss_abs_difference']:.1e}, gradients within "
                 f"{f['max_rel_grad_difference']:.1e} (relative, worst {f['worst_parameter']}); final weights "
                 f"within {w['max_rel_difference']:.1e} (relative, worst {w['worst_parameter']})")
    verdict = "AGREE" if r["agree"] else "DISAGREE"
    lines.append(f"\n{verdict}: largest |difference| {r['max_abs_difference_bpc']:.1e} bpc, tolerance "
                 f"{r['tolerance_bpc']} bpc at every point "
                 f"({'met' if r['agree'] else 'NOT met'} at all {len(r['points'])} points)")
    s = r["sample"]
    lines.append(f"\nsample from nanolstm's final model (prime {s['prime']!r}, temperature {s['temperature']}, "
                 f"seed {s['seed']}):\n{s['prime']}{s['text']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
