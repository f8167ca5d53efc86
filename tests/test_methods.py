"""The baselines and variants of issue 5: every method builds from its config, trains a step, has
the expected trainable-parameter count; LoRA touches only its slices; 1-bit adapters."""

import math
from dataclasses import asdict

import pytest
import torch
from hydra.utils import instantiate

from met_lightning.checkpoint import load_trainable, read_trainable, save_trainable
from met_lightning.checkpoint.trainable import export_state, pack, storage_bytes, unpack
from met_lightning.config import validate_config
from met_lightning.data.base import InputSpec
from met_lightning.errors import ConfigError
from met_lightning.models.adapters import (
    SIGN_SCALE,
    BinaryParts,
    EAdapter,
    LoRAQKV,
    ParallelAdapter,
    binarize,
    binary_weights,
)
from met_lightning.models.multi_exit_vit import MultiExitViT
from met_lightning.training.module import MultiExitClassifier, count_parameters
from tests.helpers import METHODS, TINY_BACKBONE, TINY_KWARGS, compose_config, tiny_backbone

D, DEPTH, C = TINY_KWARGS["embed_dim"], TINY_KWARGS["depth"], 10


def head_params(num_exits: int) -> int:
    return num_exits * (2 * D + D * C + C)  # LN_k + linear per exit


def backbone_params() -> int:
    return sum(p.numel() for p in tiny_backbone().parameters())


def used_backbone_params() -> int:
    """The backbone's parameters but its final norm: full fine-tuning trains what it runs."""
    return backbone_params() - sum(p.numel() for p in tiny_backbone().norm.parameters())


def expected_trainable(method: str, r: int = 8) -> int:
    """The published formula of each method on the tiny ViT (d=48, 4 blocks), 10 classes."""
    k = 4 if method in ("met", "multi_exit_linear") else 1  # exits [1, 2, 3, 4] / [-1]
    return {
        "met": 2 * DEPTH * (2 * D * r + r + D + k * r),  # 2 sites, shared W, K gammas
        "linear_probe": 0,
        "full_finetune": used_backbone_params(),
        "adapter": DEPTH * (2 * D * r + r + D),  # AdaptFormer: one parallel adapter per block
        "lora": DEPTH * 2 * (2 * D * r),  # A [r, d] and B [d, r] on q and v
        "multi_exit_linear": 0,
    }[method] + head_params(k)


def build(method: str, tmp_path, *overrides: str):
    exits = "[1,2,3,4]" if method in ("met", "multi_exit_linear") else "[-1]"
    cfg = compose_config(
        [f"method={method}", *TINY_BACKBONE, f"model.net.exits={exits}", *overrides], tmp_path
    )
    validate_config(cfg)
    torch.manual_seed(0)
    net = instantiate(cfg.model.net)(backbone=tiny_backbone(), num_classes=C)
    return cfg, net


@pytest.mark.parametrize("method", METHODS)
def test_method_builds_trains_one_step_with_exact_parameter_count(method, tmp_path):
    cfg, net = build(method, tmp_path)
    trainable, total = count_parameters(net)
    assert trainable == expected_trainable(method)
    added = trainable - (used_backbone_params() if method == "full_finetune" else 0)
    assert total == backbone_params() + added
    frozen = {n: p.clone() for n, p in net.named_parameters() if not p.requires_grad}
    before = {n: p.clone() for n, p in net.named_parameters() if p.requires_grad}

    module = MultiExitClassifier(
        net, instantiate(cfg.model.loss)(num_exits=net.num_exits), torch.optim.AdamW
    )
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % C
    parts = module.loss(*net(images), labels)
    parts.total.backward()
    optimizer.step()

    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)
    changed = [
        n for n, p in net.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert any(n.startswith("heads.") for n in changed)
    if method == "full_finetune":
        assert any(n.startswith("backbone.blocks.") for n in changed)
        assert net.training and net.backbone.training  # dropout etc. follow the mode
    else:
        assert not net.backbone.training  # frozen backbone stays in eval mode
    assert net(images).logits.shape == (8, net.num_exits, C)


@pytest.mark.parametrize("method", METHODS)
def test_model_node_instantiates_the_module_train_builds(method, tmp_path):
    """`train.instantiate_model(cfg.model, ...)`: the LightningModule of `model._target_` with
    the method's network (the same trainable count), loss, optimizer and scheduler."""
    from met_lightning.losses.multi_exit import MultiExitLoss
    from met_lightning.train import instantiate_model

    exits = "[1,2,3,4]" if method in ("met", "multi_exit_linear") else "[-1]"
    cfg = compose_config([f"method={method}", *TINY_BACKBONE, f"model.net.exits={exits}"], tmp_path)
    validate_config(cfg)
    module = instantiate_model(cfg.model, tiny_backbone(), C)
    assert isinstance(module, MultiExitClassifier) and isinstance(module.net, MultiExitViT)
    assert module.num_trainable == expected_trainable(method)
    assert isinstance(module.loss, MultiExitLoss)
    assert len(module.loss.exit_weights) == module.net.num_exits
    assert module.loss.graph_weight == cfg.model.loss.graph_weight
    assert module.optimizer_factory.keywords["lr"] == cfg.optimizer.lr
    assert module.scheduler_factory.keywords["warmup_epochs"] == cfg.scheduler.warmup_epochs


def test_scheduler_none_trains_at_a_constant_rate(tmp_path):
    """scheduler=none composes a config without `_target_` (the demo's warmup_epochs stays in
    it): no scheduler."""
    from met_lightning.train import instantiate_model

    cfg = compose_config(["scheduler=none", *TINY_BACKBONE, "model.net.exits=[2,4]"], tmp_path)
    validate_config(cfg)
    module = instantiate_model(cfg.model, tiny_backbone(), C)
    assert module.scheduler_factory is None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", ["model node", "before targets"])
def test_recorded_config_of_either_layout_rebuilds_the_same_network(method, layout, tmp_path):
    """A trainable file's config as train() writes it (`model` with `net`), or as files written
    before the `model` node named its `_target_`s hold it (`method` + the switches): the same
    network, the same logits."""
    from omegaconf import OmegaConf

    from met_lightning.train import rebuild_config
    from tests.helpers import legacy_model_config

    cfg, net = build(method, tmp_path)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    net.eval()
    spec = InputSpec.from_backbone_config(cfg.backbone)
    config = {**rebuild_config(cfg, C, spec), "seed": 0}  # build() seeds the backbone with 0
    assert config["model"]["net"]["_target_"].endswith("MultiExitViT")
    assert "optimizer" not in config["model"] and "method" not in config
    if layout == "before targets":
        method_node, model = legacy_model_config(cfg)
        config = {**config, "method": method_node, "model": model}
        assert "_target_" not in OmegaConf.create(config["model"])
    save_trainable(net, tmp_path / "trainable.safetensors", config)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the random tiny backbone is rebuilt from the recorded seed
        loaded, _ = load_trainable(tmp_path / "trainable.safetensors")
    assert count_parameters(loaded) == count_parameters(net)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, net(images).logits)


@pytest.mark.parametrize("node", ["model.net", "backbone"])
def test_recorded_targets_must_be_known(tmp_path, node, monkeypatch):
    """A checkpoint's config is data: its `model.net._target_` and `backbone._target_` are not
    imported and called."""
    from met_lightning.errors import CheckpointError
    from met_lightning.train import rebuild_config

    cfg, net = build("linear_probe", tmp_path)
    config = rebuild_config(cfg, C, InputSpec.from_backbone_config(cfg.backbone))
    parent = config["model"]["net"] if node == "model.net" else config["backbone"]
    parent["_target_"] = "os.system"
    save_trainable(net, tmp_path / "trainable.safetensors", config)
    monkeypatch.setattr("os.system", lambda *a, **k: pytest.fail("os.system was called"))
    with pytest.raises(CheckpointError, match=rf"{node}._target_='os.system' is not one of"):
        load_trainable(tmp_path / "trainable.safetensors")


@pytest.mark.parametrize("method", ["met", "adapter", "lora"])
def test_adapters_start_as_the_plain_backbone(method, tmp_path):
    """Zero-initialized up-projections / LoRA B: the class token equals the frozen ViT's."""
    _, net = build(method, tmp_path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = net.backbone.forward_features(images)[:, 0]  # final norm included; B = 0 in LoRA
        ours = net(images).features[:, -1]  # LN_K starts as a copy of the final norm
    assert torch.allclose(ours, plain, atol=1e-5)


def test_lora_adds_to_the_q_and_v_slices_only():
    qkv = torch.nn.Linear(D, 3 * D)
    lora = LoRAQKV(qkv, rank=4, sites=["q", "v"], scale=2.0)
    torch.nn.init.normal_(lora.lora_b["q"])
    torch.nn.init.normal_(lora.lora_b["v"])
    x = torch.randn(2, 5, D)
    delta = lora(x) - qkv(x)
    q, k, v = delta.split(D, dim=-1)
    assert torch.equal(k, torch.zeros_like(k))
    expected_q = 2.0 * x @ lora.lora_a["q"].t() @ lora.lora_b["q"].t()
    assert torch.allclose(q, expected_q, atol=1e-5) and v.abs().sum() > 0


def test_adaptformer_adapter_is_parallel_to_the_mlp_with_scale(tmp_path):
    adapter = ParallelAdapter(D, rank=4, scale=0.1)
    x = torch.randn(2, 3, D)
    assert torch.equal(adapter(x), torch.zeros_like(x))  # W_up = 0, b_up = 0 at init
    torch.nn.init.normal_(adapter.up.weight)
    expected = 0.1 * adapter.up(torch.relu(adapter.down(x)))
    assert torch.allclose(adapter(x), expected)


# ---------------------------------------------------------------------- 1-bit adapters
def test_quantized_weight_takes_exactly_two_values_mu_plus_minus_scaled_sigma():
    w = torch.randn(8, 48) * 0.3 + 0.05
    q = binarize(w)
    values = torch.unique(q)
    assert len(values) == 2
    mu, sigma = w.mean(), w.std(unbiased=False)
    expected = torch.stack([mu - SIGN_SCALE * sigma, mu + SIGN_SCALE * sigma])
    assert torch.allclose(values, expected)
    assert torch.equal(q > mu, w >= mu)  # the sign of each entry is kept
    # a zero-initialized up-projection stays exactly 0 (sigma = 0), so the adapter is a no-op
    assert torch.equal(binarize(torch.zeros(4, 4)), torch.zeros(4, 4))


def test_straight_through_gradient():
    w = torch.randn(6, 5, requires_grad=True)
    grad = torch.randn(6, 5)
    binarize(w).backward(grad)
    assert torch.equal(w.grad, grad)


def test_pack_unpack_round_trip_and_size():
    w = torch.randn(7, 13)  # 91 entries: not a multiple of 8
    parts = BinaryParts.of(w)
    packed = pack(parts, "w")
    assert packed["w.signs"].dtype == torch.uint8 and packed["w.signs"].numel() == math.ceil(91 / 8)
    back = unpack(packed, "w", w.shape)
    assert torch.equal(back.positive, parts.positive)
    assert torch.equal(back.weight(), parts.weight())


@pytest.mark.parametrize("method", ["met", "adapter"])
def test_one_bit_trained_layers_two_values_each_and_export_round_trip(method, tmp_path):
    cfg, net = build(method, tmp_path, "model.net.adapter.bits=1")
    binary = binary_weights(net)
    assert len(binary) == 2 * DEPTH * (2 if method == "met" else 1)  # down + up per adapter
    loss = instantiate(cfg.model.loss)(num_exits=net.num_exits)
    module = MultiExitClassifier(net, loss, torch.optim.AdamW)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % C
    for _ in range(3):
        optimizer.zero_grad()
        module.loss(*net(images), labels).total.backward()
        optimizer.step()
    net.eval()
    for layer in binary.values():
        assert len(torch.unique(layer.effective_weight())) == 2  # exactly two values per layer
        assert len(torch.unique(layer.weight)) > 2  # the latent weights are full precision

    config = {"model": _plain(cfg.model), "backbone": _plain(cfg.backbone), "num_classes": C,
              "input_spec": asdict(InputSpec.from_backbone_config(cfg.backbone)),
              "seed": 0}  # fmt: skip
    save_trainable(net, tmp_path / "trainable.safetensors", config)
    tensors, _ = read_trainable(tmp_path / "trainable.safetensors")
    packed = [k for k in tensors if k.endswith(".signs")]
    assert len(packed) == len(binary) and all(tensors[k].dtype == torch.uint8 for k in packed)
    assert not any(k in tensors for k in binary)  # no full-precision copy of a 1-bit weight

    with torch.random.fork_rng():
        torch.manual_seed(0)  # the random tiny backbone is rebuilt from the recorded seed
        loaded, _ = load_trainable(tmp_path / "trainable.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, net(images).logits)  # bit-identical
    # and exporting the loaded network again gives the same file contents
    again = export_state(loaded)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_one_bit_storage_is_about_a_32nd_of_the_adapter_weights(tmp_path):
    _, full = build("met", tmp_path)
    _, one_bit = build("met", tmp_path, "model.net.adapter.bits=1")
    weights = sum(m.weight.numel() for m in binary_weights(one_bit).values())
    layers = len(binary_weights(one_bit))
    saved = storage_bytes(full) - storage_bytes(one_bit)
    # each weight goes from 4 bytes to 1 bit, plus mu and sigma (fp32) per layer
    assert (
        saved
        == 4 * weights
        - sum(math.ceil(m.weight.numel() / 8) for m in binary_weights(one_bit).values())
        - 8 * layers
    )


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


# ---------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["model.net.adapter.kind=prompt"], "model.net.adapter.kind", "must be one of"),
        (
            ["method=lora", "model.net.adapter.sites=[attn]"],
            "model.net.adapter.sites",
            "q', 'k', 'v",
        ),
        (
            ["method=adapter", "model.net.adapter.sites=[attn]"],
            "model.net.adapter.sites",
            "['mlp']",
        ),
        (
            ["method=linear_probe", "model.net.adapter.sites=[mlp]"],
            "model.net.adapter.sites",
            "sites=[]",
        ),
        (["method=lora", "model.net.adapter.bits=1"], "model.net.adapter.bits=1", "bits=32"),
        (["model.net.adapter.bits=4"], "model.net.adapter.bits=4", "[1, 32]"),
        (["model.net.adapter.scale=0.5"], "model.net.adapter.scale", "adaptformer only"),
        (["method=adapter", "model.net.adapter.exit_specific=true"], "exit_specific", "e_adapter"),
        (["model.net.exits=[-13]"], "model.net.exits", "-1..-12"),
        (["model.net.exits=[3,-1,-1]"], "model.net.exits", "duplicate"),
    ],
)
def test_method_config_errors_name_the_key(overrides, key, fragment, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(overrides, tmp_path))
    assert key in str(err.value) and fragment in str(err.value)


def test_negative_exits_count_from_the_end(tmp_path):
    _, net = build("met", tmp_path, "model.net.exits=[2,-1]")
    assert net.exits == (2, 4)


def test_ablation_switches_build_what_they_say(tmp_path):
    _, shared = build("met", tmp_path, "model.net.adapter.exit_specific=false")
    assert all(a.gamma.shape[0] == 1 for a in shared.adapters["attn"])
    _, no_cls = build(
        "met",
        tmp_path,
        "model.net.adapter.exit_specific=false",
        "model.net.adapter.separate_cls=false",
    )
    assert no_cls.num_early_tokens(0) == 0 and isinstance(no_cls.adapters["mlp"][0], EAdapter)
    cfg, _ = build("met", tmp_path, "model.loss.graph_weight=0")
    assert instantiate(cfg.model.loss)(num_exits=4).graph_weight == 0
    _, lp = build("linear_probe", tmp_path)
    assert isinstance(lp, MultiExitViT) and lp.exits == (DEPTH,) and len(lp.adapters) == 0


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    "method, overrides",
    [
        ("lora", ["model.net.exits=[-1]"]),
        ("met", ["model.net.exits=[2,4]", "model.net.adapter.bits=1"]),
    ],
)
def test_cli_run_exports_weights_that_reproduce_its_test_logits(method, overrides, tmp_path):
    """A `python -m met_lightning method=...` run (in-process): the exported trainable.safetensors
    (1-bit packed for bits=1), loaded into a rebuilt network, gives the test logits the run
    stored."""
    from omegaconf import OmegaConf

    from met_lightning.inference.logit_store import LogitStore
    from tests.helpers import TINY_OVERRIDES, run_folder, run_task

    tiny = [o for o in TINY_OVERRIDES if not o.startswith("model.net.exits")]
    args = ["debug=fast", f"method={method}", *tiny, *overrides]
    result = run_task(args, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_folder(tmp_path)
    summary = (run / "summary.json").read_text()
    assert '"storage_kb"' in summary

    net, config = load_trainable(run)
    cfg = OmegaConf.load(run / "config.yaml")
    datamodule = instantiate(cfg.data, input_spec=InputSpec.of(config["input_spec"]))
    datamodule.setup("test")
    with torch.no_grad():
        loader = datamodule.test_dataloader()  # uint8 batches, prepared as on the device
        logits = torch.cat([net(datamodule.prepare_batch(x)).logits for x, _ in loader])
    stored = LogitStore.load(run).splits["test"].logits
    n = min(len(stored), len(logits))  # debug=fast tests a few batches only
    assert n > 0
    torch.testing.assert_close(logits[:n], stored[:n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, sites", [("adaptformer", ["mlp"]), ("lora", ["q", "v"])])
def test_early_exit_engine_works_for_every_adapter_kind(kind, sites):
    """Multi-exit AdaptFormer / LoRA: the engine gives the simulated exits and the full logits."""
    from met_lightning.inference.budget import SplitScores, calibrate_thresholds, simulate_exits
    from met_lightning.inference.engine import EarlyExitEngine

    adapter = dict(kind=kind, exit_specific=False, sites=sites)
    net = MultiExitViT(tiny_backbone(), C, [1, 2, 4], adapter=adapter).eval()
    for p in net.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    images = torch.randn(30, 3, 32, 32)
    with torch.no_grad():
        full = net(images).logits
    scores = SplitScores.from_logits(full, torch.zeros(30, dtype=torch.long))
    thresholds = calibrate_thresholds(scores.confidence, [0.4, 0.3, 0.3])
    result = EarlyExitEngine(net, thresholds)(images)
    expected = simulate_exits(scores.confidence, thresholds)
    assert torch.equal(result.exit_index, expected) and len(expected.unique()) == 3
    rows = torch.arange(30)
    torch.testing.assert_close(result.logits, full[rows, expected], atol=1e-5, rtol=1e-5)
