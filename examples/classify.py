"""Classify sequences of different lengths with a bidirectional LSTM, trained by hand.

Each sequence is 3 to 20 tokens of 8 kinds, padded with random tokens to the batch's 20 steps; its
label says whether its last token is greater than its first (they always differ). A model that read the padding would see a random
"last" token, so it must use each sequence's length: `forward(x, lengths=...)` runs the sequences
as PyTorch runs packed ones. The final state of the forward direction has just read the last token,
that of the reverse direction the first; a linear layer on both decides.

    python examples/classify.py [--steps 300] [--no-lengths]

It prints the loss and the accuracy on held-out sequences as it trains (a few seconds on 2 cores),
and exits 1 if the held-out accuracy ends below 90% (a coin toss gets 50%: the labels are balanced).
With --no-lengths the model is given no lengths and reads the padding as if it were part of each
sequence: it ends near the 79% that the first token alone gives (a first token of 0 makes any last
one greater), here 80% after 300 steps.
"""

import argparse

import numpy as np

import nanolstm as nl
from nanolstm.optim import Adam, clip_grad_norm

V, T, E, H = 8, 20, 8, 32


def batch(rng, N):
    """Tokens (T, N), lengths (N,), labels (N,): 1 where a sequence's last token is greater than its
    first, for about half of them."""
    tokens = rng.integers(0, V, (T, N))
    lengths = rng.integers(3, T + 1, N)
    last = (tokens[0] + rng.integers(1, V, N)) % V  # any token but the first
    tokens[lengths - 1, np.arange(N)] = last
    return tokens, lengths, (last > tokens[0]).astype(np.int64)


class Classifier(nl.Module):
    def __init__(self, rng):
        super().__init__()
        self.embedding = nl.Embedding(V, E, rng=rng)
        self.lstm = nl.LSTM(E, H, bidirectional=True, rng=rng)
        self.head = nl.Linear(2 * H, 2, rng=rng)
        self.loss = nl.CrossEntropyLoss()
        self.children = {"embedding": self.embedding, "lstm": self.lstm, "head": self.head}

    def forward(self, tokens, lengths, labels):
        """-> (the mean cross-entropy, the logits). lengths None: every sequence taken as T long."""
        _, (h, _) = self.lstm.forward(self.embedding.forward(tokens), lengths=lengths)  # h (2, N, H)
        logits = self.head.forward(np.concatenate([h[0], h[1]], axis=1))  # both directions' final h
        return self.loss.forward(logits, labels), logits

    def backward(self):
        dfeatures = self.head.backward(self.loss.backward())
        dh = np.stack([dfeatures[:, :H], dfeatures[:, H:]])
        dx, _ = self.lstm.backward(np.zeros((T, dh.shape[1], H * 2), np.float32), (dh, np.zeros_like(dh)))
        self.embedding.backward(dx)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-lengths", action="store_true", help="give the model no lengths, to see what they do")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")

    def sample(rng, N):
        tokens, lengths, labels = batch(rng, N)
        return tokens, None if args.no_lengths else lengths, labels

    rng = np.random.default_rng(args.seed)
    model = Classifier(rng)
    params, grads = model.state_dict(), model.named_grads()
    optimizer = Adam(params, grads, lr=1e-2)
    held_out = sample(np.random.default_rng(args.seed + 1), 1000)
    for step in range(1, args.steps + 1):
        model.zero_grad()
        loss, _ = model.forward(*sample(rng, 64))
        model.backward()
        clip_grad_norm(grads, 5.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            _, logits = model.forward(*held_out)
            accuracy = np.mean(logits.argmax(axis=1) == held_out[2])
            print(f"step {step:4d}  loss {loss:.3f}  held-out accuracy {accuracy:.1%}")
    return 0 if accuracy >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
