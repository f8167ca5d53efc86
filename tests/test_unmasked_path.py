"""Both token layouts (unmasked main path + early-token stream; joint masked sequence) equal the
masked formulation of commit 41f771a."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from met_lightning.errors import ConfigError
from met_lightning.inference.engine import take
from met_lightning.models import multi_exit_vit
from met_lightning.models.adapters import EAdapter
from met_lightning.models.backbone import create_backbone
from met_lightning.models.multi_exit_vit import MultiExitViT, StreamState
from tests.helpers import tiny_backbone
from tests.test_early_exit import trained_like

FIXTURE = Path(__file__).parent / "fixtures" / "prev_layout.safetensors"


# ---------------------------------------------------------------------- the masked reference
def _reference_adapter(adapter: EAdapter, x: torch.Tensor, gamma_index) -> torch.Tensor:
    h = adapter.act(adapter.down(x))
    gamma = adapter.gamma[0] if gamma_index is None else adapter.gamma[gamma_index]
    return x + adapter.up(h * gamma)


def masked_reference(net: MultiExitViT, images: torch.Tensor) -> torch.Tensor:
    """Logits [B, K, C] of the layout of commit 41f771a: one sequence [c_1..c_{K-1}, c_K, R, P]
    through timm's own `Attention` with the stream mask, gamma gathered per token position."""
    bb = net.backbone
    x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
    n0 = net.num_early_tokens(0)
    if n0:
        x = torch.cat([x[:, :1].expand(-1, n0, -1), x], dim=1)
    attn_ad = net.adapters["attn"] if "attn" in net.adapters else None
    mlp_ad = net.adapters["mlp"] if "mlp" in net.adapters else None
    parallel = net.parallel_adapters
    features = []
    for stage in range(net.num_exits):
        n_early, tokens = net.num_early_tokens(stage), x.shape[1]
        mask = net.attention_mask(n_early, tokens, x.device) if n_early else None
        gamma_index = None
        if net.exit_specific:
            gamma_index = torch.full((tokens,), net.num_exits - 1, dtype=torch.long)
            gamma_index[:n_early] = torch.arange(stage, stage + n_early)
        for i in net.stage_blocks(stage):
            blk = bb.blocks[i]
            if attn_ad is not None:
                x = _reference_adapter(attn_ad[i], x, gamma_index)
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), attn_mask=mask)))
            if mlp_ad is not None:
                x = _reference_adapter(mlp_ad[i], x, gamma_index)
            mlp = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            x = x + (mlp + parallel[i](x) if parallel is not None else mlp)
        features.append(net.norms[stage](x[:, 0]))
        x = x[:, 1:] if n_early else x
    return torch.stack([h(f) for h, f in zip(net.heads, features, strict=True)], dim=1)


VARIANTS = {  # name -> MultiExitViT's adapter fields, or exits / reg_tokens
    "e_adapter": dict(),
    "shared_gamma": dict(exit_specific=False),
    "no_separate_cls": dict(exit_specific=False, separate_cls=False),
    "attn_site": dict(sites=["attn"]),
    "mlp_site": dict(sites=["mlp"]),
    "binary": dict(bits=1),
    "adaptformer": dict(kind="adaptformer", exit_specific=False, sites=["mlp"]),
    "lora": dict(kind="lora", exit_specific=False, sites=["q", "v"]),
    "none": dict(kind="none", exit_specific=False, sites=[]),
    "registers": dict(reg_tokens=2),
    "two_exits": dict(exits=[2, 4]),
}


LAYOUTS = ["streams", "joint"]


def build(variant: str, token_layout: str = "streams") -> MultiExitViT:
    adapter = dict(VARIANTS[variant])
    reg = adapter.pop("reg_tokens", 0)
    exits = adapter.pop("exits", [1, 2, 3, 4])
    torch.manual_seed(0)
    # non-trivial trainable weights (zero-initialized up-projections would hide adapters)
    net = MultiExitViT(tiny_backbone(reg_tokens=reg), 7, exits, adapter, token_layout=token_layout)
    return trained_like(net, 0.3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_layouts_equal_the_masked_formulation(variant, dtype, tol, layout):
    net = build(variant, layout).to(dtype)
    images = torch.randn(3, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        expected = masked_reference(net, images)
        got = net(images).logits
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_explicit_attention_path_equals_the_reference(layout):
    net = build("e_adapter", layout).double()
    for block in net.backbone.blocks:
        block.attn.fused_attn = False
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(images).logits, masked_reference(net, images),
                                   atol=1e-10, rtol=1e-10)  # fmt: skip


def test_main_attention_is_unmasked_and_holds_no_early_token(monkeypatch):
    """Every fused attention call is maskless over c_K, R, P only (flash-eligible)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[-2], k.shape[-2], kwargs.get("attn_mask"), args))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(multi_exit_vit.F, "scaled_dot_product_attention", spy)
    net = build("registers")
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    main_tokens = 1 + 2 + 16  # c_K, 2 registers, 16 patches
    assert len(calls) == 4  # one per block
    assert all(c == (main_tokens, main_tokens, None, ()) for c in calls)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stage_api_and_take(layout):
    net = build("e_adapter", layout)
    images = torch.randn(5, 3, 32, 32)
    rows = torch.tensor([4, 1, 2])
    with torch.no_grad():
        full = net(images)
        state = net.embed(images)
        assert isinstance(state, StreamState)
        assert state.main.shape == (5, 17, 48) and state.early.shape == (5, 3, 48)
        state = images
        for stage in range(net.num_exits):
            if stage == 1:
                state = take(state, rows)
            state, features, logits = net.stage(stage, state)
            picked = slice(None) if stage < 1 else rows
            torch.testing.assert_close(logits, full.logits[picked, stage], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(features, full.features[picked, stage], atol=1e-5, rtol=1e-5)
            if stage < net.num_exits - 1:  # the early token exit `stage` read has left
                assert isinstance(state, StreamState) and state.main.shape[1] == 17
                early = state.early.shape[1] if state.early is not None else 0
                assert early == net.num_early_tokens(stage + 1)
        assert state is None  # nothing runs after the last exit


def test_auto_layout_is_streams_on_cuda_only_and_checked():
    net = build("e_adapter", "auto")
    assert net.runs_joint(torch.zeros(1))
    assert net.runs_joint(torch.zeros(1, device="meta"))  # not CUDA
    net.token_layout = "streams"
    assert not net.runs_joint(torch.zeros(1))
    with pytest.raises(ConfigError, match=r"model.net.token_layout='mask' must be one of"):
        net.token_layout = "mask"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("variant", ["e_adapter", "registers", "lora"])
def test_on_cuda_auto_runs_streams_and_both_layouts_agree(variant):
    net = build(variant, "auto").cuda()
    images = torch.randn(4, 3, 32, 32, device="cuda")
    assert not net.runs_joint(images)
    with torch.no_grad():
        streams = net(images).logits
        net.token_layout = "joint"
        joint = net(images).logits
    torch.testing.assert_close(streams, joint, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(streams.cpu(), masked_reference(net.cpu(), images.cpu()),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_gamma_keeps_the_activation_dtype():
    adapter = EAdapter(16, 4, num_gammas=3)
    torch.nn.init.normal_(adapter.up.weight)
    x = torch.randn(2, 5, 16).bfloat16()
    assert adapter.bfloat16()(x, 2).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = adapter.float().act(adapter.down(torch.randn(2, 5, 16)))
        assert (h * adapter.gamma[1].to(h.dtype)).dtype == torch.bfloat16


def test_previous_layout_checkpoint_loads_and_predicts_identically():
    """State dicts + logits written at commit 41f771a (tests/fixtures/make_prev_layout.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make", FIXTURE.with_name("make_prev_layout.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    tensors = load_file(str(FIXTURE))
    for name, kwargs in make.VARIANTS.items():
        backbone = create_backbone("vit_tiny_patch16_224", model_kwargs=make.KWARGS)
        net = MultiExitViT(backbone, 5, [1, 2, 3], **kwargs).eval()
        prefix = f"{name}/state/"
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        net.load_state_dict(state, strict=True)
        with torch.no_grad():
            logits = net(tensors["images"]).logits
        torch.testing.assert_close(logits, tensors[f"{name}/logits"], atol=1e-5, rtol=1e-5)


def test_compiles_fullgraph_forward_and_backward():
    net = build("e_adapter").train()
    images = torch.randn(2, 3, 32, 32)

    def step(module):
        out = module(images)
        loss = out.logits.float().square().mean()
        loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters()
                                     if p.requires_grad}  # fmt: skip

    eager_logits, eager_grads = step(net)
    net.zero_grad(set_to_none=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    logits, grads = step(compiled)
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
