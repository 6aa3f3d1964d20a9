"""``monkeytune export --model DIR --to official|monkeytune|hf-llm OUT``: convert a model folder.

``hf-llm`` writes the LLM alone as a plain transformers ``Qwen2ForCausalLM`` folder with a
``PreTrainedTokenizerFast`` (ChatML chat template); see :mod:`monkeytune.model.hf_export`.

Exit status 2 when the folder cannot be read or the model cannot be expressed in the target layout.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="convert a model folder to the official Monkey/Qwen-VL layout or to monkeytune's",
        description="Read a monkeytune or official folder and write it in the other (or the same) "
        "layout. The official layout holds weights, config.json and qwen.tiktoken; copy the "
        "official Python files next to them to run the official code.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="source folder")
    p.add_argument("--to", required=True, choices=["official", "monkeytune", "hf-llm"],
                   help="target layout (hf-llm: the LLM alone as a plain transformers folder)")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--model-type", choices=["monkey", "qwen"], default=None,
                   help="official model_type (default: the source's, or from the view layout)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype of the output (default: as stored)")
    p.add_argument("--no-merge-lora", dest="merge_lora", action="store_false",
                   help="hf-llm: write the base LLM and the peft adapter in OUT/llm_lora instead of merging it")
    p.add_argument("--bin", action="store_true", help="official: write pytorch_model.bin instead of safetensors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from monkeytune.generate import DTYPES
    from monkeytune.model.hf_export import export_hf_llm, unmerged_adapter
    from monkeytune.model.io import ModelFolderError, load_model, save_model
    from monkeytune.model.official import export_official

    try:
        model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
        if args.to == "official":
            export_official(model, args.out, model_type=args.model_type, tokenizer=tokenizer,
                            safe_serialization=not args.bin)
        elif args.to == "hf-llm":
            export_hf_llm(model, args.out, tokenizer=tokenizer, merge_lora=args.merge_lora,
                          adapter=unmerged_adapter(args.model, model))
        else:
            save_model(model, args.out, tokenizer=tokenizer)
    except (ModelFolderError, ValueError, FileNotFoundError) as e:
        print(f"monkeytune export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} folder {args.out}")
    return 0
