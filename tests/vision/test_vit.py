"""The batched per-window LoRA tower against plain per-view references written here."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from monkeytune.config import VisionConfig
from monkeytune.vision.multi_lora import MultiLoRA
from monkeytune.vision.resampler import Resampler, sincos_2d
from monkeytune.vision.vit import VisionTower


def small_cfg(**kw) -> VisionConfig:
    base = dict(patch_size=4, width=32, layers=2, heads=4, mlp_ratio=2.0, pos_grid=4, output_dim=32,
                n_queries=4, resampler_heads=2, lora_slots=4, lora_rank_attn=3, lora_rank_mlp=5, lora_dropout=0.0)
    base.update(kw)
    return VisionConfig(**base)


def randomise_adapters(tower: VisionTower) -> None:
    # Fresh adapters are exact no-ops (B = 0); give them values so the test can see them.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "lora_b" in name or "lora_scale" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def reference_block(block, x, slot):
    """One view, one block, written out as the official tower computes it (explicit attention)."""
    h = F.layer_norm(x, (x.shape[-1],), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    if slot is not None:
        a, b, s = block.lora_qkv.lora_a[slot], block.lora_qkv.lora_b[slot], block.lora_qkv.lora_scale[slot]
        qkv = qkv + (h @ a.T) @ b.T * s
    length, heads = x.shape[0], block.attn.heads
    hd = x.shape[-1] // heads
    qkv = qkv.view(length, heads, 3 * hd)
    q, k, v = qkv[..., :hd], qkv[..., hd : 2 * hd], qkv[..., 2 * hd :]
    att = torch.einsum("qhd,khd->hqk", q / math.sqrt(hd), k).softmax(-1)
    ctx = torch.einsum("hqk,khd->qhd", att, v).reshape(length, -1)
    out = ctx @ block.attn.proj.weight.T + block.attn.proj.bias
    if slot is not None:
        a, b, s = block.lora_proj.lora_a[slot], block.lora_proj.lora_b[slot], block.lora_proj.lora_scale[slot]
        out = out + (ctx @ a.T) @ b.T * s
    x = x + out
    residual = x
    h2 = F.layer_norm(x, (x.shape[-1],), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    y = x + block.mlp.proj(F.gelu(block.mlp.fc(h2)))
    if slot is not None:
        a, b, s = block.lora_mlp.lora_a[slot], block.lora_mlp.lora_b[slot], block.lora_mlp.lora_scale[slot]
        y = y + (residual @ a.T) @ b.T * s
    return y


def reference_tower(tower, view, slot):
    x = F.conv2d(view[None], tower.patch_embed.weight, stride=tower.cfg.patch_size)[0]  # [D, h, w]
    hw = x.shape[1:]
    x = x.flatten(1).T
    side = int(math.sqrt(tower.pos_embed.shape[0]))
    pos = F.interpolate(tower.pos_embed.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=hw, mode="bicubic", align_corners=False)
    x = x + pos[0].flatten(1).T
    x = F.layer_norm(x, (x.shape[-1],), tower.ln_pre.weight, tower.ln_pre.bias, tower.ln_pre.eps)
    for block in tower.blocks:
        x = reference_block(block, x, slot)
    return x


def test_batched_tower_equals_per_view_loop():
    torch.manual_seed(0)
    tower = VisionTower(small_cfg()).eval()
    randomise_adapters(tower)
    views = torch.randn(7, 3, 24, 24)  # 6x6 patches: position table is resized from 4x4
    slots = torch.tensor([0, 1, 2, 3, -1, 2, -1])
    batched = tower(views, slots)
    for i in range(7):
        slot = None if slots[i] < 0 else int(slots[i])
        torch.testing.assert_close(batched[i], reference_tower(tower, views[i], slot), atol=1e-5, rtol=1e-5)


def test_global_view_untouched_by_adapters():
    torch.manual_seed(0)
    tower = VisionTower(small_cfg()).eval()
    views = torch.randn(3, 3, 16, 16)
    slots = torch.tensor([0, 3, -1])
    before = tower(views, slots)
    randomise_adapters(tower)
    after = tower(views, slots)
    assert torch.equal(before[2], after[2]), "the global view must not see any adapter"
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])
    # The same window content under different slots gives different features once adapters differ.
    same = tower(views[:1].expand(2, -1, -1, -1), torch.tensor([0, 1]))
    assert not torch.allclose(same[0], same[1])


def test_frozen_base_gradients_reach_adapters_only():
    torch.manual_seed(0)
    tower = VisionTower(small_cfg()).train()
    randomise_adapters(tower)
    for name, p in tower.named_parameters():
        p.requires_grad_("lora" in name)
    views = torch.randn(5, 3, 16, 16)
    slots = torch.tensor([0, 1, 2, 3, -1])
    tower(views, slots).square().mean().backward()
    for name, p in tower.named_parameters():
        if "lora" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_unused_slot_gets_no_gradient():
    torch.manual_seed(0)
    lora = MultiLoRA(slots=3, in_features=6, out_features=5, rank=2)
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(4, 7, 6)
    lora(x, torch.tensor([0, 0, 2, -1])).sum().backward()
    assert lora.lora_a.grad[1].abs().sum() == 0 and lora.lora_a.grad[0].abs().sum() > 0
    assert lora.lora_a.grad[2].abs().sum() > 0


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    cfg = small_cfg()
    tower = VisionTower(cfg).train()
    randomise_adapters(tower)
    views, slots = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, -1])
    tower(views, slots).sum().backward()
    grads = {n: p.grad.clone() for n, p in tower.named_parameters()}
    tower.zero_grad()
    tower.gradient_checkpointing = True
    tower(views, slots).sum().backward()
    for n, p in tower.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


def test_resampler_matches_multihead_attention_reference():
    torch.manual_seed(0)
    cfg = small_cfg(width=24, output_dim=32, n_queries=9, resampler_heads=4)
    rs = Resampler(cfg).eval()
    x = torch.randn(2, 16, 24)  # a 4x4 patch grid
    out = rs(x, (4, 4))
    assert out.shape == (2, 9, 32)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([rs.attn.q_proj.weight, rs.attn.k_proj.weight, rs.attn.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([rs.attn.q_proj.bias, rs.attn.k_proj.bias, rs.attn.v_proj.bias]))
        mha.out_proj.weight.copy_(rs.attn.out_proj.weight)
        mha.out_proj.bias.copy_(rs.attn.out_proj.bias)
    kv = rs.ln_kv(rs.kv_proj(x))
    key_pos = F.interpolate(rs.pos_embed.reshape(1, 3, 3, -1).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", align_corners=False)
    key_pos = key_pos[0].flatten(1).T
    q = (rs.ln_q(rs.query) + rs.pos_embed).expand(2, -1, -1)
    ref = mha(q, kv + key_pos, kv, need_weights=False)[0]
    ref = rs.ln_post(ref) @ rs.proj
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # output_scale multiplies the same computation (same weights, same state-dict names).
    scaled = Resampler(dataclasses.replace(cfg, output_scale=0.25)).eval()
    scaled.load_state_dict(rs.state_dict())
    torch.testing.assert_close(scaled(x, (4, 4)), 0.25 * ref, atol=1e-5, rtol=1e-5)


def test_sincos_table_layout():
    table = sincos_2d(8, 3)
    assert table.shape == (9, 8)
    # Position (row 1, col 2) is index 5: first half encodes the column, second half the row.
    assert table[5, 0].item() == pytest.approx(math.sin(2.0))
    assert table[5, 4].item() == pytest.approx(math.sin(1.0))
    assert table[5, 2].item() == pytest.approx(math.cos(2.0))


def test_adapter_delta_follows_autocast_dtype():
    # Under mixed precision the weights stay fp32 and the residual stream the adapters read is
    # fp32, while the adapter matmuls run in bf16. The delta must come out in the compute dtype,
    # as a base nn.Linear's output does: CUDA's index_copy refuses an fp32 destination for a
    # bf16 source (the CPU happens to promote, which would hide the mismatch).
    torch.manual_seed(0)
    lora = MultiLoRA(slots=2, in_features=6, out_features=5, rank=2)
    base = torch.nn.Linear(6, 5)
    x = torch.randn(3, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = lora(x, torch.tensor([0, 1, -1]))
        assert delta.dtype == base(x).dtype == torch.bfloat16
        assert torch.equal(delta[2], torch.zeros_like(delta[2]))
    block_cfg = small_cfg(layers=1)
    tower = VisionTower(block_cfg).train()
    randomise_adapters(tower)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tower(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, -1]))
    out.float().sum().backward()
    assert tower.blocks[0].lora_mlp.lora_a.grad is not None


def test_with_the_base_frozen_the_global_views_leave_autograd_and_nothing_else_changes():
    # Monkey's recipe trains the adapters inside a frozen tower: the global views then run
    # beside the windows without autograd. Outputs and every gradient are those of the one
    # autograd pass over all views (forced here by a trainable base weight).
    from monkeytune.config import get_config
    from monkeytune.vision.vit import VisionTower

    cfg = get_config("tiny").vision
    cfg.lora_dropout = 0.0
    torch.manual_seed(0)
    tower = VisionTower(cfg)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.02)
    pixels = torch.randn(2 * 5, 3, 56, 56)
    slots = torch.tensor([0, 1, 2, 3, -1] * 2)

    def run(base_trains: bool):
        for name, p in tower.named_parameters():
            p.requires_grad_(".lora_" in name or (base_trains and name == "ln_pre.weight"))
            p.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = tower(pixels, slots)
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in tower.named_parameters() if ".lora_" in n}, sum(saved)

    split_out, split_grads, split_saved = run(base_trains=False)
    whole_out, whole_grads, whole_saved = run(base_trains=True)
    assert split_saved < 0.9 * whole_saved  # a fifth of the views keeps nothing for backward
    torch.testing.assert_close(split_out, whole_out, rtol=1e-5, atol=1e-6)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
