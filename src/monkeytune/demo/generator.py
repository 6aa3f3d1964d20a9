"""Write the demo data set: scene images, training conversations, evaluation questions, tokenizer.

Layout of the output folder::

    images/{train,val,test}/00000.png   one scene per image (lossless PNG: the detail is 1 pixel)
    train.jsonl                         one question per conversation, fine and coarse, shuffled
    train_fine.jsonl                    the fine questions of train.jsonl
    train_coarse.jsonl                  the coarse questions of train.jsonl
    train_questions.jsonl               the training questions in the evaluation layout (for probes)
    val.jsonl, test.jsonl               evaluation questions, one per line (with ``kind``)
    scenes.jsonl                        what each image shows (split, image, parts)
    tokenizer/                          a SimpleTokenizer trained on every phrase the data uses
    meta.json                           generator parameters and counts

A training record is one question about one image, laid out exactly like an evaluation prompt
of the ``vqa-question-first`` template (``QUESTION <img>PATH</img> Answer: ``). The layout is
what lets a model trained from scratch learn, within a CPU budget, to send the region words to
the right window's tokens:

* the question comes before the image, so the visual tokens can attend to the region words and
  the answer only has to pick out the tokens that flagged themselves;
* every question has the same number of tokens (two wordings per kind, checked by the tests),
  and there is one question per record, so each window's tokens sit at fixed (rotary, hence
  relative) distances from the region words and from the answer.

Every training image is asked all eight questions (four regions, fine and coarse), as eight
records. Each record names the 2x2 window that shows its answer (``window``, row-major), which
the vision warm-up before stage 1 trains on (the ``window_answer`` objective,
:mod:`monkeytune.train.objectives`). Evaluation
records follow the Monkey VQA layout (``question_id``, ``image``, ``question``, ``answer``) plus
``kind`` (``fine``/``coarse``) and ``region``.

Splits never share an image nor an image content: every scene's ``content_key`` (its colours
and textures) is unique across the whole data set, so no (content, question) pair repeats. The
digits task (``task="digits"``, :mod:`monkeytune.demo.digits`) draws its test scenes from 200
handwritten digits that no training or validation scene uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from monkeytune.demo import digits as digits_task
from monkeytune.demo.scene import COLOURS, REGIONS, TEXTURES, Scene, random_scene, render_scene
from monkeytune.prompts import user_text
from monkeytune.tokenizer.simple import SimpleTokenizer

PROMPT_TEMPLATE = "vqa-question-first"
KINDS = ("fine", "coarse")
COARSE_QUESTIONS = ("What colour is the {region} part?", "Which colour has the {region} part?")
SPLITS = ("train", "val", "test")
TOKENIZER_VOCAB = 400


@dataclass(frozen=True)
class Task:
    """One embedded task: what the fine question asks, and how its scenes are drawn.

    Attributes:
        name: ``textures`` (synthetic 1-pixel textures) or ``digits`` (UCI handwritten digits).
        fine_questions: Wordings of the fine question; every wording has as many tokens as the
            coarse ones (the tests check it).
        fine_answers: Every fine answer.
        scenes: ``(rng, counts per split, image size) -> scenes per split``, pairwise different.
        render: ``(scene, image size) -> RGB image``.
    """

    name: str
    fine_questions: tuple[str, ...]
    fine_answers: tuple[str, ...]
    scenes: Callable[[np.random.Generator, dict[str, int], int], dict[str, list]]
    render: Callable[[Any, int], Image.Image]

    @property
    def questions(self) -> dict[str, tuple[str, ...]]:
        return {"fine": self.fine_questions, "coarse": COARSE_QUESTIONS}


def texture_scenes(rng: np.random.Generator, counts: dict[str, int], size: int) -> dict[str, list[Scene]]:
    """Texture scenes per split, no content shared between any two."""
    scenes = unique_scenes(rng, sum(counts.values()), size)
    out, start = {}, 0
    for split in SPLITS:
        out[split] = scenes[start : start + counts[split]]
        start += counts[split]
    return out


TASKS: dict[str, Task] = {
    "textures": Task("textures", ("What pattern is the {region} part?", "Which texture has the {region} part?"),
                     TEXTURES, texture_scenes, render_scene),
    "digits": Task("digits", ("What digit marks the {region} part?", "Which digit has the {region} part?"),
                   digits_task.DIGITS, digits_task.digit_scenes, digits_task.render_digit_scene),
}
# The texture task's questions (kept under their old name for the tests and the report).
QUESTIONS: dict[str, tuple[str, ...]] = TASKS["textures"].questions


@dataclass(frozen=True)
class DemoData:
    """Paths and counts of a generated data set (see the module docstring for the layout)."""

    root: Path
    train: Path
    train_fine: Path
    train_coarse: Path
    val: Path
    test: Path
    tokenizer: Path
    counts: dict

    @classmethod
    def at(cls, root: str | Path) -> "DemoData":
        """The data set already written in ``root`` (reads ``meta.json``)."""
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root} holds no demo data set (no meta.json)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return cls._paths(root, meta["counts"])

    @classmethod
    def _paths(cls, root: Path, counts: dict) -> "DemoData":
        return cls(
            root=root,
            train=root / "train.jsonl",
            train_fine=root / "train_fine.jsonl",
            train_coarse=root / "train_coarse.jsonl",
            val=root / "val.jsonl",
            test=root / "test.jsonl",
            tokenizer=root / "tokenizer",
            counts=counts,
        )


def question_text(kind: str, region: str, variant: int = 0, task: str = "textures") -> str:
    """The ``variant``-th wording of a ``fine`` or ``coarse`` question about ``region``."""
    wordings = TASKS[task].questions[kind]
    return wordings[variant % len(wordings)].format(region=region)


def prompt(question: str, image: str) -> str:
    """The user turn of a training record: the :data:`PROMPT_TEMPLATE` layout that evaluation uses."""
    return user_text(PROMPT_TEMPLATE, question, image)


def tokenizer_corpus(task: str = "textures") -> list[str]:
    """Every text piece the data can produce, split at the image the way the ``monkey`` template encodes it."""
    pieces: list[str] = []
    for kind in KINDS:
        for variant in range(len(TASKS[task].questions[kind])):
            for region in REGIONS:
                before, after = prompt(question_text(kind, region, variant, task), "x").split("<img>x</img>")
                pieces += [before, after]
    answers = list(TASKS[task].fine_answers) + list(COLOURS)
    # Repeat so that every word reaches the merge threshold even when it occurs once.
    return pieces * 2 + answers * 4


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB, task: str = "textures") -> SimpleTokenizer:
    """A byte-level BPE tokenizer whose merges cover the task's questions and answers."""
    return SimpleTokenizer.train(tokenizer_corpus(task), vocab_size=vocab_size)


def _question_record(sid: str, image: str, scene: Scene, kind: str, region: str, rng: np.random.Generator,
                     task: str) -> dict:
    """A one-question training conversation about ``region`` of ``scene``."""
    q = question_text(kind, region, int(rng.integers(len(TASKS[task].questions[kind]))), task)
    return {
        "id": f"{sid}-{kind}-{region}",
        "kind": kind,
        # The grid window (row-major) that shows the answer: what the vision warm-up trains on.
        "window": REGIONS.index(region),
        "conversations": [
            {"from": "user", "value": prompt(q, image)},
            {"from": "assistant", "value": scene.answer(region, kind)},
        ],
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def unique_scenes(rng: np.random.Generator, count: int, size: int) -> list[Scene]:
    """``count`` random scenes with pairwise different content keys."""
    combos = (len(COLOURS) * len(TEXTURES)) ** len(REGIONS)
    if count > combos // 2:
        raise ValueError(f"asked for {count} scenes; only {combos} distinct contents exist")
    seen: set = set()
    scenes: list[Scene] = []
    while len(scenes) < count:
        scene = random_scene(rng, size)
        key = scene.content_key()
        if key not in seen:
            seen.add(key)
            scenes.append(scene)
    return scenes


def generate_dataset(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 400,
    n_val: int = 24,
    n_test: int = 48,
    image_size: int = 224,
    progress: bool = True,
    task: str = "textures",
) -> DemoData:
    """Render the scenes and write the data set described in the module docstring.

    Args:
        out_dir: Output folder (created; existing demo files in it are overwritten).
        seed: Seed of everything drawn (scenes, question order and wording): the same seed
            gives byte-identical files.
        n_train, n_val, n_test: Images per split. Every image yields 8 questions (4 regions,
            fine and coarse): training records or evaluation questions.
        image_size: Side of the images; the model canvas of a 2x2 grid (``2 * window_size``),
            so that the windows are exact crops and the global view a 2x downsample.
            The demo model uses 112-pixel views, hence 224.
        progress: Show a progress bar while rendering.
        task: A key of :data:`TASKS`: what the fine questions ask.

    Returns:
        :class:`DemoData` with the paths and counts.
    """
    root = Path(out_dir)
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; choose one of {sorted(TASKS)}")
    spec = TASKS[task]
    rng = np.random.default_rng(seed)
    scenes = spec.scenes(rng, counts, image_size)
    records: dict[str, list[dict]] = {"train": [], "train_fine": [], "train_coarse": [], "train_questions": [],
                                      "val": [], "test": []}
    scene_rows: list[dict] = []
    bar = tqdm(total=sum(counts.values()), desc=f"demo data ({task})", unit="img", disable=not progress)
    for split in SPLITS:
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for idx, scene in enumerate(scenes[split]):
            rel = f"images/{split}/{idx:05d}.png"
            # compress_level=1: much faster than the default and still lossless.
            spec.render(scene, image_size).save(root / rel, compress_level=1)
            scene_rows.append({"split": split, "image": rel, "parts": scene.to_dict()})
            sid = f"{split}-{idx:05d}"
            if split == "train":
                for kind in KINDS:
                    for region in REGIONS:
                        records["train"].append(_question_record(sid, rel, scene, kind, region, rng, task))
                        # The same questions in the evaluation layout (one wording), for probes.
                        records["train_questions"].append({
                            "question_id": f"{sid}-{kind}-{region}", "image": rel,
                            "question": question_text(kind, region, 0, task), "answer": scene.answer(region, kind),
                            "kind": kind, "region": region,
                        })
            else:
                for kind in KINDS:
                    for region in REGIONS:
                        records[split].append({
                            "question_id": f"{sid}-{kind}-{region}",
                            "image": rel,
                            "question": question_text(kind, region, int(rng.integers(len(spec.questions[kind]))),
                                                      task),
                            "answer": scene.answer(region, kind),
                            "kind": kind,
                            "region": region,
                        })
            bar.update(1)
    bar.close()
    # Shuffle once here (seeded) so that the files read well and any prefix is a fair sample.
    order = rng.permutation(len(records["train"]))
    records["train"] = [records["train"][int(i)] for i in order]
    for kind in KINDS:
        records[f"train_{kind}"] = [r for r in records["train"] if r["kind"] == kind]
    data = DemoData._paths(root, counts)
    for name, recs in records.items():
        _write_jsonl(root / f"{name}.jsonl", recs)
    _write_jsonl(root / "scenes.jsonl", scene_rows)
    build_tokenizer(task=task).save(data.tokenizer)
    meta = {
        "task": task,
        "seed": seed,
        "image_size": image_size,
        "counts": counts,
        "questions": {name: len(recs) for name, recs in records.items()},
        "prompt_template": PROMPT_TEMPLATE,
        "fine_answers": list(spec.fine_answers),
        "colours": list(COLOURS),
        "regions": list(REGIONS),
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return data
