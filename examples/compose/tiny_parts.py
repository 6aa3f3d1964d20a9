"""Tiny random part folders and data for rehearsing docs/compose.md on a CPU (nothing is downloaded).

    python examples/compose/tiny_parts.py runs/compose-tiny

writes, under the folder given:

* ``clip/``: a CLIP vision encoder (2 layers, width 32, 56 px images, 14 px patches);
* ``qwen2/``: a Qwen2 causal LM (2 layers, width 64) with a byte-level BPE tokenizer that has the
  ChatML tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``;
* ``images/``: four coloured shapes; ``captions.jsonl`` (stage 1) and ``vqa.jsonl`` (stage 2 and eval).

The weights are random: the commands run end to end, the answers are noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SHAPES = [("red", "circle"), ("blue", "square"), ("green", "circle"), ("yellow", "square")]


def write_parts(root: Path) -> None:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
    CLIPVisionModel(vision).save_pretrained(root / "clip")

    texts = [f"a {c} {s}" for c, s in SHAPES] + ["describe the image", "what shape is it", "what colour is it"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=2048))
    llm.save_pretrained(root / "qwen2")
    tokenizer.save_pretrained(root / "qwen2")


def write_data(root: Path) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    captions, vqa = [], []
    for i, (colour, shape) in enumerate(SHAPES):
        image = Image.new("RGB", (112, 112), "white")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)([24, 24, 88, 88], fill=colour)
        path = f"images/{colour}_{shape}.png"
        image.save(root / path)
        captions.append({"id": f"c{i}", "conversations": [
            {"from": "user", "value": f"<img>{path}</img> Describe the image briefly."},
            {"from": "assistant", "value": f"a {colour} {shape}"}]})
        for j, (question, answer) in enumerate([("What shape is it?", shape), ("What colour is it?", colour)]):
            vqa.append({"id": f"q{i}-{j}", "conversations": [
                {"from": "user", "value": f"<img>{path}</img> {question}"},
                {"from": "assistant", "value": answer}]})
    for name, records in (("captions.jsonl", captions * 2), ("vqa.jsonl", vqa)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/compose-tiny")
    write_parts(out)
    write_data(out)
    print(f"wrote tiny parts and data to {out}")
