"""Every bad line named, the rest still checked: each bad input of issue 15 and what it says."""

import json
import os
import struct
import zlib

import pytest
from PIL import Image

from monkeytune.cli import main
from monkeytune.data import ConversationDataset, DataError, SkipBadSamples, load_samples
from monkeytune.data.check import check_dataset
from monkeytune.vision.image import DEFAULT_MAX_PIXELS


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` 1-bit pixels (a few dozen bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_bomb_guard_default_is_at_most_pillows_and_shared(tmp_path, h, tok, cfg):
    from monkeytune.config import ImageConfig

    assert ImageConfig().max_pixels == DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # Pillow's warning threshold
    (tmp_path / "bomb.png").write_bytes(png_header(12000, 12000))  # 144M pixels in ~70 bytes
    path = h.write_jsonl(tmp_path / "d.jsonl", [h.conv(("<img>bomb.png</img>q", "a"), id="bomb")])
    big = cfg.__class__.from_dict({**cfg.to_dict(), "image": {**cfg.to_dict()["image"], "max_pixels": DEFAULT_MAX_PIXELS}})
    (err,) = check_dataset(path, big, tok).errors
    assert (err.kind, err.line, err.field) == ("unreadable_image", 1, "conversations[0].value")
    assert "144000000 pixels is more than max_pixels = 89478485 (decompression-bomb guard)" in err.reason
    with pytest.raises(DataError) as info:  # training: the same guard, refused from the header
        ConversationDataset(path, tok, big)[0]
    assert info.value.reason == err.reason


def test_seventeen_lines_sixteen_bad_all_named(tmp_path, h, tok, cfg):
    h.make_image(tmp_path / "ok.png")
    (tmp_path / "folder.png").mkdir()
    os.symlink(tmp_path / "loop_b.png", tmp_path / "loop_a.png")
    os.symlink(tmp_path / "loop_a.png", tmp_path / "loop_b.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "bomb.png").write_bytes(png_header(12000, 12000))
    good = h.conv(("<img>ok.png</img>q", "a"), id="good")
    lines = [
        json.dumps(good),  # 1
        '{"id": "utf8", "conversations": [{"from": "user", "value": "caf\xe9 q"}, {"from": "assistant", "value": "a"}]}',  # 2
        "{not json",  # 3
        json.dumps({"id": "nofield"}),  # 4
        json.dumps(h.conv(("q", "a"), roles=("user", "bot"), id="role")),  # 5
        json.dumps({"id": "ends", "conversations": [{"from": "user", "value": "q"}]}),  # 6
        json.dumps(h.conv(("q", ""), id="empty")),  # 7
        json.dumps(h.conv(("<img>ok.png q", "a"), id="tags")),  # 8
        json.dumps(h.conv(("<img>missing.png</img>q", "a"), id="missing")),  # 9
        json.dumps(h.conv(("<img>folder.png</img>q", "a"), id="dir")),  # 10
        json.dumps(h.conv(("<img>loop_a.png</img>q", "a"), id="loop")),  # 11
        json.dumps(h.conv(("<img>dangling.png</img>q", "a"), id="dangling")),  # 12
        json.dumps(h.conv(("<img>broken.png</img>q", "a"), id="broken")),  # 13
        json.dumps(h.conv(("<img>bomb.png</img>q", "a"), id="bomb")),  # 14
        json.dumps(h.conv(("q" * 100_000, "a"), id="huge")),  # 15
        json.dumps([1, 2]),  # 16
        json.dumps(h.conv(("q", "a" * 300), id="long")),  # 17
    ]
    data = "\n".join(lines).encode("utf-8").replace("caf\xe9".encode(), b"caf\xe9") + b"\n"
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    r = check_dataset(path, cfg, tok, max_length=256)
    by_line = {e.line: e for e in r.errors}
    assert r.num_records == 17 and r.num_valid == 1 and sorted(by_line) == list(range(2, 18))
    expect = {
        2: ("malformed_json", "invalid UTF-8 at byte"),
        3: ("malformed_json", "invalid JSON"),
        4: ("malformed_record", "missing field"),
        5: ("bad_roles", "unknown role 'bot'"),
        6: ("bad_roles", "ends with a user turn"),
        7: ("empty_answer", "allow_empty_answers"),
        8: ("unbalanced_image_tags", "unbalanced"),
        9: ("missing_image", "image file not found"),
        10: ("unreadable_image", "is a directory, not an image file"),
        11: ("unreadable_image", "is a symlink loop"),
        12: ("missing_image", "is a symlink to a missing file"),
        13: ("unreadable_image", "cannot load image"),
        14: ("unreadable_image", "decompression-bomb guard"),
        15: ("too_long", "refused before tokenizing"),
        16: ("malformed_record", "must be a JSON object"),
        17: ("too_long", "tokens > max_length 256"),
    }
    for line, (kind, words) in expect.items():
        assert by_line[line].kind == kind and words in by_line[line].reason, (line, by_line[line])
    col = data.split(b"\n")[1].index(b"\xe9") + 1
    assert f"invalid UTF-8 at byte {col} of the line (b'\\xe9 q\"')" in by_line[2].reason


def test_invalid_utf8_in_a_json_list_names_only_its_record(tmp_path, h, tok, cfg):
    recs = [h.conv(("q", "a"), id=str(k)) for k in range(3)]
    path = h.write_json(tmp_path / "d.json", recs)
    path.write_bytes(path.read_bytes().replace(b'"id": "1"', b'"id": "1\xff"'))
    errors = []
    samples = load_samples(path, errors)
    assert [s.id for s in samples] == ["0", "2"]
    (e,) = errors
    assert (e.kind, e.index) == ("malformed_json", 1) and "invalid UTF-8" in e.reason
    bad_line = path.read_bytes().split(b"\n").index(b'    "id": "1\xff"') + 1
    assert e.reason.startswith(f"line {bad_line}: invalid UTF-8 at byte 13 of the line")
    assert path.read_bytes().split(b"\n")[e.line - 1].strip() == b"{"  # the record's first line


def test_skip_mode_keeps_the_good_records_of_a_file_with_a_bad_byte(tmp_path, h, tok, cfg, caplog):
    a = h.write_jsonl(tmp_path / "a.jsonl", [h.conv(("q", "a"), id=f"a{k}") for k in range(10)])
    b = h.write_jsonl(tmp_path / "b.jsonl", [h.conv(("q", "a"), id=f"b{k}") for k in range(10)])
    b.write_bytes(b.read_bytes().replace(b'"id": "b3"', b'"id": "b3\xc3"'))
    ds = ConversationDataset([a, b], tok, cfg, strict=False)
    policy = SkipBadSamples(ds, tmp_path / "r.jsonl")
    assert len(ds) == 19 and policy.summary() == "skipped 1 of 20 samples (5.0%): malformed_json 1 (5.0%)"
    assert "skipped 1 of 20 samples" in caplog.text
    (rep,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert (rep["file"], rep["line"], rep["kind"]) == (str(b), 4, "malformed_json")


def test_empty_answers_are_errors_unless_allowed(tmp_path, h, tok, cfg, capsys):
    path = h.write_jsonl(tmp_path / "d.jsonl", [h.conv(("q", "a"), ("q2", "  "), id="e")])
    with pytest.raises(DataError) as info:
        ConversationDataset(path, tok, cfg)
    assert (info.value.kind, info.value.field) == ("empty_answer", "conversations[3].value")
    assert "data.allow_empty_answers: true" in info.value.reason
    item = ConversationDataset(path, tok, cfg, allow_empty_answers=True)[0]
    assert tok.decode([t for t in item["labels"].tolist() if t != -100], skip_special=False) == "a<|endoftext|>  <|endoftext|>"
    assert main(["data", "check", str(path), "--config", "tiny"]) == 1
    assert "empty_answer: 1" in capsys.readouterr().out
    assert main(["data", "check", str(path), "--config", "tiny", "--allow-empty-answers"]) == 0


class CountingTokenizer:
    """Wraps a tokenizer and records the longest text it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0
        for name in ("eos_id", "pad_id", "image_start_id", "image_end_id", "image_pad_id", "vocab_size"):
            setattr(self, name, getattr(inner, name))

    def encode(self, text):
        self.longest = max(self.longest, len(text))
        return self.inner.encode(text)

    def decode(self, ids, skip_special=True):
        return self.inner.decode(ids, skip_special)

    def special_id(self, token):
        return self.inner.special_id(token)


def test_an_over_long_field_is_refused_before_tokenizing(tmp_path, h, tok, cfg):
    path = h.write_jsonl(tmp_path / "d.jsonl", [h.conv(("q", "a"), id="ok"), h.conv(("x" * 10_000_000, "a"), id="big")])
    counting = CountingTokenizer(tok)
    ds = ConversationDataset(path, counting, cfg, max_length=2048)
    with pytest.raises(DataError) as info:
        ds.prepare(1)
    assert counting.longest == 0  # nothing was tokenized
    e = info.value
    assert (e.kind, e.line, e.field) == ("too_long", 2, "conversations[0].value")
    assert "10000001 characters of text cannot fit in max_length 2048 tokens" in e.reason
    ds.prepare(0)
    assert counting.longest == 1


def test_data_files_that_are_not_files_say_what_they_are(tmp_path, h, tok, cfg, capsys):
    (tmp_path / "dir.jsonl").mkdir()
    os.symlink(tmp_path / "l2.jsonl", tmp_path / "l1.jsonl")
    os.symlink(tmp_path / "l1.jsonl", tmp_path / "l2.jsonl")
    cases = {"dir.jsonl": "is a directory", "l1.jsonl": "is a symlink loop", "gone.jsonl": "file not found"}
    for name, words in cases.items():
        with pytest.raises(DataError, match=words) as info:
            load_samples(tmp_path / name)
        assert info.value.kind == "data_file"
    good = h.write_jsonl(tmp_path / "good.jsonl", [h.conv(("q", "a"))])
    r = check_dataset([tmp_path / "dir.jsonl", good], cfg, tok)
    assert [e.kind for e in r.errors] == ["data_file"] and r.num_valid == 1  # the other file is still checked
    with pytest.raises(DataError, match="is a directory"):  # skipping never skips a whole file
        SkipBadSamples(ConversationDataset([tmp_path / "dir.jsonl", good], tok, cfg, strict=False))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_image_file_says_permission_denied(tmp_path, h, tok, cfg):
    img = h.make_image(tmp_path / "secret.png")
    img.chmod(0)
    path = h.write_jsonl(tmp_path / "d.jsonl", [h.conv(("<img>secret.png</img>q", "a"))])
    (e,) = check_dataset(path, cfg, tok).errors
    assert e.kind == "unreadable_image" and "not readable (permission denied)" in e.reason


def test_convert_writes_monkey_records(tmp_path, h, tok, cfg, capsys):
    import base64
    import io

    h.make_image(tmp_path / "a.jpg")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    recs = [
        {"id": "x", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "And"},
                                         {"type": "image_url", "image_url": {"url": uri}}]},
            {"role": "assistant", "content": "ok"}]},
        {"id": "bad", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    ]
    src = h.write_jsonl(tmp_path / "oa.jsonl", recs)
    out = tmp_path / "out" / "monkey.jsonl"
    assert main(["data", "convert", str(src), str(out)]) == 2  # the bad record is named, the rest written
    text = capsys.readouterr().out
    assert f"{src}:2 (record 1): messages[1].content: empty answer" in text
    assert "read as openai; wrote 1 records" in text
    (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
    inline = tmp_path / "out" / "monkey_images" / "0_1.png"
    assert rec == {"id": "x", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "user", "value": f"<img>{tmp_path / 'a.jpg'}</img>And<img>{inline}</img>"},
        {"from": "assistant", "value": "ok"}]}
    assert Image.open(inline).size == (8, 8)
    # The converted file trains to the same tokens as the original.
    a = ConversationDataset(src, tok, cfg, template="chatml", strict=False)[0]
    b = ConversationDataset(out, tok, cfg, template="chatml")[0]
    assert all((a[k] == b[k]).all() for k in ("input_ids", "labels", "pixel_values"))
