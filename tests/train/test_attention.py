"""train.attention: flash_attention_2 is refused in one line where it cannot run, and packs padding-free."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from monkeytune.train.loop import train
from monkeytune.train.setup import SetupError, build_data
from monkeytune.tokenizer.loading import load_tokenizer


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None,
                    reason="flash attention can run here")
def test_flash_attention_where_it_cannot_run_is_one_line(make_config, tmp_path, capsys):
    from monkeytune.cli import main

    cfg = make_config("fa2", train={"attention": "flash_attention_2", "max_steps": 1})
    with pytest.raises(SetupError, match=r"train.attention flash_attention_2 needs .*set train.attention sdpa"):
        train(cfg)
    path = tmp_path / "fa2.yaml"
    cfg.save(path)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flash_attention_2" in err and "Traceback" not in err


def test_packing_goes_padding_free_only_with_flash_attention(make_config, tmp_path):
    from monkeytune.config import ModelConfig

    for attention, packing, expected in (("flash_attention_2", True, True), ("sdpa", True, False),
                                         ("flash_attention_2", False, False)):
        cfg = make_config("pf", data={"packing": packing}, train={"attention": attention})
        tok = load_tokenizer(cfg.model.tokenizer)
        mcfg = cfg.model.config.matched_to_tokenizer(tok)
        dataset, collator, _ = build_data(cfg, tok, mcfg, tmp_path, 0, 1)
        assert collator.padding_free is expected
        batch = collator([dataset[0], dataset[1]])
        if expected:
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
            assert batch["cu_seq_lens_q"][-1] == batch["input_ids"].shape[1]
