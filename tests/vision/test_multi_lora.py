"""MultiLoRA's regular (one adapter per view) and dense (gated) passes against a plain per-view loop."""

import pytest
import torch

from monkeytune.vision.multi_lora import MultiLoRA, SlotIndex, WindowLayout

K, IN, OUT, RANK, LENGTH = 4, 12, 10, 3, 5


def make_lora(dropout: float = 0.0) -> MultiLoRA:
    torch.manual_seed(0)
    lora = MultiLoRA(K, IN, OUT, RANK, dropout)
    with torch.no_grad():  # a fresh adapter is a no-op (B = 0, scale 1): give it values to see
        lora.lora_b.normal_()
        lora.lora_scale.uniform_(0.5, 2.0)
    return lora


def reference(lora: MultiLoRA, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One view at a time: its own adapter, or zero for slot -1."""
    rows = []
    for view, slot in zip(x, slots.tolist()):
        if slot < 0:
            rows.append(view.new_zeros(view.shape[0], lora.out_features))
        else:
            a, b, s = lora.lora_a[slot], lora.lora_b[slot], lora.lora_scale[slot]
            rows.append((view @ a.T) @ b.T * s)
    return torch.stack(rows)


def forward_and_grads(lora: MultiLoRA, fn, x: torch.Tensor, slots) -> tuple[torch.Tensor, list[torch.Tensor]]:
    lora.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = fn(x, slots)
    if out.requires_grad:  # the reference of an all-global batch is a constant zero
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in [x, *lora.parameters()]]
    return out.detach(), grads


def assert_matches_reference(lora: MultiLoRA, slots: torch.Tensor, index: SlotIndex) -> None:
    x = torch.randn(len(slots), LENGTH, IN)
    out, grads = forward_and_grads(lora, lambda x, _: lora(x, index), x, None)
    ref_out, ref_grads = forward_and_grads(lora, lambda x, s: reference(lora, x, s), x, slots)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    for got, want, name in zip(grads, ref_grads, ["x", "lora_a", "lora_b", "lora_scale"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5, msg=name)


REGULAR = {
    "windows+global": ([0, 1, 2, 3, -1] * 3, WindowLayout(3, 5, 0, 0, 4)),
    "windows only": ([0, 1, 2, 3] * 2, WindowLayout(2, 4, 0, 0, 4)),
    "global first, fewer windows than slots": ([-1, 1, 2] * 2, WindowLayout(2, 3, 1, 1, 2)),
    "one position of every image (the per-position loop)": ([2, 2, 2], WindowLayout(3, 1, 0, 2, 1)),
    "one image": ([0, 1, 2, 3, -1], WindowLayout(1, 5, 0, 0, 4)),
    "any negative slot means no adapter": ([0, 1, -2] * 2, WindowLayout(2, 3, 0, 0, 2)),
}


@pytest.mark.parametrize("name", list(REGULAR))
def test_regular_layout_matches_reference(name):
    slots, layout = REGULAR[name]
    slots = torch.tensor(slots)
    index = SlotIndex.from_slots(slots, K)
    assert index.layout == layout
    assert_matches_reference(make_lora(), slots, index)


@pytest.mark.parametrize(
    "slots",
    [[0, 0, 2, -1], [0, 1, 2, 3, -1, 1, 0, 2, 3, -1], [1, 0], [0, 2, -1] * 2, [0, -1, 1], [-1], [-1] * 3, [3, 4]],
    ids=["repeated slot", "images differ", "decreasing", "gap in slots", "gap in views", "global only", "all global",
         "slot past K"],
)
def test_irregular_layout_falls_back_to_dense(slots):
    assert WindowLayout.detect(slots, K) is None
    if max(slots) < K:
        slots = torch.tensor(slots)
        assert_matches_reference(make_lora(), slots, SlotIndex.from_slots(slots, K))


def test_dense_and_regular_passes_agree():
    lora = make_lora()
    slots = torch.tensor([0, 1, 2, 3, -1] * 2)
    regular = SlotIndex.from_slots(slots, K)
    dense = SlotIndex(regular.pick)  # same slots, no layout: the gated pass
    x = torch.randn(len(slots), LENGTH, IN)
    out_r, grads_r = forward_and_grads(lora, lora, x, regular)
    out_d, grads_d = forward_and_grads(lora, lora, x, dense)
    torch.testing.assert_close(out_r, out_d, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_r, grads_d):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_regular_pass_is_deterministic_and_keeps_every_weight_in_the_graph():
    slots = torch.tensor([-1, 1, 2] * 4)  # slots 0 and 3 unused
    x = torch.randn(len(slots), LENGTH, IN)
    runs = []
    for _ in range(2):
        lora = make_lora()
        runs.append(forward_and_grads(lora, lora, x, slots))
        assert all(p.grad is not None for p in lora.parameters())  # data-parallel engines need every grad
        assert lora.lora_a.grad[[0, 3]].abs().sum() == 0 and lora.lora_a.grad[[1, 2]].abs().sum() > 0
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_dropout_applies_to_adapter_input_in_regular_pass():
    lora = make_lora(dropout=0.5).train()
    slots = torch.tensor([0, 1, 2, 3, -1] * 2)
    x = torch.randn(len(slots), LENGTH, IN)
    torch.manual_seed(1)
    first = lora(x, slots)
    torch.manual_seed(1)
    again = lora(x, slots)
    torch.manual_seed(2)
    other = lora(x, slots)
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert torch.equal(first[4::5], torch.zeros_like(first[4::5]))  # global views stay exactly zero
    lora.eval()
    torch.testing.assert_close(lora(x, slots), reference(lora, x, slots), rtol=1e-6, atol=1e-6)

    class Halve(torch.nn.Module):  # a stand-in for dropout that shows what it was given
        def forward(self, t):
            seen.append(t.shape)
            return t * 0.5

    seen = []
    lora.dropout = Halve()
    torch.testing.assert_close(lora(x, slots), reference(lora, x * 0.5, slots), rtol=1e-6, atol=1e-6)
    assert seen == [torch.Size([2, 4, LENGTH, IN])]  # the window views' input, before the down projection


def test_index_moves_pick_keeps_layout_and_checks_views():
    slots = torch.tensor([0, 1, -1] * 2)
    assert SlotIndex.from_slots(slots, K).layout is not None
    assert SlotIndex.from_slots(torch.tensor([5, -1]), 0).layout is None  # no adapters at all
    index = SlotIndex.from_slots(slots, K, device="meta")
    assert index.pick.device.type == "meta" and index.layout is not None
    with pytest.raises(ValueError, match="layout"):
        make_lora()(torch.randn(4, LENGTH, IN), SlotIndex.from_slots(slots, K))
