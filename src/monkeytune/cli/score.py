"""``monkeytune score --model DIR --prompt P --answer A``: log-probability of an answer given a prompt.

Prints one line per answer token (id, log-prob, text) and the sum and mean negative log-likelihood,
or JSON with ``--json``. Exit status 2 when the inputs are unusable.

The prompt is the question: the template wraps it (and ``--image``) the way the model was
trained. A prompt written out in full in the template's own layout (ending with ``Answer:``
under ``vqa``) is recognised and used as the complete user turn, not wrapped a second time;
``--raw`` takes the prompt exactly as given in every case.
"""

from __future__ import annotations

import argparse
import json
import sys

from monkeytune.cli.chat import add_model_args
from monkeytune.cli.options import add_prompt_template


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="log-probability of an answer given a prompt",
        description="Tokenise the prompt (laid out by --prompt-template) and the answer separately, "
        "concatenate them and report each answer token's log-probability. A prompt already written in the "
        "template's layout (e.g. '<img>a.png</img> What is it? Answer: ' under vqa) is used as the complete "
        "user turn, not wrapped again.",
    )
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--answer", required=True, help="the answer to score")
    p.add_argument("--image", default=None, metavar="IMG", help="image the prompt is about")
    add_prompt_template(p, help="how the prompt is laid out (default: the layout the model folder records; "
                        "raw takes the prompt as given, image tag in front)")
    p.add_argument("--raw", action="store_true", help="take the prompt exactly as given (same as --prompt-template raw)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monkeytune.generate import load_for_inference, score_answer
    from monkeytune.model.io import ModelFolderError
    from monkeytune.vision.image import ImageLoadError

    try:
        model, tokenizer = load_for_inference(args.model, args.dtype, args.device)
        template = "raw" if args.raw else args.prompt_template
        result = score_answer(model, tokenizer, args.prompt, args.answer, args.image, template)
    except (ModelFolderError, ImageLoadError, ValueError, FileNotFoundError) as e:
        print(f"monkeytune score: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    for tok in result["tokens"]:
        print(f"{tok['id']:>8}  {tok['logprob']:>10.4f}  {tok['text']!r}")
    print(f"sum log-prob {result['sum_logprob']:.4f}  mean NLL {result['mean_nll']:.4f}  tokens {result['num_tokens']}")
    return 0
