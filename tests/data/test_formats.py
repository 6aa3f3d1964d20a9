"""The four record layouts: detection, parsing, and images that reach the model in every one.

Fixtures follow each project's published examples: LLaVA-1.5's ``llava_v1_5_mix665k.json``
records (``image`` string, ``<image>\\n`` at the start of the first human turn, text-only
records without ``image``), LLaMA-Factory's ``mllm_demo.json`` (``messages`` with
``role``/``content``, a top-level ``images`` list, ``<image>`` anywhere in a user turn) and
ms-swift's multimodal layout (the same with a system message), and OpenAI chat messages with
content parts.
"""

import base64
import io
import json

import pytest
import torch
from PIL import Image

from monkeytune.data import Collator, ConversationDataset, DataError, load_samples, model_inputs
from monkeytune.data.reading import detect_format, iter_raw_records

TPI = 20  # 5 views x 4 queries per image in the test config


def _png_data_uri(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def images(tmp_path, h):
    h.make_image(tmp_path / "coco" / "train2017" / "000000033471.jpg", (64, 48), (200, 30, 30))
    h.make_image(tmp_path / "mllm_demo_data" / "1.jpg", (40, 40), (30, 200, 30))
    return tmp_path


def llava_records():
    return [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "two", "image": ["coco/train2017/000000033471.jpg", "mllm_demo_data/1.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat differs?"},
            {"from": "gpt", "value": "The colour."}]},
        {"id": "i6IyJda_0", "conversations": [
            {"from": "human", "value": "How to get result of python multiprocessing.Pool.map_async?"},
            {"from": "gpt", "value": "Call get() on the AsyncResult."}]},
    ]


def sharegpt_records():
    return [
        {"messages": [
            {"content": "<image>Who are they?", "role": "user"},
            {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
            {"content": "What are they doing?<image>", "role": "user"},
            {"content": "They are celebrating on the soccer field.", "role": "assistant"}],
         "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"]},
        {"messages": [
            {"role": "system", "content": "You are a useful and harmless assistant"},
            {"role": "user", "content": "<image>What is in the image?"},
            {"role": "assistant", "content": "A bus."}],
         "images": ["coco/train2017/000000033471.jpg"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]


def openai_records(root):
    path = str(root / "mllm_demo_data" / "1.jpg")
    return [
        {"messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "coco/train2017/000000033471.jpg"}},
                {"type": "text", "text": "What colour is the bus?"}]},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": [
                {"type": "text", "text": "And here?"},
                {"type": "image_url", "image_url": {"url": "file://" + path}},
                {"type": "image", "image": "mllm_demo_data/1.jpg"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Green, twice."}]}]},
        {"messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _png_data_uri((0, 0, 255))}},
                {"type": "text", "text": "Inline?"}]},
            {"role": "assistant", "content": "Blue."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]


def monkey_records():
    return [
        {"id": "m", "conversations": [
            {"from": "user", "value": "<img>coco/train2017/000000033471.jpg</img> What colour? Answer: "},
            {"from": "assistant", "value": "red"}]},
        {"id": "t", "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]},
    ]


@pytest.fixture
def files(images, h):
    return {
        "monkey": h.write_jsonl(images / "monkey.jsonl", monkey_records()),
        "llava": h.write_json(images / "llava_v1_5_mix665k.json", llava_records()),
        "sharegpt": h.write_json(images / "mllm_demo.json", sharegpt_records()),
        "openai": h.write_jsonl(images / "openai.jsonl", openai_records(images)),
    }


# Images per sample, in file order, for each format's fixture.
IMAGES = {"monkey": [1, 0], "llava": [1, 2, 0], "sharegpt": [2, 1, 0], "openai": [3, 1, 0]}


@pytest.mark.parametrize("fmt", ["monkey", "llava", "sharegpt", "openai"])
def test_each_format_is_detected_and_read_with_its_images(files, fmt):
    found = {}
    samples = load_samples(files[fmt], formats=found)
    assert found == {str(files[fmt]): fmt}
    assert [len(s.images) for s in samples] == IMAGES[fmt]
    assert all(s.format == fmt for s in samples)
    # Forcing the detected format reads the same samples.
    forced = load_samples(files[fmt], format=fmt)
    assert [[t.text for t in s.turns] for s in forced] == [[t.text for t in s.turns] for s in samples]


def test_images_sit_where_their_placeholders_were(files, images):
    bus, demo = str(images / "coco/train2017/000000033471.jpg"), str(images / "mllm_demo_data/1.jpg")
    llava = load_samples(files["llava"])
    assert llava[0].turns[0].text == f"<img>{bus}</img>\nWhat are the colors of the bus in the image?"
    assert llava[1].turns[0].text == f"<img>{bus}</img>\n<img>{demo}</img>\nWhat differs?"
    assert [r.field for r in llava[1].images] == ["image[0]", "image[1]"]
    share = load_samples(files["sharegpt"])
    assert [t.text for t in share[0].turns][2] == f"What are they doing?<img>{demo}</img>"
    assert share[1].system == "You are a useful and harmless assistant"
    oa = load_samples(files["openai"])
    assert oa[0].turns[2].text == f"And here?<img>{demo}</img><img>{demo}</img>"
    assert oa[0].images[1].field == "messages[2].content[1].image_url.url"
    assert oa[1].images[0].inline


@pytest.mark.parametrize("fmt", ["monkey", "llava", "sharegpt", "openai"])
def test_visual_tokens_reach_the_model(files, fmt, tok, cfg):
    """Per batch: views = images x 5, image pads = views x queries, and the pixels change the loss."""
    from monkeytune.model import build_model

    ds = ConversationDataset(files[fmt], tok, cfg, max_length=512, template="chatml")
    batch = Collator(tok.pad_id)([ds[i] for i in range(len(ds))])
    n_images = sum(IMAGES[fmt])
    assert batch["num_images"] == n_images
    assert batch["pixel_values"].shape == (n_images * 5, 3, 28, 28)
    assert int((batch["input_ids"] == tok.image_pad_id).sum()) == n_images * TPI
    assert batch["view_slots"].tolist() == [0, 1, 2, 3, -1] * n_images

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    seen = []
    encode = model.encode_images
    model.encode_images = lambda pv, vs: seen.append(pv.shape[0]) or encode(pv, vs)
    with torch.no_grad():
        real = model(**model_inputs(batch)).loss_sum
        blank = dict(batch, pixel_values=torch.zeros_like(batch["pixel_values"]))
        zeroed = model(**model_inputs(blank)).loss_sum
    assert seen == [n_images * 5] * 2
    assert not torch.isclose(real, zeroed)  # the images, not just their placeholders, are used


def test_the_same_conversation_renders_alike_in_every_format(images, h, tok, cfg):
    q, a = "What colour is the bus?", "Red."
    recs = {
        "monkey": {"conversations": [{"from": "user", "value": f"<img>coco/train2017/000000033471.jpg</img>{q}"},
                                     {"from": "assistant", "value": a}]},
        "llava": {"image": "coco/train2017/000000033471.jpg",
                  "conversations": [{"from": "human", "value": f"<image>{q}"}, {"from": "gpt", "value": a}]},
        "sharegpt": {"images": ["coco/train2017/000000033471.jpg"],
                     "messages": [{"role": "user", "content": f"<image>{q}"}, {"role": "assistant", "content": a}]},
        "openai": {"messages": [{"role": "user", "content": [
            {"type": "image", "image": "coco/train2017/000000033471.jpg"}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": a}]},
    }
    items = {}
    for fmt, rec in recs.items():
        ds = ConversationDataset(h.write_jsonl(images / f"{fmt}.jsonl", [rec]), tok, cfg)
        assert ds.formats[str(images / f"{fmt}.jsonl")] == fmt
        items[fmt] = ds[0]
    ref = items["monkey"]
    for fmt, item in items.items():
        for key in ("input_ids", "labels", "pixel_values", "view_slots"):
            assert torch.equal(item[key], ref[key]), (fmt, key)


def test_detection_rule_and_mixed_files(tmp_path, h):
    def fmt_of(records):
        path = h.write_jsonl(tmp_path / "x.jsonl", records)
        return detect_format(list(iter_raw_records(path)), str(path))

    text = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    llava = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}
    # A LLaVA file whose first record is text-only is still LLaVA: the whole file decides.
    assert fmt_of([text, llava]) == "llava"
    assert fmt_of([text]) == "monkey"
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}]}
    assert fmt_of([msgs]) == "sharegpt" and fmt_of([msgs, parts]) == "openai"
    tagged = {"conversations": [{"from": "user", "value": "<img>a.jpg</img>q"}, {"from": "assistant", "value": "a"}]}
    with pytest.raises(DataError, match=r"mixes Monkey <img>path</img> tags \(line 1\) and LLaVA .* \(line 2\)"):
        fmt_of([tagged, llava])
    with pytest.raises(DataError, match=r"mixes role/content records \(line 2\) and from/value records \(line 1\)"):
        fmt_of([text, msgs])


def test_a_record_of_another_layout_is_never_read_as_text(tmp_path, h):
    llava = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}
    path = h.write_jsonl(tmp_path / "d.jsonl", [llava])
    with pytest.raises(DataError) as info:
        load_samples(path, format="monkey")
    assert (info.value.line, info.value.field) == (1, "image")
    assert "looks like llava or sharegpt (set data.format)" in str(info.value)
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=r"messages.*is data.format right"):
        load_samples(h.write_jsonl(tmp_path / "m.jsonl", [msgs]), format="llava")


MISMATCH = [
    ({"image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "x"}]},
     "image[1]", "1 <image> placeholder but 2 images listed"),
    ({"image": "a.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}]},
     "image", "0 <image> placeholders but 1 images listed"),
    ({"images": ["a.jpg"], "messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "x"}]},
     "messages[0].content", "placeholder number 2 has no image"),
]


@pytest.mark.parametrize("rec,field,reason", MISMATCH)
def test_placeholder_image_mismatch_names_the_line(tmp_path, h, rec, field, reason):
    good = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "x"}]}
    if "messages" in rec:
        good = {"images": ["a.jpg"], "messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "x"}]}
    path = h.write_jsonl(tmp_path / "d.jsonl", [good, rec])
    errors = []
    assert len(load_samples(path, errors)) == 1
    (e,) = errors
    assert (e.kind, e.line, e.field) == ("image_mismatch", 2, field)
    assert reason in e.reason


def test_image_paths_resolve_against_image_root(tmp_path, h):
    rec = {"image": "x/a.jpg", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "x"}]}
    (tmp_path / "data").mkdir()
    path = h.write_jsonl(tmp_path / "data" / "d.jsonl", [rec])
    (s,) = load_samples(path)
    assert s.images[0].source == str(tmp_path / "data" / "x" / "a.jpg")
    (s,) = load_samples(path, image_root=str(tmp_path / "imgs"))
    assert s.images[0].source == str(tmp_path / "imgs" / "x" / "a.jpg")
    remote = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.jpg"}}]},
                           {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match="is not downloaded") as info:
        load_samples(h.write_jsonl(tmp_path / "r.jsonl", [remote]))
    assert info.value.field == "messages[0].content[0].image_url.url"


def test_data_check_reports_formats_and_images(files, tok, cfg, capsys):
    from monkeytune.cli import main
    from monkeytune.data.check import check_dataset

    r = check_dataset(list(files.values()), cfg, tok, max_length=512, template="chatml")
    assert r.ok, r.format()
    assert r.image_refs == sum(sum(v) for v in IMAGES.values())
    assert r.formats == {str(files[f]): f for f in files}
    for fmt in files:
        assert main(["data", "check", str(files[fmt]), "--config", "tiny", "--template", "chatml"]) == 0
        out = capsys.readouterr().out
        assert f"format:   {fmt}" in out and "result: OK" in out
        assert f"images:   {sum(IMAGES[fmt])} references" in out


def test_eval_records_in_every_format(files, images, h):
    from monkeytune.eval.runner import EvalDataError, read_eval_records

    with pytest.raises(EvalDataError, match=r"mix665k.json:\d+ \(record 1\): conversations\[0\].value: .* at most one image"):
        read_eval_records(files["llava"])
    one_image = [r for r in llava_records() if r["id"] != "two"]
    recs = read_eval_records(h.write_json(images / "llava_eval.json", one_image))
    # One question per record: the first user turn, its image, the first answer as reference.
    assert recs[0]["question"] == "What are the colors of the bus in the image?"
    assert recs[0]["image"] == str(images / "coco/train2017/000000033471.jpg")
    assert recs[0]["answer"] == "The bus in the image is white and red."
    assert recs[1]["image"] is None and recs[1]["question_id"] == "i6IyJda_0"
    with pytest.raises(EvalDataError, match=r"openai.jsonl:2 \(record 1\): .*inline images are not supported"):
        read_eval_records(files["openai"])
    records = openai_records(images)
    oa = read_eval_records(h.write_jsonl(images / "oa_eval.jsonl", [records[0], records[2]]))
    assert oa[0]["answer"] == "Red." and oa[0]["question"] == "What colour is the bus?"
    assert oa[0]["image"] == str(images / "coco/train2017/000000033471.jpg")
    assert json.dumps(oa[1]["answer"]) == '"Hello"'


@pytest.mark.parametrize("name,fmt", [("monkey.jsonl", "monkey"), ("llava.json", "llava"),
                                      ("mllm_demo.json", "sharegpt"), ("openai.jsonl", "openai")])
def test_shipped_examples_pass_the_check(name, fmt, capsys):
    from pathlib import Path

    from monkeytune.cli import main

    path = Path(__file__).resolve().parents[2] / "examples" / "data" / name
    assert main(["data", "check", str(path), "--config", "tiny", "--template", "chatml"]) == 0
    out = capsys.readouterr().out
    assert f"format:   {fmt}" in out and "3 references" in out
