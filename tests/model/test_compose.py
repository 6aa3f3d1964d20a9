"""Composed models: a transformers vision encoder and causal LM joined the Monkey way.

Every part is a tiny random transformers model saved with ``save_pretrained`` in the test; the
references are the plain parts loaded back with transformers.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, CLIPVisionModel, Dinov2Model, SiglipVisionModel

from monkeytune.cli import main
from monkeytune.model.compose import ComposeOptions, compose
from monkeytune.model.io import ModelFolderError, load_model
from monkeytune.vision.processor import ImageProcessor
from tests.model.compose_parts import save_clip, save_dinov2, save_llama, save_qwen2, save_siglip_pair


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return {"clip": save_clip(root / "clip"), "siglip": save_siglip_pair(root / "siglip"),
            "dinov2": save_dinov2(root / "dinov2"),
            "qwen2": save_qwen2(root / "qwen2"), "llama": save_llama(root / "llama"), "root": root}


@pytest.fixture(scope="module")
def clip_qwen2(parts):
    """CLIP + Qwen2 with Monkey's resampler (4 queries a view)."""
    return compose(parts["clip"], parts["qwen2"], parts["root"] / "clip-qwen2", ComposeOptions(queries=4))


@pytest.fixture(scope="module")
def siglip_llama(parts):
    """A SigLIP pair's vision tower + Llama with LLaVA's projector, 2x2 patches folded a token."""
    options = ComposeOptions(connector="mlp", pixel_shuffle=2, feature_layer=-2)
    return compose(parts["siglip"], parts["llama"], parts["root"] / "siglip-llama", options)


@pytest.fixture(scope="module")
def dinov2_qwen2(parts):
    """DINOv2 + Qwen2 with the projector, the class token kept."""
    options = ComposeOptions(connector="mlp", keep_cls=True)
    return compose(parts["dinov2"], parts["qwen2"], parts["root"] / "dinov2-qwen2", options)


def _image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (50, 60, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("pair, plain, layer, drop", [("clip_qwen2", "clip", -1, 1), ("siglip_llama", "siglip", -2, 0),
                                                      ("dinov2_qwen2", "dinov2", -1, 0)])
def test_zero_adapters_leave_each_window_as_the_plain_encoder_sees_its_crop(pair, plain, layer, drop, parts, request):
    model, _ = load_model(request.getfixturevalue(pair))
    cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "dinov2": Dinov2Model}[plain]
    encoder = cls.from_pretrained(parts[plain]).eval()
    processed = ImageProcessor(model.config.image)(_image())
    assert processed.slots.tolist() == [0, 1, 2, 3, -1]
    with torch.no_grad():
        batched = model.vision(processed.views, processed.slots)  # every view in one pass
        for k, view in enumerate(processed.views):
            alone = encoder(pixel_values=view[None], output_hidden_states=True).hidden_states[layer][:, drop:]
            torch.testing.assert_close(batched[k : k + 1], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pair, llm", [("clip_qwen2", "qwen2"), ("siglip_llama", "llama")])
def test_text_only_logits_and_greedy_answers_are_the_plain_llms(pair, llm, parts, request):
    model, tokenizer = load_model(request.getfixturevalue(pair))
    plain = AutoModelForCausalLM.from_pretrained(parts[llm]).eval()
    ids = torch.tensor([tokenizer.encode("hello world what is this")])
    with torch.no_grad():
        ours = model(ids).logits
        theirs = plain(ids).logits
    vocab = theirs.shape[-1]
    torch.testing.assert_close(ours[..., :vocab], theirs, rtol=0, atol=1e-5)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_id}
    answer = model.generate(ids, **kwargs)
    assert answer.tolist() == plain.generate(ids, **kwargs)[:, ids.shape[1] :].tolist()


def test_the_folder_loads_back_with_identical_image_logits(clip_qwen2, tmp_path):
    model, tokenizer = load_model(clip_qwen2)
    processed = ImageProcessor(model.config.image)(_image(1))
    tpi = model.config.tokens_per_image
    ids = torch.tensor([[tokenizer.image_start_id] + [tokenizer.image_pad_id] * tpi + [tokenizer.image_end_id]
                        + tokenizer.encode("what is this")])
    with torch.no_grad():
        model.image_tokens.weight.add_(0.5)  # the saved folder must carry the trained image-token embeddings
        before = model(ids, pixel_values=processed.views, view_slots=processed.slots).logits
        model.save_pretrained(tmp_path / "again", tokenizer=tokenizer)
        again, _ = load_model(tmp_path / "again")
        after = again(ids, pixel_values=processed.views, view_slots=processed.slots).logits
    assert torch.equal(before, after)
    assert model.config.to_dict() == again.config.to_dict()


def test_a_composed_config_names_its_parts_and_counts_its_visual_tokens(clip_qwen2, siglip_llama):
    resampled = json.loads((clip_qwen2 / "config.json").read_text())["model"]
    assert resampled["vision"]["encoder"]["hf_config"]["model_type"] == "clip_vision_model"
    assert resampled["vision"]["encoder"]["adapter_targets"] == []  # the defaults, resolved when built
    assert resampled["llm"]["hf_config"]["model_type"] == "qwen2"
    model, _ = load_model(siglip_llama)
    # 28-pixel views of 14-pixel patches: a 2x2 grid folded into one token, 5 views an image.
    assert model.config.tokens_per_view == 1 and model.config.tokens_per_image == 5
    assert len(model.vision.blocks) == 2
    adapted = sorted({n.split(".lora.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora." in n})
    assert adapted == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]


def test_adapter_targets_that_match_nothing_are_one_error(parts, tmp_path, capsys):
    code = main(["compose", "--vision", str(parts["clip"]), "--llm", str(parts["qwen2"]), "--out", str(tmp_path / "x"),
                 "--queries", "4", "--adapter-targets", "q_proj", "query_proj"])
    err = capsys.readouterr().err
    assert code == 2 and "['query_proj'] match no linear layer" in err and "Traceback" not in err
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_a_folder_without_config_is_named(parts, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["compose", "--vision", str(tmp_path / "empty"), "--llm", str(parts["qwen2"]), "--out", str(tmp_path / "x")])
    assert code == 2 and f"--vision {tmp_path / 'empty'}: no config.json there" in capsys.readouterr().err


def test_config_only_parts_compose_into_a_plan_that_inspect_reads(parts, tmp_path):
    from monkeytune.inspection import inspect_plan
    from monkeytune.model.spec import ModelSpec
    from monkeytune.policy.plan import TrainPlan

    for name in ("clip", "qwen2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((parts[name] / "config.json").read_text())
    out = compose(tmp_path / "clip", tmp_path / "qwen2", tmp_path / "plan", ComposeOptions(queries=4))
    assert not (out / "model.safetensors").exists()
    report = inspect_plan(ModelSpec(from_dir=str(out)), TrainPlan(preset="align"))
    trainable = {d.component for d in report.report.decisions if d.trainable}
    assert trainable == {"resampler", "image_tokens"}
    with pytest.raises(ModelFolderError, match="holds no weights"):
        load_model(out)


def test_transformers_classes_load_it_and_the_llm_exports_alone_with_its_image_tokens(clip_qwen2, tmp_path):
    import monkeytune
    from monkeytune.model.hf_export import export_hf_llm
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(clip_qwen2)
    assert isinstance(model, monkeytune.MonkeyForCausalLM) and model.config.composed
    processor = monkeytune.MonkeyProcessor.from_pretrained(clip_qwen2)
    inputs = processor(text=["<image> what is this"], images=[_image()])
    assert inputs["pixel_values"].shape == (5, 3, 28, 28)
    with torch.no_grad():
        model.image_tokens.weight.normal_()
    export_hf_llm(model, tmp_path / "llm", tokenizer=processor.tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    ids = torch.tensor([tokenizer.encode("<img> hello world </img>", add_special_tokens=False)])
    assert ids[0, 0] == model.config.image_start_id and ids[0, -1] == model.config.image_end_id
    with torch.no_grad():  # the same logits, <img> and </img> included: their trained rows went along
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_the_tokenizer_template_is_the_llms_own_with_only_answers_and_their_turn_end_learnt(siglip_llama):
    from monkeytune.data.chat_template import turn_end_ids
    from monkeytune.data.templates import IGNORE_INDEX, normalize_messages, render

    _, tokenizer = load_model(siglip_llama)
    messages = [{"role": "user", "content": "<img>a.png</img>hello"}, {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": "what"}, {"role": "assistant", "content": "a dog"}]
    system, turns = normalize_messages(messages)
    enc = render("tokenizer", system, turns, tokenizer, tokens_per_image=3)
    # The same text the template writes, the image expanded in place of its placeholder.
    image = "<img>" + "<imgpad>" * 3 + "</img>"
    plain = [{"role": m["role"], "content": m["content"].replace("<img>a.png</img>", image)} for m in messages]
    assert tokenizer.decode(enc.input_ids, skip_special=False) == tokenizer.render_chat(plain)
    learnt = [i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(learnt, skip_special=False) == "a cat</s>a dog</s>"
    assert enc.input_ids.count(tokenizer.image_pad_id) == 3 and len(enc.images) == 1
    assert turn_end_ids(tokenizer) == [tokenizer.special_id("</s>")]
    prompt = render("tokenizer", system, turns[:1], tokenizer, 3, add_generation_prompt=True)
    assert tokenizer.decode(prompt.input_ids, skip_special=False).endswith("hello</s>[assistant] ")


def test_views_take_the_encoders_size_in_whole_patches_and_its_processors_normalisation(parts, tmp_path):
    from monkeytune.model.compose import composed_config
    from transformers import SiglipVisionConfig

    from tests.model.compose_parts import vision_kwargs

    SiglipVisionConfig(**vision_kwargs(image_size=32)).save_pretrained(tmp_path / "siglip")  # 32 px of 14-px patches
    (tmp_path / "siglip" / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}')
    config = composed_config(tmp_path / "siglip", parts["qwen2"], None, ComposeOptions(queries=4))
    assert config.image.window_size == 28 and config.image.mean == [0.5] * 3 and config.image.std == [0.5] * 3


def test_generation_never_picks_an_embedding_row_no_token_maps_to(clip_qwen2):
    from monkeytune.generate import GenerationSettings, generate_ids, stop_ids

    model, tokenizer = load_model(clip_qwen2)
    assert model.config.llm.vocab_size > tokenizer.vocab_size  # 320 rows, fewer tokens
    with torch.no_grad():  # an id past the tokenizer's is the likeliest next token everywhere
        model.llm.get_output_embeddings().weight[tokenizer.vocab_size + 1] = 50.0
    ids = tokenizer.encode("hello world")
    answer = generate_ids(model, tokenizer, [(ids, [])], GenerationSettings(max_new_tokens=4), stop_ids(tokenizer, "raw"))
    assert answer[0] and max(answer[0]) < tokenizer.vocab_size
    tokenizer.decode(answer[0])


def test_with_the_encoder_frozen_the_global_views_leave_autograd_and_nothing_else_changes(clip_qwen2):
    # As the Monkey tower (tests/vision/test_vit.py): same features and adapter gradients as one
    # autograd pass over all views (forced by a trainable base weight), less kept for backward.
    model, _ = load_model(clip_qwen2)
    tower = model.vision  # eval mode: no adapter dropout, so both runs draw nothing
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.05)
    pixels = torch.randn(10, 3, 28, 28)
    slots = torch.tensor([0, 1, 2, 3, -1] * 2)

    def run(base_trains: bool):
        for name, p in tower.named_parameters():
            p.requires_grad_(".lora." in name or (base_trains and name.endswith("pre_layrnorm.weight")))
            p.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = tower(pixels, slots)
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in tower.named_parameters() if ".lora." in n}, sum(saved)

    split_out, split_grads, split_saved = run(base_trains=False)
    whole_out, whole_grads, whole_saved = run(base_trains=True)
    assert split_saved < 0.9 * whole_saved
    torch.testing.assert_close(split_out, whole_out, rtol=1e-5, atol=1e-6)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
