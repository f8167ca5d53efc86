"""The multi-exit ViT: equivalence with timm at init, stream isolation, attention mask, variants."""

import pytest
import torch

from met_lightning.models.multi_exit_vit import MultiExitViT
from tests.helpers import tiny_backbone


def randomize_adapters(net: MultiExitViT) -> None:
    """Give the adapters non-trivial weights (W_up = 0 at init would hide their effect)."""
    for adapters in net.adapters.values():
        for adapter in adapters:
            torch.nn.init.normal_(adapter.up.weight, std=0.2)
            torch.nn.init.normal_(adapter.gamma, mean=1.0, std=0.5)


@pytest.mark.parametrize("exits", [[1, 2, 3, 4], [4]])  # [4]: early exits disabled
@pytest.mark.parametrize("separate_cls", [True, False])
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_main_path_equals_timm_forward_at_init(exits, separate_cls, reg_tokens):
    backbone = tiny_backbone(reg_tokens=reg_tokens)
    net = MultiExitViT(
        backbone, 10, exits, adapter=dict(exit_specific=separate_cls, separate_cls=separate_cls)
    ).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = backbone.forward_features(images)[:, 0]
        features = net(images).features
    torch.testing.assert_close(features[:, -1], expected, atol=1e-5, rtol=0)


def logits_before_and_after(change_gammas) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, K, C] of a trained-looking 4-exit net before and after `change_gammas(gamma)`."""
    net = MultiExitViT(tiny_backbone(), 10, [1, 2, 3, 4]).eval()
    randomize_adapters(net)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = net(images).logits
        for adapters in net.adapters.values():
            for adapter in adapters:
                change_gammas(adapter.gamma)  # gamma: [K, r]
        return before, net(images).logits


def test_last_exit_ignores_early_class_tokens_and_their_gammas():
    before, after = logits_before_and_after(lambda g: g[:-1].normal_(mean=3.0, std=2.0))
    torch.testing.assert_close(after[:, -1], before[:, -1], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, 0], before[:, 0])  # the early exits did change


def test_early_exit_reads_its_own_stream():
    """Exit k's prediction depends on gamma_k, not on the other exits' gammas."""
    before, after = logits_before_and_after(lambda g: g[1].fill_(5.0))  # gamma_2 only
    torch.testing.assert_close(after[:, 0], before[:, 0])  # exit 1 untouched
    assert not torch.allclose(after[:, 1], before[:, 1])  # exit 2 changed
    torch.testing.assert_close(after[:, 3], before[:, 3])  # main exit untouched


def test_fused_and_explicit_attention_agree():
    """timm's two attention paths both honour the stream mask."""
    net = MultiExitViT(tiny_backbone(), 10, [1, 2, 3, 4]).eval()
    randomize_adapters(net)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = net(images).logits
        for block in net.backbone.blocks:
            block.attn.fused_attn = False
        explicit = net(images).logits
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)


def test_attention_mask_layout():
    net = MultiExitViT(tiny_backbone(), 10, [1, 2, 3, 4])
    mask = net.attention_mask(n_early=2, num_tokens=6, device=torch.device("cpu"))
    expected = torch.tensor(
        [  # keys: c1 c2 cK p p p
            [1, 0, 0, 1, 1, 1],  # c1 sees itself and the patches
            [0, 1, 0, 1, 1, 1],  # c2 likewise
            [0, 0, 1, 1, 1, 1],  # cK and the patches: the plain ViT
            [0, 0, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_shapes_and_stage_layout():
    net = MultiExitViT(tiny_backbone(), 5, [2, 4])
    out = net(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 2, 5) and out.features.shape == (2, 2, 48)
    assert [list(net.stage_blocks(s)) for s in range(2)] == [[0, 1], [2, 3]]
    state = net.embed(torch.randn(1, 3, 32, 32))
    assert state.main.shape[1] == 1 + 16 and state.early.shape[1] == 1  # cK + 16 patches; c1


@pytest.mark.parametrize(
    "exit_specific, separate_cls, sites",
    [(False, True, ["attn", "mlp"]), (False, False, ["attn", "mlp"]), (True, True, ["mlp"])],
)
def test_variants_train(exit_specific, separate_cls, sites):
    torch.manual_seed(0)
    net = MultiExitViT(
        tiny_backbone(),
        3,
        [2, 4],
        adapter=dict(exit_specific=exit_specific, separate_cls=separate_cls, sites=sites),
    ).train()
    labels = torch.arange(24) % 3
    images = 2 * torch.randn(3, 3, 32, 32)[labels] + 0.1 * torch.randn(24, 3, 32, 32)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        logits = net(images).logits
        loss = sum(torch.nn.functional.cross_entropy(logits[:, k], labels) for k in range(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not net.backbone.training  # the frozen backbone stays in eval mode
