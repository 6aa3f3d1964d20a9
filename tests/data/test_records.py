import json
import os

import pytest

from monkeytune.data import DataError, load_samples


def test_role_names_and_formats_give_the_same_samples(tmp_path, h):
    recs = [
        h.conv(("<img>img/a.png</img> What?", "A square."), ("Colour?", "Red."), id="s1"),
        h.conv(("Hi", "Hello"), roles=("human", "gpt"), id="s2"),
    ]
    recs[1]["conversations"][0]["from"] = "Human"  # case does not matter
    a = load_samples(h.write_jsonl(tmp_path / "d.jsonl", recs))
    b = load_samples(h.write_json(tmp_path / "d.json", recs))
    assert [s.id for s in a] == ["s1", "s2"] == [s.id for s in b]
    for x, y in zip(a, b):
        assert [(t.role, t.text) for t in x.turns] == [(t.role, t.text) for t in y.turns]
    assert [t.role for t in a[1].turns] == ["user", "assistant"]
    assert [t.role for t in a[0].turns] == ["user", "assistant", "user", "assistant"]
    # JSONL: line numbers; JSON list: the line each record starts on, and its index.
    assert [(s.line, s.index) for s in a] == [(1, 0), (2, 1)]
    assert b[0].line == 2 and b[1].index == 1 and b[1].line > b[0].line


def test_image_paths_resolve_relative_to_the_data_file(tmp_path, h):
    sub = tmp_path / "nested"
    sub.mkdir()
    absolute = str(tmp_path / "elsewhere" / "x.png")
    rec = h.conv((f"<img>img/a.png</img> and <img>{absolute}</img>", "two"))
    (s,) = load_samples(h.write_jsonl(sub / "d.jsonl", [rec]))
    assert [r.source for r in s.images] == [os.path.join(str(sub), "img", "a.png"), absolute]
    assert s.id == "d.jsonl:0"  # records without an id get one naming file and index


def test_system_turn_is_kept_apart(tmp_path, h):
    rec = h.conv(("q", "a"))
    rec["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    (s,) = load_samples(h.write_jsonl(tmp_path / "d.jsonl", [rec]))
    assert s.system == "Be brief." and len(s.turns) == 2


BAD = [
    ({"conversations": [{"from": "user", "value": "q"}, {"from": "assistant"}]}, "malformed_record", "conversations[1].value"),
    ({"conversations": [{"from": "user", "value": "q"}, {"from": "bot", "value": "a"}]}, "bad_roles", "conversations[1].from"),
    ({"conversations": [{"from": "assistant", "value": "a"}, {"from": "user", "value": "q"}]}, "bad_roles", "conversations[0].from"),
    ({"conversations": [{"from": "user", "value": "q"}, {"from": "user", "value": "q"}]}, "bad_roles", "conversations[1].from"),
    ({"conversations": [{"from": "user", "value": "q"}]}, "bad_roles", "conversations[0].from"),
    ({"conversations": [{"from": "user", "value": "<img>a.png q"}, {"from": "gpt", "value": "a"}]}, "unbalanced_image_tags", "conversations[0].value"),
    ({"conversations": [{"from": "user", "value": 3}, {"from": "gpt", "value": "a"}]}, "malformed_record", "conversations[0].value"),
    ({"conversations": []}, "malformed_record", "conversations"),
    ({"id": 7}, "malformed_record", "conversations"),
    (["not", "an", "object"], "malformed_record", ""),
]


@pytest.mark.parametrize("bad,kind,field", BAD)
def test_errors_name_file_line_and_field(tmp_path, h, bad, kind, field):
    good = h.conv(("q", "a"))
    path = h.write_jsonl(tmp_path / "d.jsonl", [good, good, bad])
    with pytest.raises(DataError) as info:
        load_samples(path)
    e = info.value
    assert (e.kind, e.file, e.line, e.index, e.field) == (kind, str(path), 3, 2, field)
    assert str(e).startswith(f"{path}:3 (record 2)")
    if field:
        assert field in str(e)


def test_collecting_errors_reads_past_bad_lines(tmp_path, h):
    good = h.conv(("q", "a"))
    path = h.write_jsonl(tmp_path / "d.jsonl", [good, good, good, good], raw_lines={2: "{not json"})
    errors = []
    samples = load_samples(path, errors)
    assert [s.line for s in samples] == [1, 3, 4]
    assert [(e.kind, e.line) for e in errors] == [("malformed_json", 2)]


def test_json_list_errors_give_record_index_and_line(tmp_path, h):
    good = h.conv(("q", "a"))
    bad = {"conversations": [{"from": "user", "value": "q"}, {"from": "x", "value": "a"}]}
    path = h.write_json(tmp_path / "d.json", [good, bad])
    with pytest.raises(DataError) as info:
        load_samples(path)
    text = path.read_text().splitlines()
    assert info.value.index == 1
    assert text[info.value.line - 1].strip() == "{"  # the line where record 1 starts
    assert info.value.field == "conversations[1].from"

    broken = tmp_path / "broken.json"
    broken.write_text('[\n' + json.dumps(good) + ',\n {"a": 1,,}\n]')
    with pytest.raises(DataError) as info:
        load_samples(broken)
    assert (info.value.kind, info.value.line, info.value.index) == ("malformed_json", 3, 1)


def test_json_list_lines_follow_each_record_however_long(tmp_path):
    # Records spread over 1 to 4 lines each (the running line count must stay exact), compared
    # with the line each record's '{' is on in the text itself.
    from monkeytune.data.reading import iter_raw_records

    records = [{"id": str(i), "text": "x"} for i in range(40)]
    parts = [json.dumps(r, indent=None if i % 4 == 0 else 1) + "\n" * (i % 3) for i, r in enumerate(records)]
    text = "[\n" + ",\n".join(parts) + "]\n"
    (tmp_path / "d.json").write_text(text)
    starts = [i for i, c in enumerate(text) if c == "{"]
    expected = [text.count("\n", 0, p) + 1 for p in starts]
    got = [(index, line, obj["id"]) for index, line, obj in iter_raw_records(tmp_path / "d.json")]
    assert got == [(i, expected[i], str(i)) for i in range(40)]


@pytest.mark.parametrize("layout", ["jsonl", "json-list", "minified-list"])
def test_each_record_reads_back_alone_from_its_byte_span(tmp_path, layout):
    # Records are kept as their place in the file, not as objects: the span must give the
    # record back, with non-ASCII text before it and a byte-order mark at the start.
    from monkeytune.data.reading import iter_spans, read_span

    records = [{"id": str(i), "text": "é" * i + "漢字" * (i % 3), "n": [i, {"k": "ü"}]} for i in range(12)]
    if layout == "jsonl":
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n"
    elif layout == "json-list":
        text = json.dumps(records, ensure_ascii=False, indent=2)
    else:
        text = json.dumps(records, ensure_ascii=False)
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    got = list(iter_spans(path))
    assert [obj for _, _, obj, _ in got] == records
    assert [read_span(str(path), span) for _, _, _, span in got] == records


@pytest.mark.parametrize("read_ahead", [7, 64, 1 << 20])
def test_a_json_list_is_read_through_a_buffer_of_any_size(tmp_path, monkeypatch, read_ahead):
    # The reader holds a buffer of the file, not the file: records, numbers and strings cut by
    # the buffer's end, multi-line records and non-ASCII text must come out exactly as json.load
    # gives them, with their lines and spans; a line of invalid UTF-8 spoils only its record.
    from monkeytune.data import json_list
    from monkeytune.data.reading import iter_spans, read_span

    monkeypatch.setattr(json_list, "READ_AHEAD_BYTES", read_ahead)
    values = [{"id": str(i), "text": "é" * i + " long " * (i % 5), "n": [i, 123456789 * i]} for i in range(30)]
    values[7], values[12] = 98765432101234, "a string record that spans many buffers " * 3
    parts = [json.dumps(v, ensure_ascii=False, indent=None if i % 3 else 2) for i, v in enumerate(values)]
    text = "[\n" + ",\n".join(parts) + "\n]\n"
    data = text.encode("utf-8")
    bad_at = data.index(b'"text": "', data.index(b'"id": "20"')) + len(b'"text": "')  # inside a string
    path = tmp_path / "d.json"
    path.write_bytes(data[:bad_at] + b"\xff" + data[bad_at:])
    starts, pos = [], 2
    for p in parts:  # where each record starts in the text, for its line
        starts.append(text.index(p, pos))
        pos = starts[-1] + len(p)
    got = list(iter_spans(path))
    assert [line for _, line, _, _ in got] == [text.count("\n", 0, p) + 1 for p in starts]
    for i, (index, _, obj, span) in enumerate(got):
        assert index == i
        if i == 20:
            assert isinstance(obj, DataError) and obj.kind == "malformed_json" and "invalid UTF-8" in obj.reason
            assert span is None
        else:
            assert obj == values[i] and read_span(str(path), span) == values[i]
