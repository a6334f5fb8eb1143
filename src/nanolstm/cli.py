"""The command line: `nanolstm train`, `nanolstm sample` and `nanolstm bench`, thin over the library.

`main(argv)` returns the exit status, so tests drive the command line in-process. Bad input gets one
line on stderr and status 2; a run stopped by a signal, 128 + the signal's number.
"""

import argparse
import dataclasses
import math
import os
import sys

from nanolstm.errors import NanolstmError


class UsageError(NanolstmError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (not usage plus a line) and comes back to main()."""

    def error(self, message):
        raise UsageError(f"{message}; see '{self.prog} --help'")


def _train_parser(sub):
    p = sub.add_parser("train", help="train a language model on a text corpus",
                       description="Train a character or word language model. Every option defaults to "
                                   "what nanolstm.TrainConfig says.")
    # default=None everywhere: the trainer fills in defaults, and --resume can tell what was given
    a = p.add_argument
    a("--data", help="UTF-8 text file or folder of .txt files (default: Python's own help texts)")
    a("--out", help="output folder for checkpoints, metrics.jsonl and loss.png (default: out)")
    a("--resume", metavar="DIR|FILE", help="continue the run saved in DIR/last.ckpt or FILE")
    a("--overwrite", action="store_true", default=None,
      help="replace the run that --out holds (its checkpoints, metrics.jsonl and loss.png), once the new run "
           "has checked its input; without it such a folder is refused")
    a("--level", choices=["char", "word"], help="model characters (default) or words")
    a("--min-count", type=int, help="words seen fewer times become <unk> (default 1)")
    a("--model", choices=["lstm", "gru", "rnn"], help="recurrent layer (default lstm)")
    a("--num-layers", type=int, help="stacked recurrent layers (default 2)")
    a("--hidden-size", type=int, help="units per layer (default 256)")
    a("--embedding-size", type=int, help="size of the token embedding (default 64)")
    a("--dropout", type=float, help="dropout between layers and before the decoder (default 0)")
    a("--val-frac", type=float, help="share of the corpus, from its end, kept for validation (default 0.05)")
    a("--batch-size", type=int, help="parallel streams per batch (default 32)")
    a("--seq-length", type=int, help="time steps per batch, the truncation of BPTT (default 64)")
    a("--optimizer", choices=["adam", "adamw", "sgd", "adagrad", "rmsprop"], help="(default adam)")
    a("--lr", type=float, help="learning rate (default 2e-3)")
    a("--lr-schedule", choices=["constant", "step", "cosine"], help="(default constant)")
    a("--warmup", type=int, help="steps of linear learning-rate warm-up (default 0)")
    a("--lr-step-size", type=int, help="steps between decays of the step schedule (default 1000)")
    a("--lr-gamma", type=float, help="decay factor of the step schedule (default 0.5)")
    a("--min-lr", type=float, help="final learning rate of the cosine schedule (default 0)")
    a("--grad-clip", type=float, help="clip gradients to this global norm, 0 for none (default 5)")
    a("--grad-clip-value", type=float, help="clip each gradient entry to +-this instead")
    a("--weight-decay", type=float, help="decoupled for adamw, added to the gradient (L2) for the others "
                                         "(default 1e-2 for adamw, as PyTorch's AdamW; 0 for the others)")
    a("--max-steps", type=int, help="updates to make (default 1500)")
    a("--epochs", type=float, help="passes over the training split, instead of --max-steps (on --resume, "
                                   "either replaces the other)")
    a("--eval-every", type=int, help="steps between evaluations and checkpoints (default 250)")
    a("--sample-length", type=int, help="length of the preview at each evaluation, 0 for none, at most 1,000,000 "
                                       "(default 200)")
    a("--seed", type=int, help="random seed (default 0)")
    a("--on-nan", choices=["stop", "skip"], help="when the loss is NaN: stop (default) or skip the update")
    a("--dtype", choices=["float32", "float64"], help="(default float32)")
    a("--quiet", action=argparse.BooleanOptionalAction, default=None,
      help="print nothing but errors (--no-quiet, the default: progress and previews)")
    a("--plot", action=argparse.BooleanOptionalAction, default=None,
      help="draw loss.png at each evaluation (the default; --no-plot: do not)")
    return p


def _sample_parser(sub):
    p = sub.add_parser("sample", help="generate text from a trained model",
                       description="Generate text. CKPT is a checkpoint file or a run folder (its best.ckpt).")
    a = p.add_argument
    a("checkpoint", metavar="CKPT|DIR")
    a("--length", type=int, default=500, help="tokens to generate (default 500)")
    a("--temperature", type=float, default=1.0, help="below 1: safer, above 1: wilder (default 1)")
    a("--top-k", type=int, help="draw only from the k most likely tokens")
    a("--top-p", type=float, help="draw only from the most likely tokens whose probability reaches p")
    a("--prime", default="", help="text to warm the state on; printed before the sample")
    a("--argmax", action="store_true", help="always take the most likely token")
    a("--seed", type=int, help="random seed: the same seed gives the same text")
    a("--num-samples", type=int, default=1, help="independent samples (default 1)")
    a("--unknown", choices=["error", "skip"], default="error",
      help="prime characters the vocabulary lacks: refuse (default) or skip them (a word model reads "
           "unknown words as <unk>)")
    return p


def build_parser():
    parser = Parser(prog="nanolstm", description="Recurrent language models in NumPy.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _train_parser(sub)
    _sample_parser(sub)
    from nanolstm import bench

    bench.add_parser(sub)
    return parser


def run_train(args):
    from nanolstm.train import Interrupted, TrainConfig, print_stdout, train

    # only the flags given: --resume takes them or checks them against the checkpoint, even when a
    # value is the default
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    config = TrainConfig(**given)
    try:
        result = train(config, given=set(given))
    except Interrupted as e:
        print(f"\nnanolstm: {e}\nresume with: nanolstm train --resume {os.path.dirname(e.path) or '.'}",
              file=sys.stderr)
        return 128 + e.signum
    if not config.quiet:
        if result.val_tokens == 0:
            validation = "no validation split (--val-frac 0)"
        elif math.isinf(result.best_val_loss):
            validation = "no evaluation yet"
        else:
            validation = f"best validation loss {result.best_val_loss:.4f} nats"
        print_stdout(f"done: step {result.step}, {validation}; sample with: nanolstm sample {result.out}")
    return 0


def run_sample(args):
    from nanolstm.model import LanguageModel, stream_to_stdout

    path = args.checkpoint
    if os.path.isdir(path):
        best = os.path.join(path, "best.ckpt")
        path = best if os.path.exists(best) else os.path.join(path, "last.ckpt")
    model = LanguageModel.load(path)
    kwargs = dict(prime=args.prime, length=args.length, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, argmax=args.argmax, seed=args.seed, unknown=args.unknown)
    # printed as the model reads it: without the characters that --unknown skip drops
    prime = model.usable_prime(args.prime, args.unknown) if model.vocab is not None else args.prime
    if args.num_samples == 1:
        # nothing on stdout before generate has checked the options: the prime goes with the first token
        started = False

        def on_text(text):
            nonlocal started
            if not started:
                stream_to_stdout(prime)
                started = True
            stream_to_stdout(text)

        model.generate(**kwargs, on_text=on_text)
        stream_to_stdout(("" if started else prime) + "\n")  # --length 0: the prime alone
        return 0
    for i, text in enumerate(model.generate(**kwargs, num_samples=args.num_samples)):
        stream_to_stdout(f"---- sample {i + 1} ----\n{prime}{text}\n")
    return 0


def main(argv=None):
    """Run the command line with argv (default sys.argv[1:]); return the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            return run_train(args)
        if args.command == "bench":
            from nanolstm import bench

            return bench.run(args)
        return run_sample(args)
    except NanolstmError as e:
        print(f"nanolstm: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nnanolstm: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("nanolstm: error: out of memory; use a smaller model, batch, corpus or --length", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output went away (| head): nothing more to say
        sys.stderr.close()
        return 0
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
