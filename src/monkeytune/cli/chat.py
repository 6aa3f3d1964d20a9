"""``monkeytune chat --model DIR [--image IMG] [PROMPT]``: answer one prompt, or chat on stdin.

``--questions FILE --answers OUT`` answers a JSONL file of questions in batches instead
(:mod:`monkeytune.eval.batch`). Exit status: 0 on success, 2 when the model folder, image,
questions file or arguments are unusable.
"""

from __future__ import annotations

import argparse
import sys

from monkeytune.cli.options import add_prompt_template


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="model folder (monkeytune or official Monkey/Qwen-VL)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype (default: as stored)")
    p.add_argument("--device", default=None, help="device (default: cuda when available, else cpu)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="answer a prompt about an image, or chat interactively",
        description="Answer PROMPT (streamed) or, without PROMPT, read questions from stdin "
        "(/reset, /image PATH, /quit). ChatML keeps the conversation; the other templates answer "
        "each question on its own. With --questions FILE, answer every question of a JSONL file "
        "(fields image, question, optional question_id) in batches and write the records with an "
        "added answer field to --answers.",
    )
    add_model_args(p)
    p.add_argument("prompt", nargs="?", default=None, help="the question; omit for an interactive chat")
    p.add_argument("--image", default=None, metavar="IMG", help="image file the prompt is about")
    p.add_argument("--questions", default=None, metavar="FILE",
                   help="JSONL of questions (image, question, question_id) to answer in batches")
    p.add_argument("--answers", default=None, metavar="FILE", help="JSONL written with --questions: each record "
                   "plus its answer")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together with --questions")
    add_prompt_template(p)
    p.add_argument("--raw", action="store_true", help="send the text as is (same as --prompt-template raw)")
    p.add_argument("--system", default=None, help="ChatML system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop an answer that takes longer than this (default: no limit)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monkeytune.data.errors import DataError
    from monkeytune.generate import ChatSession, GenerationSettings, load_for_inference, run_interactive
    from monkeytune.limits import GenerationTimeout
    from monkeytune.model.io import ModelFolderError
    from monkeytune.vision.image import ImageLoadError

    template = "raw" if args.raw else args.prompt_template
    if args.questions is not None and (args.answers is None or args.prompt is not None or args.image is not None):
        print("monkeytune chat: --questions needs --answers FILE, and takes no PROMPT or --image "
              "(each question names its image)", file=sys.stderr)
        return 2
    if args.answers is not None and args.questions is None:
        print("monkeytune chat: --answers goes with --questions FILE", file=sys.stderr)
        return 2
    try:
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p,
                                      time_limit_s=args.time_limit)
        settings.kwargs()  # validates the numbers before any work
        if args.questions is not None:
            from monkeytune.eval.batch import answer_questions, read_questions

            records = read_questions(args.questions)  # a bad line is reported before the model loads
            model, tokenizer = load_for_inference(args.model, args.dtype, args.device)
            n = answer_questions(model, tokenizer, records, args.answers, template, settings, args.batch_size)
            print(f"answered {n} questions; written to {args.answers}", file=sys.stderr)
            return 0
        model, tokenizer = load_for_inference(args.model, args.dtype, args.device)
        session = ChatSession(model, tokenizer, template, args.image, settings, args.system)
        if args.prompt is not None:
            session.ask(args.prompt, stream=sys.stdout)
            sys.stdout.write("\n")
            return 0
        run_interactive(session, sys.stdin, sys.stdout, prompt=sys.stderr if sys.stdin.isatty() else None)
        return 0
    except GenerationTimeout as e:
        sys.stdout.write("\n")  # after the text streamed so far
        print(f"monkeytune chat: {e}", file=sys.stderr)
        return 2
    except (ModelFolderError, ImageLoadError, DataError, ValueError, FileNotFoundError) as e:
        print(f"monkeytune chat: {e}", file=sys.stderr)
        return 2
