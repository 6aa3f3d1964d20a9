"""The end-of-run save: full folders, adapter-only folders on a base, LLM LoRA as a peft folder."""

from __future__ import annotations

import json

import torch

from monkeytune.model.io import load_model, save_model
from monkeytune.train.loop import train
from monkeytune.train.setup import load_model_and_tokenizer

LORA = {"preset": "llm-lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_llm_lora_is_written_as_peft_folder_and_merges_to_the_same_model(make_config):
    from peft import PeftModel

    ids = torch.tensor([[20, 30, 40, 50, 60]])
    common = dict(policy=LORA, train={"max_steps": 3})
    merged = train(make_config("merged", **common, checkpoint={"final_save": "full", "merge_llm_lora": True}))
    plain = train(make_config("plain", **common, checkpoint={"final_save": "full", "merge_llm_lora": False}))
    for run in (merged, plain):
        assert (run.final_dir / "llm_lora" / "adapter_config.json").is_file()
        assert (run.final_dir / "llm_lora" / "adapter_model.safetensors").is_file()
    merged_model, tok = load_model(merged.final_dir)
    assert tok is not None
    meta = json.loads((merged.final_dir / "config.json").read_text())["metadata"]
    assert meta["llm_lora"] == {"folder": "llm_lora", "merged": True, "base": "llm_base"}

    base, _ = load_model(plain.final_dir)  # the LLM without its adapters
    with_lora, _ = load_model(plain.final_dir)
    with_lora.llm = PeftModel.from_pretrained(with_lora.llm, str(plain.final_dir / "llm_lora"))
    expected = logits(with_lora, ids)
    torch.testing.assert_close(logits(merged_model, ids), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(base, ids), expected, atol=1e-4)  # the adapters did learn something

    # Plain peft finds the adapter's base by itself: a plain Qwen2 folder recorded absolute.
    from peft import AutoPeftModelForCausalLM

    for run in (merged, plain):
        adapter_cfg = json.loads((run.final_dir / "llm_lora" / "adapter_config.json").read_text())
        assert adapter_cfg["base_model_name_or_path"] == str((run.final_dir / "llm_base").resolve())
        peft_llm = AutoPeftModelForCausalLM.from_pretrained(str(run.final_dir / "llm_lora")).eval()
        assert type(peft_llm.get_base_model()).__name__ == "Qwen2ForCausalLM"
        torch.testing.assert_close(logits(peft_llm, ids), expected, rtol=1e-4, atol=1e-4)


def test_adapter_only_save_loads_on_its_base(make_config, tmp_path):
    cfg = make_config("base")
    model, tokenizer = load_model_and_tokenizer(cfg)
    base_dir = save_model(model, tmp_path / "base-model", tokenizer=tokenizer)
    run = train(make_config("adapters", model={"config": None, "from": str(base_dir), "tokenizer": None},
                            policy={"preset": "monkey-fix-llm"}, train={"max_steps": 2},
                            checkpoint={"final_save": "adapters"}))
    info = json.loads((run.final_dir / "config.json").read_text())
    assert info["complete"] is False and info["base_model"] == str(base_dir)
    loaded, _ = load_model(run.final_dir)
    trained = dict(run.model.named_parameters())
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0)


def test_rebuild_from_a_gathered_state_dict():
    """What the FSDP / ZeRO-3 final save does with the engine's gathered full state dict."""
    from monkeytune.config import get_config
    from monkeytune.model import build_model
    from monkeytune.policy import TrainPlan, apply_plan
    from monkeytune.train.final import rebuild_from_state

    ids = torch.tensor([[5, 6, 7, 8]])
    for plan in (TrainPlan("monkey-fix-llm"), TrainPlan("llm-lora", lora={"r": 4, "alpha": 8, "dropout": 0.0})):
        torch.manual_seed(0)
        model = build_model(get_config("tiny"))
        apply_plan(model, plan)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()  # peft starts B at zero; make the adapters matter
        rebuilt = rebuild_from_state(model.config, {k: v.clone() for k, v in model.state_dict().items()}, plan)
        torch.testing.assert_close(logits(rebuilt, ids), logits(model, ids))
        assert [n for n, p in rebuilt.named_parameters() if p.requires_grad] == \
            [n for n, p in model.named_parameters() if p.requires_grad]
