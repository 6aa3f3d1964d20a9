"""A small synthetic conversation dataset with real images, for CPU examples, tests and benchmarks.

Each image is a coloured shape on a coloured background; questions ask for the shape, its
colour or a caption, so a tiny model visibly learns (the loss falls well below the
unconditional entropy only by looking at the image). A fifth of the samples are text-only
arithmetic, which exercises batches without images. A byte-level BPE tokenizer is trained on
the texts and written beside the data, so the whole thing is self-contained.

Layout written by :func:`write_synthetic_dataset`::

    <folder>/train.jsonl        conversation records (the file you name)
    <folder>/images/00000.png   one image per image sample
    <folder>/tokenizer/         a SimpleTokenizer (load with monkeytune.tokenizer.loading)
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle")


def draw_shape(shape: str, colour: str, background: str, size: int) -> Image.Image:
    """An RGB ``size x size`` image of one filled shape centred on a plain background."""
    img = Image.new("RGB", (size, size), COLOURS[background])
    d = ImageDraw.Draw(img)
    m = size // 5
    box = (m, m, size - m, size - m)
    if shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=COLOURS[colour])
    return img


def _record(i: int, rng: random.Random, folder: Path, image_size: int) -> dict:
    if rng.random() < 0.2:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return {
            "id": f"syn-{i:05d}",
            "conversations": [
                {"from": "user", "value": f"What is {a} plus {b}? Answer:"},
                {"from": "assistant", "value": f" {a + b}"},
            ],
        }
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(sorted(COLOURS), 2)
    rel = f"images/{i:05d}.png"
    draw_shape(shape, colour, background, image_size).save(folder / rel)
    kind = rng.randrange(3)
    if kind == 0:
        turns = [("What colour is the shape? Answer:", f" {colour}")]
    elif kind == 1:
        turns = [("Which shape is it? Answer:", f" a {shape}")]
    else:
        turns = [("Describe the image.", f" a {colour} {shape} on a {background} background")]
    if rng.random() < 0.25:  # a second exchange about the same image
        turns.append(("And the background? Answer:", f" {background}"))
    conv = []
    for k, (q, a) in enumerate(turns):
        prefix = f"<img>{rel}</img> " if k == 0 else ""
        conv += [{"from": "user", "value": prefix + q}, {"from": "assistant", "value": a}]
    return {"id": f"syn-{i:05d}", "conversations": conv}


def write_synthetic_dataset(
    train_file: str | os.PathLike,
    num_samples: int,
    seed: int = 0,
    image_size: int = 48,
    vocab_size: int = 400,
) -> Path:
    """Write ``num_samples`` records to ``train_file`` with their images and a tokenizer.

    Args:
        train_file: The JSON Lines file to create; images and the tokenizer go beside it.
        num_samples: Number of records.
        seed: Seed of the contents (the same seed writes the same files).
        image_size: Side of the square images in pixels.
        vocab_size: Upper bound of the tokenizer vocabulary.

    Returns:
        The tokenizer folder.
    """
    from monkeytune.tokenizer.simple import SimpleTokenizer

    train_file = Path(train_file)
    folder = train_file.parent
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = [_record(i, rng, folder, image_size) for i in range(num_samples)]
    texts = [t["value"].split("</img>")[-1] for r in records for t in r["conversations"]]
    tok = SimpleTokenizer.train(texts * 4, vocab_size=vocab_size)
    tok_dir = tok.save(folder / "tokenizer")
    tmp = train_file.with_suffix(train_file.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, train_file)  # the data file appears last and whole: it marks completion
    return tok_dir
