"""The demo run: data, two warm-ups, three trainings, evaluation, report, for one task (``textures`` or ``digits``).

1. ``stage1``: the demo model (2x2 windows + global view) trained from scratch with the ``full``
   policy on one-question records mixing fine (texture or digit) and coarse (colour) questions,
   after a grounded vision warm-up on the same records, a run of its own with the
   ``window_answer`` objective (:mod:`monkeytune.train.objectives`): the tower and resampler
   first learn to tell the answers apart from the window each record names, then stage 1 starts
   from that run's folder and the LLM learns to route the questions to them;
2. ``stage2``: that model fine-tuned the Monkey way, ``monkey-fix-llm`` (LLM frozen; per-window
   LoRA and resampler train), on fine questions only;
3. ``baseline``: the same architecture with a single global view (grid ``[0, 0]``), trained like
   stage 1 (its warm-up on the global view) for as many steps as stages 1 and 2 together;
4. every model is evaluated with :func:`monkeytune.eval.runner.evaluate` on the held-out test
   split, exact match per question kind, and its visual tokens are probed
   (:mod:`monkeytune.eval.probe`); before training, a pixel-level classifier checks that the fine
   detail is readable in the windows and not in the global view (:mod:`monkeytune.demo.visibility`);
5. models, ``metrics.json``, ``loss_curves.png`` and ``examples.png`` land in the output folder.

Training goes through :func:`monkeytune.train.loop.train` with ordinary run configurations
(written to each run folder as ``config.yaml``), so every stage can be reproduced with
``monkeytune train``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monkeytune.config import ModelConfig, get_config
from monkeytune.demo.generator import PROMPT_TEMPLATE, DemoData, generate_dataset
from monkeytune.model.spec import ModelSpec

STAGES = ("baseline", "stage1", "stage2")
LABELS = {
    "baseline": "baseline: global view only, full",
    "stage1": "step 1: 2x2 + global, full",
    "stage2": "step 2: monkey-fix-llm on fine",
}
# Per task: the tiled model's fine accuracy, the global-only ceiling (a texture is one of 3, a
# digit one of 10), the coarse points the fix-LLM stage may lose, and the wall time on 2 CPU cores.
TARGETS = {
    "textures": {"stage2_fine_min": 0.95, "baseline_fine_max": 0.60, "coarse_drop_max": 0.02, "wall_seconds_max": 600},
    "digits": {"stage2_fine_min": 0.90, "baseline_fine_max": 0.40, "coarse_drop_max": 0.02, "wall_seconds_max": 600},
}


def demo_model_config(grid: tuple[int, int] = (2, 2)) -> ModelConfig:
    """The demo model: the ``tiny`` vision tower on 112-pixel views and a wider, deeper tiny LLM.

    * 112-pixel views (a 224-pixel canvas for the 2x2 grid) cut into 28-pixel patches: 16
      patches per view keep the vision tower cheap, and a 28x28 patch embedding still sees the
      1-pixel texture of every window.
    * 4 resampler queries per view: 20 visual tokens per image, so the LLM sequence is short.
    * An LLM of width 256 with 4 layers and 8 heads: the 2-layer LLM of ``tiny`` does not
      learn, within a CPU budget, to send the region words of a question to the right window's
      tokens; this one does.
    * ``vision.output_scale = 0.2``: visual tokens of norm ~3 instead of ~16 next to text
      embeddings of norm ~0.3. With full-size tokens the LLM is still far from routing the
      questions after 350 steps; scaled, it learns it within about 200.
    * No adapter dropout: drawing its masks was 5% of a training step on the CPU.

    ``grid = (0, 0)`` gives the single-view baseline (no windows, hence no per-window adapters).
    Vocabulary and image token ids are taken from the tokenizer when training resolves the
    model spec (:func:`monkeytune.model.spec.resolve_model`), and logged.
    """
    cfg = get_config("tiny")
    cfg.name = "demo" if tuple(grid) != (0, 0) else "demo-global-only"
    cfg.image.grid = [int(grid[0]), int(grid[1])]
    cfg.image.window_size = 112
    cfg.vision.patch_size = 28
    cfg.vision.n_queries = 4
    cfg.vision.output_dim = 256
    cfg.vision.resampler_heads = 8
    cfg.llm.hidden_size = 256
    cfg.llm.num_layers = 4
    cfg.llm.num_heads = cfg.llm.num_kv_heads = 8
    cfg.llm.intermediate_size = 768
    cfg.vision.output_scale = 0.2
    cfg.vision.lora_dropout = 0.0
    if tuple(grid) == (0, 0):
        cfg.vision.lora_slots = 0
    return cfg


@dataclass
class DemoSettings:
    """Everything the run depends on; the defaults are the documented demo.

    Attributes:
        out_dir: Output folder.
        task: The embedded task (a key of :data:`monkeytune.demo.generator.TASKS`).
        seed: Seed of the data, the initialisation and the data order.
        n_train, n_val, n_test: Images per split (8 questions each).
        steps1, steps2: Optimizer steps of stages 1 and 2; the baseline runs ``steps1 + steps2``.
        batch_size: Questions per optimizer step.
        lr1: Peak learning rate of the LLM in stage 1 and the baseline.
        vision_warmup_steps: Steps of the vision warm-up run before stage 1 and the baseline
            (batches of ``batch_size`` records).
        warmup_lr, warmup_vision_lr: Peak rates of the warm-up: the resampler and the
            objective's head, and the tower with its adapters (1e-4 and above lose the digits),
            decayed to zero on a cosine.
        vision_lr1: Peak learning rate of the vision tower and its adapters in stage 1 and the
            baseline. The digits are lost at 1e-4 and above (``bench/vision_direct.py``).
        resampler_lr1: Peak learning rate of the resampler in stage 1 and the baseline: slow
            enough that the LLM's loss does not wash out what the warm-up taught it (at 1e-3,
            from scratch, it keeps only the colours).
        lr2: Peak learning rate of stage 2 (adapters and resampler), the official Monkey
            fine-tuning rate. The resampler is shared with the global view: trained on fine
            questions alone at 1e-4 it loses a quarter of the coarse answers, at 1e-3 nearly all.
        eval_batch_size: Questions generated together during evaluation.
        threads: ``torch.set_num_threads`` (None: leave torch's default).
        progress: Progress bars.
        examples: Test images drawn in ``examples.png``.
        probe_records: Training questions the linear probes of the visual tokens are fitted on.
        probe_steps: L-BFGS iterations of each probe fit.
        visibility_scenes: Training scenes the pixel-level visibility classifier is fitted on.
    """

    out_dir: Path = Path("outputs/demo")
    task: str = "textures"
    seed: int = 0
    n_train: int = 1500
    n_val: int = 24
    n_test: int = 48
    steps1: int = 220
    steps2: int = 40
    batch_size: int = 64
    lr1: float = 1e-3
    vision_warmup_steps: int = 600
    warmup_lr: float = 1e-3
    warmup_vision_lr: float = 3e-5
    vision_lr1: float = 3e-5
    resampler_lr1: float = 1e-4
    lr2: float = 1e-5
    eval_batch_size: int = 64
    threads: int | None = None
    progress: bool = True
    examples: int = 4
    probe_records: int = 1200
    probe_steps: int = 100
    visibility_scenes: int = 300

    @classmethod
    def quick(cls, out_dir: str | Path, seed: int = 0, task: str = "textures") -> "DemoSettings":
        """A few samples and steps: exercises every step end to end in seconds (for tests)."""
        return cls(out_dir=Path(out_dir), task=task, seed=seed, n_train=4, n_val=1, n_test=2, steps1=2, steps2=2,
                   vision_warmup_steps=2, batch_size=4, eval_batch_size=8, progress=False, examples=2,
                   probe_steps=5)


@dataclass
class StageResult:
    """One trained and evaluated model."""

    name: str
    model_dir: Path
    run_dir: Path
    trainable_params: int
    total_params: int
    steps: int
    train_seconds: float
    eval_seconds: float = 0.0
    accuracy: dict[str, float] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)
    warmup: dict[str, Any] = field(default_factory=dict)  # its warm-up run: steps, last loss, seconds


def _train_config(settings: DemoSettings, data: DemoData, name: str, model: ModelSpec, policy: str,
                  train_file: Path, steps: int, lr: float, component_lr: dict[str, float],
                  objective: str = "lm") -> "Any":
    from monkeytune.train.config_load import load_config

    gpu = torch.cuda.is_available()
    optim = {"lr": lr, "weight_decay": 0.0, "warmup_steps": max(1, steps // 20), "scheduler": "cosine"}
    if objective == "window_answer":
        # The warm-up's own schedule: cosine from the first step, AdamW's usual betas, no clipping.
        optim |= {"warmup_steps": 0, "warmup_ratio": 0.0, "betas": [0.9, 0.999], "grad_clip": 0.0}
    raw = {
        "model": dataclasses.replace(model, tokenizer=str(data.tokenizer), init_seed=settings.seed),
        # Each image is asked about 8 times: decode it once (stage 1 keeps 1.1 GB of views).
        "data": {"train": [str(train_file)], "template": "monkey", "max_length": 256, "view_cache_gib": 2.0},
        "policy": {"preset": policy, "lr": component_lr},
        "optim": optim,
        "train": {"max_steps": steps, "micro_batch_size": settings.batch_size, "grad_accum": 1,
                  "precision": "bf16" if gpu else "fp32", "seed": settings.seed, "objective": objective},
        "checkpoint": {"output_dir": str(settings.out_dir / "runs" / name), "every": 0, "final_save": "full"},
        "log": {"progress": settings.progress, "plot": False},
    }
    return load_config(data=raw)


def _train(settings: DemoSettings, data: DemoData, name: str, model: ModelSpec, policy: str, train_file: Path,
           steps: int, lr: float, component_lr: dict[str, float] | None = None, objective: str = "lm") -> StageResult:
    from monkeytune.train.loop import train

    cfg = _train_config(settings, data, name, model, policy, train_file, steps, lr, component_lr or {}, objective)
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    if result.final_dir is None:
        raise RuntimeError(f"the {name} run wrote no model folder")
    net = result.model
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    # The final model folder lives in the demo's output root, where chat/eval users look for it.
    final = settings.out_dir / "models" / name
    if final.exists():
        import shutil

        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Training recorded the data's prompt layout in the folder, so chat, serve and eval use it unasked.
    Path(result.final_dir).rename(final)
    return StageResult(name, final, Path(result.run_dir), trainable, total, result.steps, seconds)


def _warmed_up(settings: DemoSettings, data: DemoData, name: str, grid: tuple[int, int]) -> tuple[ModelSpec, dict]:
    """The grounded vision warm-up of a fresh demo model: ``(spec of its folder, what it did)``."""
    warm = _train(settings, data, name, ModelSpec(config=demo_model_config(grid)), "vision", data.train,
                  settings.vision_warmup_steps, settings.warmup_lr, {"vision": settings.warmup_vision_lr},
                  objective="window_answer")
    rows = [json.loads(line) for line in (warm.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return ModelSpec(from_dir=str(warm.model_dir)), {"steps": warm.steps, "loss": rows[-1]["loss"],
                                                     "seconds": round(warm.train_seconds, 1)}


def _evaluate(settings: DemoSettings, data: DemoData, stage: StageResult) -> None:
    """Fill ``stage.accuracy`` (exact match per kind and overall) and ``stage.predictions``."""
    from tqdm import tqdm

    from monkeytune.eval.metrics import compute_metrics
    from monkeytune.eval.runner import evaluate, read_eval_records
    from monkeytune.generate import load_for_inference

    records = read_eval_records(data.test)
    kinds = {}
    with open(data.test, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            kinds[rec["question_id"]] = (rec["kind"], rec["region"])
    model, tokenizer = load_for_inference(stage.model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    bar = tqdm(total=len(records), desc=f"eval {stage.name}", unit="q", disable=not settings.progress)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    start = time.perf_counter()
    predictions, _ = evaluate(model, tokenizer, records, metrics=("exact_match",),
                              batch_size=settings.eval_batch_size, template=PROMPT_TEMPLATE, max_new_tokens=3,
                              progress=progress)
    stage.eval_seconds = time.perf_counter() - start
    bar.close()
    for p in predictions:
        p["kind"], p["region"] = kinds[p["question_id"]]
    stage.predictions = predictions
    for kind in ("fine", "coarse"):
        subset = [p for p in predictions if p["kind"] == kind]
        if subset:
            stage.accuracy[kind] = compute_metrics(["exact_match"], [p["prediction"] for p in subset],
                                                   [p["answer"] for p in subset])["exact_match"]
    stage.accuracy["all"] = compute_metrics(["exact_match"], [p["prediction"] for p in predictions],
                                            [p["answer"] for p in predictions])["exact_match"]
    # Can the visual tokens tell the fine answers apart? Probes fitted on training questions,
    # scored on the test questions: tells a vision failure from a routing failure.
    from monkeytune.eval.probe import ProbeError, probe

    fine_test = [r for r in records if kinds[r["question_id"]][0] == "fine"]
    try:
        fine_train = [r for r in read_eval_records(data.root / "train_questions.jsonl") if "-fine-" in r["question_id"]]
        stage.probe = probe(model, fine_train, fine_test, limit=settings.probe_records, steps=settings.probe_steps,
                            group=lambda r: r["question_id"].split("-fine-")[-1]).to_dict()  # by region
    except ProbeError as e:  # the quick settings can leave a question with a single answer
        stage.probe = {"error": str(e)}


@dataclass
class DemoResult:
    """What :func:`run_demo` produced."""

    settings: DemoSettings
    data: DemoData
    stages: dict[str, StageResult]
    seconds: float
    files: dict[str, Path]
    visibility: dict[str, float] = field(default_factory=dict)


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run the whole demo (see the module docstring) and write its outputs.

    Returns:
        :class:`DemoResult`; its ``files`` name the metrics JSON and the two PNGs.
    """
    from monkeytune.demo import report

    settings = copy.copy(settings)
    settings.out_dir = Path(settings.out_dir)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    data = generate_dataset(settings.out_dir / "data", task=settings.task, seed=settings.seed, n_train=settings.n_train,
                            n_val=settings.n_val, n_test=settings.n_test, progress=settings.progress)
    from monkeytune.demo.visibility import fine_detail_visibility

    # The premise, checked on the pixels: a simple classifier reads the fine answer from the
    # windows but not from the global view.
    visibility = fine_detail_visibility(data.root, demo_model_config().image.window_size, settings.visibility_scenes)
    slow_vision = {"vision": settings.vision_lr1, "resampler": settings.resampler_lr1}
    stages: dict[str, StageResult] = {}
    warm, warmup = _warmed_up(settings, data, "stage1-warmup", (2, 2))
    stages["stage1"] = _train(settings, data, "stage1", warm, "full", data.train, settings.steps1, settings.lr1,
                              slow_vision)
    stages["stage1"].warmup = warmup
    stages["stage2"] = _train(settings, data, "stage2", ModelSpec(from_dir=str(stages["stage1"].model_dir)),
                             "monkey-fix-llm", data.train_fine, settings.steps2, settings.lr2)
    warm, warmup = _warmed_up(settings, data, "baseline-warmup", (0, 0))
    stages["baseline"] = _train(settings, data, "baseline", warm, "full", data.train, settings.steps1 + settings.steps2,
                                settings.lr1, slow_vision)
    stages["baseline"].warmup = warmup
    for name in STAGES:
        _evaluate(settings, data, stages[name])
    seconds = time.perf_counter() - start
    result = DemoResult(settings, data, {n: stages[n] for n in STAGES}, seconds, {}, visibility)
    result.files = report.write_report(result)
    return result


def settings_dict(settings: DemoSettings) -> dict[str, Any]:
    """JSON-able settings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
