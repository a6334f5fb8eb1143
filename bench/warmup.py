"""How a sample's start state matters: a trained model's loss just after a zero state, after a line
break, and after the true context.

    python bench/warmup.py bench/results/quality-nanolstm/last.ckpt     # a checkpoint of bench/quality.py

A model trained with its state carried from batch to batch (truncated BPTT, as nanolstm trains) sees
a zero state only in its first steps. generate() therefore warms the state on a line break before
the prime. This measures why: from --starts random places in the validation split (the last 5% of
the corpus), the model reads the text from there on, from each start state, and its loss over the
next --length tokens is averaged per place. The table gives the mean over places, the 90th
percentile, the worst place and how many places averaged more than 3 nats: a sample that derails.
"""

import argparse
import pathlib

import numpy as np

from nanolstm import LanguageModel
from nanolstm.functional import cross_entropy_forward

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare.txt"


def losses(model, ids, places, length, before):
    """Mean loss over the `length` tokens after each place, having read `before` (T0, N) first."""
    x = np.stack([ids[p : p + length + 1] for p in places], axis=1)  # (length + 1, N)
    x = np.concatenate([before, x]).astype(np.int64)
    logits, _ = model.forward(x[:-1])
    T0 = len(before)
    out = np.empty(len(places))
    for n in range(len(places)):  # per place, over the predictions of the text after it
        out[n], _ = cross_entropy_forward(logits[T0:, n : n + 1], x[T0 + 1 :, n : n + 1])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", default=str(DEFAULT_DATA), help=f"corpus (default: {DEFAULT_DATA})")
    p.add_argument("--starts", type=int, default=256, help="places in the validation split")
    p.add_argument("--length", type=int, default=40, help="tokens scored after each place")
    p.add_argument("--context", type=int, default=200, help="tokens of true context, for comparison")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model = LanguageModel.load(args.checkpoint).eval()
    vocab = model.vocab
    text = pathlib.Path(args.data).read_text(encoding="utf-8")
    ids = vocab.encode(text[int(len(text) * 0.95) :])
    places = np.random.default_rng(args.seed).integers(args.context, len(ids) - args.length - 1, args.starts)
    N = len(places)
    starts = {"zero state": np.zeros((0, N), np.int64)}
    if "\n" in vocab.index:
        starts["a line break (generate)"] = np.full((1, N), vocab.index["\n"])
    starts[f"{args.context} tokens of the text"] = np.stack([ids[q - args.context : q] for q in places], axis=1)

    print(f"{args.checkpoint}: loss in nats over the {args.length} tokens after {N} places")
    print(f"{'start':<28}{'mean':>8}{'p90':>8}{'worst':>8}{'> 3 nats':>10}")
    for name, before in starts.items():
        loss = losses(model, ids, places, args.length, before)
        print(f"{name:<28}{loss.mean():>8.3f}{np.percentile(loss, 90):>8.3f}{loss.max():>8.2f}"
              f"{int((loss > 3).sum()):>10}")


if __name__ == "__main__":
    main()
