import pytest
import yaml

from monkeytune.cli import main
from monkeytune.data.check import check_dataset

TPI = 20


@pytest.fixture
def files(tmp_path, h):
    h.make_image(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    good = [
        h.conv(("<img>img/a.png</img>What?", "Red."), id="g1"),
        h.conv(("Hi", "Hello"), ("<img>img/a.png</img>And?", "Same."), roles=("human", "gpt"), id="g2"),
    ]
    bad = good + [
        h.conv(("<img>img/missing.png</img>q", "a"), id="missing"),  # line 3
        h.conv(("<img>img/broken.png</img>q", "a"), id="broken"),  # line 4
        {"id": "roles", "conversations": [{"from": "gpt", "value": "a"}, {"from": "user", "value": "q"}]},  # 5
        h.conv(("<img>img/a.png q", "a"), id="tags"),  # line 6
        h.conv(("q" * 500, "a"), id="long"),  # line 7
        {"id": "nofield", "conversations": [{"value": "q"}]},  # line 8
    ]
    return {
        "good": h.write_jsonl(tmp_path / "good.jsonl", good),
        "bad": h.write_jsonl(tmp_path / "bad.jsonl", bad, raw_lines=None),
        "bad_json": h.write_jsonl(tmp_path / "bad2.jsonl", good + [good[0]], raw_lines={3: "[1, 2"}),
    }


def test_clean_data_passes_with_exact_counts(files, tok, cfg):
    r = check_dataset(files["good"], cfg, tok, max_length=256)
    assert r.ok and r.num_records == 2 and r.num_valid == 2
    assert (r.image_refs, r.image_files) == (2, 1)
    assert r.lengths == [len("What?Red.") + 1 + TPI + 2, len("HiHelloAnd?Same.") + 2 + TPI + 2]
    assert r.supervised == [5, 12]
    text = r.format()
    assert "result: OK" in text and "2 valid" in text


def test_every_problem_is_reported_with_its_location(files, tok, cfg):
    r = check_dataset(files["bad"], cfg, tok, max_length=256)
    assert not r.ok and r.num_records == 8 and r.num_valid == 2
    found = {(e.line, e.kind, e.field) for e in r.errors}
    assert found == {
        (3, "missing_image", "conversations[0].value"),
        (4, "unreadable_image", "conversations[0].value"),
        (5, "bad_roles", "conversations[0].from"),
        (6, "unbalanced_image_tags", "conversations[0].value"),
        (7, "too_long", ""),
        (8, "malformed_record", "conversations[0].from"),
    }
    assert r.errors_by_kind["too_long"] == 1
    text = r.format()
    assert f"{files['bad']}:5 (record 4): conversations[0].from" in text
    assert "FAILED (6 errors)" in text


def test_without_tokenizer_lengths_are_estimates(files, cfg):
    r = check_dataset(files["bad"], cfg, None, max_length=100, decode_images=False)
    assert r.estimated
    # Over-length is only a warning, and an undecoded broken file passes the existence check.
    assert {e.kind for e in r.errors} == {"missing_image", "bad_roles", "unbalanced_image_tags", "malformed_record"}
    assert r.warnings == [f"{files['bad']}:7 (record 6): estimated 169 tokens > max_length 100 "
                          "(samples are never cut; see truncate_turns)"]
    # Image and template tokens are still counted exactly; "What?" and "Red." are 2 tokens each
    # at 3 bytes per token, plus the end token.
    assert r.lengths[0] == TPI + 2 + 2 + 2 + 1


@pytest.fixture
def config_yaml(tmp_path, cfg):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    return path


def test_cli_exit_codes(files, config_yaml, capsys, tmp_path):
    assert main(["data", "check", str(files["good"]), "--config", str(config_yaml), "--max-length", "256"]) == 0
    assert "result: OK" in capsys.readouterr().out
    assert main(["data", "check", str(files["bad"]), "--config", str(config_yaml), "--max-length", "256"]) == 1
    out = capsys.readouterr().out
    assert "missing_image: 1" in out and f"{files['bad']}:3" in out
    code = main(["data", "check", str(files["bad_json"]), "--config", str(config_yaml), "--no-decode"])
    out = capsys.readouterr().out
    assert code == 1 and f"{files['bad_json']}:3 (record 2): invalid JSON" in out and "3 records" not in out
    assert main(["data", "check", str(files["good"]), "--config", "no-such-preset"]) == 2
    assert main(["data", "check", str(files["good"]), "--tokenizer", str(tmp_path / "none")]) == 2
    assert main(["data", "check", str(files["good"]), "--template", "llama"]) == 2


def test_cli_with_a_tokenizer_folder(files, config_yaml, tmp_path, capsys):
    from monkeytune.tokenizer.simple import SimpleTokenizer

    tokenizer = SimpleTokenizer.train(["What? Red. Hi Hello And? Same."] * 4, vocab_size=300)
    tokenizer.save(tmp_path / "tok")
    argv = ["data", "check", str(files["good"]), "--config", str(config_yaml), "--tokenizer", str(tmp_path / "tok")]
    assert main(argv + ["--template", "chatml", "--max-length", "512"]) == 0
    out = capsys.readouterr().out
    assert "(exact)" in out and "template: chatml" in out
    # A config (not a trained folder) takes its image ids from the tokenizer, as training does.
    assert "differs from the model config" not in out
    assert main(argv + ["--max-length", "20"]) == 1
    assert "too_long: 2" in capsys.readouterr().out


def test_cli_reads_a_training_config(files, cfg, tmp_path, capsys):
    from monkeytune.tokenizer.simple import SimpleTokenizer

    SimpleTokenizer.train(["What? Red."] * 4, vocab_size=280).save(tmp_path / "tok")
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "model": {"config": cfg.to_dict(), "tokenizer": str(tmp_path / "tok")},
        "data": {"train": [str(files["good"])], "template": "chatml", "max_length": 40},
    }))
    assert main(["data", "check", str(files["good"]), "--config", str(run)]) == 1
    out = capsys.readouterr().out
    assert "template: chatml" in out and "max_length 40" in out and "(exact)" in out
    assert "too_long: 2" in out
    # Command-line values win over the config's.
    assert main(["data", "check", str(files["good"]), "--config", str(run), "--max-length", "400"]) == 0


def test_cli_reads_model_folders(files, tmp_path, capsys):
    import json

    import torch

    from monkeytune.config import get_config
    from monkeytune.model import build_model
    from monkeytune.model.io import save_model
    from monkeytune.tokenizer.simple import SimpleTokenizer

    SimpleTokenizer.train(["What? Red."] * 4, vocab_size=280).save(tmp_path / "tok")
    torch.manual_seed(0)
    save_model(build_model(get_config("tiny")), tmp_path / "ckpt")
    argv = ["data", "check", str(files["good"]), "--tokenizer", str(tmp_path / "tok"), "--no-decode"]
    # A trained folder's ids are fixed by its weights: a tokenizer that disagrees is flagged.
    assert main(argv + ["--config", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "320 tokens per image" in out and "differs from the model config" in out
    # An official folder, as a training config's `from` names it: 5 views x 16 queries.
    official = tmp_path / "official"
    official.mkdir()
    (official / "config.json").write_text(json.dumps({
        "model_type": "monkey", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "kv_channels": 64, "intermediate_size": 688, "vocab_size": 640,
        "visual": {"heads": 2, "image_size": 896, "image_start_id": 600, "layers": 2, "mlp_ratio": 2.0,
                   "output_dim": 256, "patch_size": 14, "width": 64, "n_queries": 16, "lora_repeat_num": 4},
    }))
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": {"from": str(official)}, "data": {"max_length": 4096}}))
    assert main(["data", "check", str(files["good"]), "--config", str(run), "--no-decode"]) == 0
    assert "80 tokens per image, max_length 4096" in capsys.readouterr().out
