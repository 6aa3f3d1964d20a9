"""A composed model's vision tower versus the PEFT way of per-window adapters, side by side in one run.

A composed model (``monkeytune compose``) gives a transformers vision encoder per-window adapters
on its linear layers and encodes every view of every image in ONE batched pass
(:class:`monkeytune.vision.encoder.EncoderTower`, slots ``[0, 1, 2, 3, -1] * B``). Without
monkeytune, a user would put K LoRA adapters on the plain encoder with peft (``w0`` .. ``w3``) and
loop over the window positions: ``set_adapter(f"w{k}")`` and encode that position's view of every
image, then the global views with the adapters disabled, all in one autograd graph.

Both variants here share the same random base weights (a CLIP-like and a SigLIP-like encoder of a
size that suits a CPU), the same adapted layers (those the tower adapts: the attention and MLP
projections of the encoder's layers), the same ranks (attention 16, MLP 32: the composed
defaults), scale 1 and no dropout; the base is frozen and the adapters train. For each size the
run

1. copies the tower's (non-zero) adapters into the peft adapters and checks that both give the same
   features and the same adapter gradients;
2. times forward+backward of the loss ``features.square().mean()`` after that first step: the
   variants alternately, step by step (the order flipped every step); the median is reported, with
   ``loop / batched`` (above 1: the batched pass is faster), and the ratio of the fastest steps,
   which a busy machine disturbs least;
3. counts the bytes autograd saves for backward in the checking step (storages counted once,
   parameters left out), a cheap and deterministic stand-in for activation memory.

peft trap met on the way: ``set_adapter`` and ``disable_adapter`` set ``requires_grad=False`` on the
adapters they deactivate, and autograd then drops those adapters' gradients even though their
forward was recorded while they were trainable. The loop re-enables all four before backward
(``set_requires_grad``); without that only the last adapter set would learn.

CPU only, in torch's default threads unless ``--threads`` says otherwise (reported, with the load
average before and after: other processes sharing the CPU move the absolute times, and with more
than one thread on a busy machine the many small ops of the loop lose most to threads waiting on
each other, so compare a loaded run's ratio with a ``--threads 1`` run too). Each step's process
CPU time is reported beside its wall time.

Usage: ``python bench/compose.py [--quick] [--images B] [--repeats N] [--warmup N] [--threads T]``.
``--quick`` runs the CLIP-like size only, with fewer steps. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import tempfile
import time
import weakref
from pathlib import Path

import torch

from monkeytune.model.compose import ComposeOptions, composed_config
from monkeytune.vision.encoder import AdaptedLinear, EncoderTower, build_encoder

WINDOWS = 4  # a 2 x 2 grid; plus the global view, 5 views an image


def _clip_like():
    from transformers import CLIPVisionConfig  # noqa: PLC0415

    return CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                            image_size=224, patch_size=14)


def _siglip_like():
    from transformers import SiglipVisionConfig  # noqa: PLC0415

    return SiglipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=6,
                              image_size=224, patch_size=16)


SIZES = {"clip-like": _clip_like, "siglip-like": _siglip_like}


def composed_vision(hf_config):
    """``(VisionConfig, window size)`` that ``monkeytune compose`` derives for this encoder with its
    default options (2 x 2 windows and a global view, ranks 16 / 32), from config-only part folders
    (a tiny Qwen2 config stands in for the LLM; only the vision section is used)."""
    from transformers import Qwen2Config  # noqa: PLC0415

    llm = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=128)
    with tempfile.TemporaryDirectory() as tmp:
        hf_config.save_pretrained(Path(tmp) / "vision")
        llm.save_pretrained(Path(tmp) / "llm")
        config = composed_config(Path(tmp) / "vision", Path(tmp) / "llm", None, ComposeOptions(grid=[2, 2]))
    assert config.image.num_windows == WINDOWS and config.image.global_view, config.image
    return config.vision, config.image.window_size


def build_pair(hf_config, seed: int = 0):
    """``(tower, peft_model, vision_cfg, window)`` sharing base weights; adapters as the tower's, non-zero.

    The tower's configuration is the composition's (:func:`composed_vision`), with adapter dropout 0
    for an exact comparison.
    """
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    torch.manual_seed(seed)
    vision, window = composed_vision(hf_config)
    vision = dataclasses.replace(vision, lora_dropout=0.0)
    base = build_encoder(vision)  # random weights, SDPA attention, as the tower builds it
    tower = EncoderTower(vision, encoder=copy.deepcopy(base)).train()
    for name, p in tower.named_parameters():
        p.requires_grad_(".lora." in name)  # frozen base, trainable adapters (as in training)
    with torch.no_grad():
        for m in tower.modules():
            if isinstance(m, AdaptedLinear):
                m.lora.lora_b.normal_(0.0, 0.02)  # non-zero, so the adapters do real work
    # The same layers at the same ranks: read off the tower (attention r16, MLP r32).
    ranks = {name: m.lora.rank for name, m in tower.encoder.named_modules() if isinstance(m, AdaptedLinear)}
    default_r = vision.lora_rank_attn
    pattern = {name.replace(".", r"\."): r for name, r in ranks.items() if r != default_r}
    lora = LoraConfig(r=default_r, lora_alpha=default_r, lora_dropout=0.0, target_modules=list(ranks),
                      rank_pattern=pattern, alpha_pattern=pattern, bias="none")
    peft_model = get_peft_model(copy.deepcopy(base), lora, adapter_name="w0")
    for k in range(1, WINDOWS):
        peft_model.add_adapter(f"w{k}", lora)
    peft_model.train()
    _copy_adapters(tower, peft_model)
    names = [f"w{k}" for k in range(WINDOWS)]
    peft_model.set_requires_grad(names, True)
    return tower, peft_model, vision, window


def _peft_layers(tower, peft_model):
    """``(tower's MultiLoRA, peft's LoRA layer)`` pairs for every adapted linear layer."""
    inner = peft_model.get_base_model()
    for name, m in tower.encoder.named_modules():
        if isinstance(m, AdaptedLinear):
            yield name, m.lora, inner.get_submodule(name)


def _copy_adapters(tower, peft_model) -> None:
    with torch.no_grad():
        for name, lora, layer in _peft_layers(tower, peft_model):
            assert set(layer.lora_A) == {f"w{k}" for k in range(WINDOWS)}, name
            for k in range(WINDOWS):
                a, b = layer.lora_A[f"w{k}"].weight, layer.lora_B[f"w{k}"].weight
                assert a.shape == lora.lora_a[k].shape and b.shape == lora.lora_b[k].shape, name
                assert layer.scaling[f"w{k}"] == 1.0 and float(lora.lora_scale[k]) == 1.0, name
                a.copy_(lora.lora_a[k])
                b.copy_(lora.lora_b[k])


def _views(size: int, images: int):
    pv = torch.randn(images * (WINDOWS + 1), 3, size, size)
    slots = torch.tensor((list(range(WINDOWS)) + [-1]) * images)  # image-major, slot-minor; CPU
    return pv, slots


def batched_features(tower, pv, slots):
    """Monkeytune: every view of every image in one pass, adapters picked per view."""
    return tower(pv, slots)


def loop_features(peft_model, vision, pv):
    """The peft way: one encoder call per window position (its view of every image), then the
    global views with adapters off; outputs put back in the tower's image-major order."""
    enc = vision.encoder
    v = WINDOWS + 1

    def encode(x):
        hidden = peft_model(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
        hidden = hidden.hidden_states[enc.feature_layer]
        patches = (x.shape[-2] // vision.patch_size) * (x.shape[-1] // vision.patch_size)
        return hidden if enc.keep_cls else hidden[:, hidden.shape[1] - patches :]

    outs = []
    for k in range(WINDOWS):
        peft_model.set_adapter(f"w{k}")
        outs.append(encode(pv[k::v]))
    with peft_model.disable_adapter():
        outs.append(encode(pv[WINDOWS::v]))
    # set_adapter / disable_adapter left only one adapter trainable: without this, autograd would
    # drop the other adapters' gradients.
    peft_model.set_requires_grad([f"w{k}" for k in range(WINDOWS)], True)
    return torch.stack(outs, dim=1).flatten(0, 1)


def _loss(features):
    return features.float().square().mean()


def check_equal(tower, peft_model, vision, pv, slots) -> dict:
    """Same features and same adapter gradients from both variants (identical adapters); also the
    bytes each variant's step saves for backward."""
    tower.zero_grad(set_to_none=True)
    peft_model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for m in (tower, peft_model) for p in m.parameters()}
    fa, saved_a = _saved_bytes(lambda: batched_features(tower, pv, slots), params)
    fb, saved_b = _saved_bytes(lambda: loop_features(peft_model, vision, pv), params)
    _loss(fa).backward()
    _loss(fb).backward()
    feat = (fa - fb).abs().max().item()
    grad, scale, missing = 0.0, 0.0, []
    for name, lora, layer in _peft_layers(tower, peft_model):
        for k in range(WINDOWS):
            for mine, theirs in ((lora.lora_a.grad[k], layer.lora_A[f"w{k}"].weight.grad),
                                 (lora.lora_b.grad[k], layer.lora_B[f"w{k}"].weight.grad)):
                if theirs is None:
                    missing.append(f"{name}/w{k}")
                    continue
                grad = max(grad, (mine - theirs).abs().max().item())
                scale = max(scale, mine.abs().max().item())
    return {"max_abs_feature_diff": feat, "feature_scale": fa.abs().max().item(),
            "max_abs_grad_diff": grad, "grad_scale": scale, "missing_peft_grads": len(missing),
            "saved_bytes": {"batched": saved_a, "loop": saved_b}}


def _saved_bytes(forward, params: set[int]):
    """``(forward(), bytes)``: the bytes of the tensors autograd saves for backward during the
    forward and still holds when it returns (storages counted once; those of parameters,
    ``params``, left out; branches the output does not need, such as SigLIP's pooling head, are
    freed with their saved tensors and not counted)."""
    seen: dict[int, tuple[int, weakref.ref]] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = (s.nbytes(), weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(n for n, ref in seen.values() if ref() is not None)


def bench_size(size: str, images: int, warmup: int, repeats: int) -> dict:
    tower, peft_model, vision, window = build_pair(SIZES[size]())
    pv, slots = _views(window, images)
    check = check_equal(tower, peft_model, vision, pv, slots)  # also each variant's first step
    assert check["missing_peft_grads"] == 0, check
    assert check["max_abs_feature_diff"] <= 1e-5 * max(1.0, check["feature_scale"]), check
    assert check["max_abs_grad_diff"] <= 1e-5 * max(1.0, check["grad_scale"]), check
    saved = check.pop("saved_bytes")

    steps = {
        "batched": (tower, lambda: _loss(batched_features(tower, pv, slots))),
        "loop": (peft_model, lambda: _loss(loop_features(peft_model, vision, pv))),
    }
    wall: dict[str, list[float]] = {m: [] for m in steps}
    cpu: dict[str, list[float]] = {m: [] for m in steps}
    for i in range(warmup + repeats):
        order = list(steps) if i % 2 == 0 else list(steps)[::-1]  # alternate, so load drift hits both alike
        for mode in order:
            model, step = steps[mode]
            model.zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            step().backward()
            if i >= warmup:
                wall[mode].append(time.perf_counter() - start)
                cpu[mode].append(time.process_time() - start_cpu)
    med = {m: statistics.median(t) for m, t in wall.items()}
    med_cpu = {m: statistics.median(t) for m, t in cpu.items()}
    hf = vision.encoder.hf_config
    return {
        "size": size,
        "model_type": hf["model_type"],
        "hidden": hf["hidden_size"], "layers": hf["num_hidden_layers"], "heads": hf["num_attention_heads"],
        "intermediate": hf["intermediate_size"], "image_size": hf["image_size"], "patch": hf["patch_size"],
        "window_size": window,
        "patch_tokens": (window // hf["patch_size"]) ** 2,
        "images": images,
        "views": int(pv.shape[0]),
        "adapted_layers": sum(isinstance(m, AdaptedLinear) for m in tower.modules()),
        "ranks_attn_mlp": [vision.lora_rank_attn, vision.lora_rank_mlp],
        "trainable_params_batched": sum(p.numel() for p in tower.parameters() if p.requires_grad),
        "trainable_params_loop": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        **{k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in check.items()},
        "warmup": warmup,
        "repeats": repeats,
        "batched_ms": round(med["batched"] * 1e3, 1),
        "loop_ms": round(med["loop"] * 1e3, 1),
        "speedup_loop_over_batched": round(med["loop"] / med["batched"], 3),
        "batched_cpu_ms": round(med_cpu["batched"] * 1e3, 1),
        "loop_cpu_ms": round(med_cpu["loop"] * 1e3, 1),
        "cpu_time_ratio_loop_over_batched": round(med_cpu["loop"] / med_cpu["batched"], 3),
        "batched_min_ms": round(min(wall["batched"]) * 1e3, 1),
        "loop_min_ms": round(min(wall["loop"]) * 1e3, 1),
        "speedup_of_fastest_steps": round(min(wall["loop"]) / min(wall["batched"]), 3),
        "batched_ms_all": [round(t * 1e3, 1) for t in wall["batched"]],
        "loop_ms_all": [round(t * 1e3, 1) for t in wall["loop"]],
        "batched_saved_mib": round(saved["batched"] / 2**20, 1),
        "loop_saved_mib": round(saved["loop"] / 2**20, 1),
        "saved_ratio_batched_over_loop": round(saved["batched"] / saved["loop"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CLIP-like size only, fewer steps")
    parser.add_argument("--images", type=int, default=2, help="images a step (5 views each)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 5, quick 3)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps per variant after the checking step, which already runs each once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.manual_seed(0)
    repeats = args.repeats or (3 if args.quick else 5)
    sizes = ["clip-like"] if args.quick else list(SIZES)
    report = {"device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    start = time.perf_counter()
    report["sizes"] = []
    for size in sizes:
        row = bench_size(size, args.images, args.warmup, repeats)
        report["sizes"].append(row)
        print(f"{row['size']:>11} ({row['model_type']}, {row['hidden']}x{row['layers']}, {row['patch_tokens']} "
              f"tokens): {row['views']} views fwd+bwd  batched {row['batched_ms']:.0f} ms  peft loop "
              f"{row['loop_ms']:.0f} ms  loop/batched x{row['speedup_loop_over_batched']} (CPU time "
              f"x{row['cpu_time_ratio_loop_over_batched']}, fastest steps "
              f"x{row['speedup_of_fastest_steps']})  | saved for backward {row['batched_saved_mib']} vs "
              f"{row['loop_saved_mib']} MiB  | max |diff| features {row['max_abs_feature_diff']:.1e} grads "
              f"{row['max_abs_grad_diff']:.1e}", flush=True)
    report["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(f"torch threads {report['torch_threads']} of {report['cpu_count']} CPUs; load average "
          f"{report['load_avg_before'][0]} before, {report['load_avg_after'][0]} after")
    busy = report["load_avg_before"][0] > report["cpu_count"]  # others' load (ours ran one thread until then)
    report["machine_busy"] = busy
    if busy and report["torch_threads"] > 1:
        print("note: the machine was busy; with several threads each op waits for its slowest thread, so these "
              "times (and their ratio) are unreliable: rerun with --threads 1 or on an idle machine")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
