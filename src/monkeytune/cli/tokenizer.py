"""``monkeytune tokenizer train FILE... --vocab-size N --out DIR``: a tokenizer for a new task's vocabulary.

Exit status: 0 on success, 2 when the data, the vocabulary size or the output folder is unusable
(one line naming the file, line and field of a bad record).
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a tokenizer on a data set")
    tok_sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tok_sub.required = True
    t = tok_sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on the text of data files",
        description="Train monkeytune's byte-level BPE tokenizer on the user and assistant text of "
        "conversation files (any format training reads: monkey, llava, sharegpt, openai) and write "
        "it to --out. Use that folder as model.tokenizer of a preset/config model; the model's "
        "vocabulary size and image token ids then follow the tokenizer.",
    )
    t.add_argument("files", nargs="+", metavar="FILE", help="data file(s)")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="largest vocabulary, special tokens included (at least 268)")
    t.add_argument("--out", required=True, metavar="DIR", help="folder to write the tokenizer into")
    t.add_argument("--min-frequency", type=int, default=2, metavar="K",
                   help="pairs seen fewer than K times are not merged (default 2)")
    t.add_argument("--template", default="monkey", choices=["monkey", "chatml"],
                   help="conversation template training will use (chatml adds its role headers to the text)")
    t.add_argument("--format", default="auto", choices=["auto", "monkey", "llava", "sharegpt", "openai"],
                   help="record layout (default: auto, detected per file; see docs/data.md)")
    t.add_argument("--image-root", default=None, metavar="DIR",
                   help="folder relative image paths resolve against (images are not opened)")
    t.add_argument("--allow-empty-answers", action="store_true", help="accept assistant turns without text")
    t.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from monkeytune.data.errors import DataError
    from monkeytune.tokenizer.training import train_tokenizer

    try:
        report = train_tokenizer(args.files, args.out, args.vocab_size, args.min_frequency, args.format,
                                 args.template, args.image_root, args.allow_empty_answers, args.overwrite)
    except FileExistsError as e:
        print(f"monkeytune tokenizer train: {e} (--overwrite)", file=sys.stderr)
        return 2
    except (DataError, ValueError, OSError) as e:
        print(f"monkeytune tokenizer train: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
