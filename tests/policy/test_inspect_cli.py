"""``monkeytune inspect`` end to end (meta-device models, so monkey-7b is quick)."""

from __future__ import annotations

import json

from monkeytune.cli import main


def test_inspect_tiny_json(capsys):
    assert main(["inspect", "--config", "tiny", "--policy", "monkey-fix-llm", "--rule", "train: llm.model.norm.*",
                 "--json", "--verbose", "--gpus", "2", "--precision", "bf16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"] == "tiny"
    assert out["policy"]["rules"] == ["--rule[0]: train: llm.model.norm.*"]
    assert {r["component"]: r["trainable"] for r in out["policy"]["components"]}["final_norm"] == 128
    assert len(out["policy"]["parameters"]) == 111
    assert [e["strategy"] for e in out["memory"]["estimates"]] == ["ddp", "zero1", "zero2", "zero3", "fsdp"]
    assert out["memory"]["gpus"] == 2


def test_inspect_monkey_7b_table(capsys):
    assert main(["inspect", "--config", "monkey-7b", "--gpus", "8"]) == 0
    text = capsys.readouterr().out
    assert "per-window adapters" in text and "9,707,005,248" in text
    assert "training memory per GPU (GiB), 8 GPU(s)" in text and "zero3" in text and "fp32" in text


def test_inspect_config_file_with_policy(tmp_path, capsys):
    f = tmp_path / "train.yaml"
    f.write_text("model: tiny\npolicy:\n  preset: lora-only\n")
    assert main(["inspect", "--config", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"]["preset"] == "lora-only"
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision: {width: 64, heads: 3}\n")
    assert main(["inspect", "--config", str(bad)]) == 2
    assert f"{bad}: model config" in capsys.readouterr().err


def test_inspect_errors(capsys):
    assert main(["inspect", "--config", "tiny", "--rule", "train: llm.model.layers.{24-31}.*"]) == 2
    err = capsys.readouterr().err
    assert "--rule[0]" in err and "llm.model.layers.{0-1}" in err
    assert main(["inspect", "--config", "tiny", "--model", "ckpt/"]) == 2
    assert "exactly one of --config and --model" in capsys.readouterr().err
    assert main(["inspect", "--model", "no/such/dir"]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["inspect", "--config", "nope"]) == 2
    assert "neither a model preset" in capsys.readouterr().err


def test_inspect_model_folder(tiny, tmp_path, capsys):
    from monkeytune.model.io import save_model

    save_model(tiny, tmp_path / "ckpt")
    assert main(["inspect", "--model", str(tmp_path / "ckpt"), "--policy", "lora-only", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"] == "tiny" and out["policy"]["total"]["params"] == sum(p.numel() for p in tiny.parameters())


def test_inspect_reads_a_training_config(tiny, tmp_path, capsys):
    import yaml

    from monkeytune.model.io import save_model
    from monkeytune.tokenizer.simple import SimpleTokenizer

    policy = {"preset": "monkey-fix-llm", "rules": ["train: llm.model.norm.*"], "lr": {"adapters": 1.0e-4},
              "unfreeze": [{"at": 10, "train": ["llm.*"]}]}
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "policy": policy, "data": {"train": "d.jsonl"}}))
    assert main(["inspect", "--config", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"] == "tiny" and out["policy"]["preset"] == "monkey-fix-llm"
    assert {r["component"]: r["trainable"] for r in out["policy"]["components"]}["final_norm"] == 128
    # A model folder named by `from`, and an inline config whose ids and vocabulary come from
    # the run's tokenizer (as training builds it).
    save_model(tiny, tmp_path / "ckpt")
    run.write_text(yaml.safe_dump({"model": {"from": str(tmp_path / "ckpt")}}))
    assert main(["inspect", "--config", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["policy"]["total"]["params"] == sum(p.numel() for p in tiny.parameters())
    tok = SimpleTokenizer.train(["a red square", "two boxes"] * 4, vocab_size=280)
    tok.save(tmp_path / "tok")
    inline = tiny.config.to_dict()
    inline["llm"]["vocab_size"] = 64  # the tiny ids do not fit: the tokenizer supplies them
    run.write_text(yaml.safe_dump({"model": {"config": inline, "tokenizer": str(tmp_path / "tok")}}))
    assert main(["inspect", "--config", str(run), "--json", "--verbose"]) == 0
    params = {p["name"]: p for p in json.loads(capsys.readouterr().out)["policy"]["parameters"]}
    assert params["llm.model.embed_tokens.weight"]["shape"][0] == tiny.config.matched_to_tokenizer(tok).llm.vocab_size
    run.write_text(yaml.safe_dump({"model": {"preset": "tiny", "from": str(tmp_path / "ckpt")}}))
    assert main(["inspect", "--config", str(run)]) == 2
    assert "exactly one of preset, config, from or compose" in capsys.readouterr().err


def test_inspect_qlora_and_8bit_on_any_machine(capsys):
    """llm-qlora is inspected on the meta device: no GPU and no quantisation needed."""
    assert main(["inspect", "--config", "tiny", "--policy", "llm-qlora", "--json", "--precision", "bf16",
                 "--optim", "adamw_bnb_8bit"]) == 0
    out = json.loads(capsys.readouterr().out)
    mem = out["memory"]
    assert mem["optim"] == "adamw_bnb_8bit" and mem["quantized_4bit_params"] > 0
    assert [(e["strategy"], e["optim"]) for e in mem["estimates"]] == [("ddp", "adamw_bnb_8bit")]
    assert main(["inspect", "--config", "tiny", "--policy", "llm-qlora", "--precision", "bf16"]) == 0
    assert "AdamW, micro-batch" in capsys.readouterr().out
