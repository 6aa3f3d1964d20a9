"""``monkeytune eval``: generate answers for a Monkey-format JSONL file and score them.

``--predictions FILE`` scores an existing predictions file without a model. Exit status 2 when
the data, predictions or model folder are unusable.
"""

from __future__ import annotations

import argparse
import json
import sys

from monkeytune.cli.options import add_prompt_template


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate on a JSONL file of questions (or score existing predictions)",
        description="Each line of --data holds image, question, answer (string or list) and "
        "question_id; image paths are relative to the data file. Conversation records in any "
        "training format (monkey, llava, sharegpt, openai) work too: the first user turn is the "
        "question, the first answer the reference. Writes predictions.jsonl and "
        "metrics.json to --out and prints the metrics.",
    )
    p.add_argument("--model", default=None, metavar="DIR", help="model folder (not needed with --predictions)")
    p.add_argument("--data", default=None, metavar="FILE", help="questions to answer (JSONL, or conversations in any training format)")
    p.add_argument("--predictions", default=None, metavar="FILE",
                   help="score this predictions JSONL (prediction + answer, or the official answer + annotation)")
    p.add_argument("--metric", action="append", default=None, metavar="NAME",
                   help="metric to compute (repeatable; default vqa_score and exact_match)")
    p.add_argument("--batch-size", type=int, default=8)
    add_prompt_template(p)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit (default: the longest reference's tokens + 4, at least 8)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop a batch whose answers take longer than this (default: no limit)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for predictions.jsonl and metrics.json")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monkeytune.eval.metrics import METRICS, compute_metrics
    from monkeytune.eval.runner import (
        DEFAULT_METRICS,
        EvalDataError,
        evaluate,
        read_eval_records,
        read_predictions,
        write_results,
    )
    from monkeytune.limits import GenerationTimeout
    from monkeytune.model.io import ModelFolderError
    from monkeytune.vision.image import ImageLoadError

    metrics = args.metric or list(DEFAULT_METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        print(f"monkeytune eval: unknown metric(s) {unknown}; known: {', '.join(sorted(METRICS))}", file=sys.stderr)
        return 2
    try:
        if args.predictions:
            if args.data or args.model:
                raise ValueError("--predictions scores an existing file: drop --data/--model")
            preds, refs = read_predictions(args.predictions)
            predictions, scores = None, compute_metrics(metrics, preds, refs)
        else:
            if not (args.data and args.model):
                raise ValueError("give --model and --data (or --predictions FILE)")
            from monkeytune.generate import default_template, load_for_inference

            records = read_eval_records(args.data)
            model, tokenizer = load_for_inference(args.model, args.dtype, args.device)

            def progress(done: int, total: int) -> None:
                print(f"\r{done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

            template = args.prompt_template or default_template(model, args.model)
            predictions, scores = evaluate(model, tokenizer, records, metrics, args.batch_size, template,
                                           args.max_new_tokens, progress=progress, time_limit_s=args.time_limit)
    except (EvalDataError, ModelFolderError, ImageLoadError, ValueError, FileNotFoundError, GenerationTimeout) as e:
        print(f"monkeytune eval: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_results(args.out, predictions, scores)
    print(json.dumps(scores, indent=2))
    return 0
