"""Config validation fails before training, naming the key; the real configs compose."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from met_lightning.config import validate_config
from met_lightning.errors import ConfigError
from met_lightning.paths import config_dir
from tests.helpers import compose_config, run_cli


@pytest.mark.parametrize(
    "overrides, key, hint",
    [
        (
            ["model.net.exits=[3,6,9,13]"],
            "model.net.exits",
            "model.net.exits=[3, 6, 9, 13]: block(s) [13] outside 1..12",
        ),
        (
            ["model.net.exits=[6,3,9,12]"],
            "model.net.exits",
            "model.net.exits=[6, 3, 9, 12] is not sorted; use model.net.exits=[3, 6, 9, 12]",
        ),
        (
            ["model.net.exits=[3,3,9,12]"],
            "model.net.exits",
            "model.net.exits=[3, 3, 9, 12] has duplicate blocks",
        ),
        (["model.net.exits=[3,6,9]"], "model.net.exits", "last block 12"),
        (
            ["model.net.adapter.rank=0"],
            "model.net.adapter.rank",
            "model.net.adapter.rank=0 must be a positive integer",
        ),
        (["model.net.adapter.rank=-4"], "model.net.adapter.rank", "positive"),
        (
            ["model.net.adapter.separate_cls=false", "model.net.adapter.exit_specific=true"],
            "model.net.adapter.exit_specific",
            "separate_cls",
        ),
        (
            ["+model.net.adapter.rnk=4"],
            "model.net.adapter.rnk: unknown key",
            "valid keys there: kind, rank, exit_specific",
        ),
        (["model.net.adapter.sites=[attn,ffn]"], "model.net.adapter.sites", "attn"),
        (["model.loss.graph=knn"], "model.loss.graph", "label"),
        (
            ["model.net.token_layout=mask"],
            "model.net.token_layout='mask'",
            "'auto', 'streams', 'joint'",
        ),
        (
            ["model.loss.graph_weight=-0.5"],
            "model.loss.graph_weight",
            "model.loss.graph_weight=-0.5 must be >= 0",
        ),
        (["model.loss.exit_weights=[1,1]"], "model.loss.exit_weights", "one weight per exit"),
        (["data.batch_size=0"], "data.batch_size", "data.batch_size=0 must be a positive integer"),
        (["+data.batchsize=8"], "data.batchsize: unknown key", "did you mean data.batch_size?"),
        (["+trainer.max_epoch=3"], "trainer.max_epoch", "did you mean trainer.max_epochs?"),
        (["+optimizer.lrr=0.1"], "optimizer.lrr", "did you mean optimizer.lr?"),
        (["optimizer.lr=fast"], "optimizer.lr='fast'", "must be a number, not a string"),
        (["optimizer.decay_norm_bias=3"], "optimizer.decay_norm_bias=3", "true or false"),
        (["data.num_workers=two"], "data.num_workers", "must be an integer, not a string"),
        (["data=vtab1k", "data.num_classes=ten"], "data.num_classes", "an integer or null"),
        (["trainer.max_epochs=0"], "trainer.max_epochs", ">= 1"),
        (["+modle.exits=[1]"], "modle", "unknown top-level"),
        (["backbone.name=vit_nonexistent"], "backbone.name", "not a timm model"),
    ],
)
def test_invalid_config_names_key(tmp_path, overrides, key, hint):
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(Exception) as info:
        validate_config(cfg)
    assert info.type.__name__ in ("ConfigError", "BackboneError")
    assert key in str(info.value) and hint in str(info.value)


def test_default_config_is_the_documented_demo(tmp_path):
    cfg = compose_config([], tmp_path)
    validate_config(cfg)  # raises ConfigError if invalid
    assert cfg.model.name == "met" and list(cfg.model.net.exits) == [3, 6, 9, 12]
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.backbone.weights_file.endswith("demo_vit_glyphs.safetensors")
    assert list(cfg.logger) == ["csv"] and cfg.trainer.max_epochs == 12


def test_experiment_composes(tmp_path):
    cfg = compose_config(["+experiment=demo", "model.net.adapter.rank=4"], tmp_path)
    validate_config(cfg)
    assert cfg.model.net.adapter.rank == 4 and cfg.backbone.name == "vit_tiny_patch16_224"


def test_cli_config_error_is_one_line_without_traceback(tmp_path):
    result = run_cli(["model.net.exits=[3,6,9,14]", f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "model.net.exits" in result.stderr and "outside 1..12" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # failed before training


def test_config_error_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        validate_config(compose_config(["model.net.adapter.rank=0"], tmp_path))


# ---------------------------------------------------------------------- configs lead to code
METHOD_FILES = sorted(p.stem for p in (Path(config_dir()) / "method").glob("*.yaml"))


def _targets(node, key=""):
    """(dotted key, `_target_`) of every node of a loaded yaml file."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield key or "<root>", node["_target_"]
        for name, value in node.items():
            yield from _targets(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{key}[{i}]")


@pytest.mark.parametrize(
    "override, reason",
    [
        ("model.net.adapter.rank=abc", "could not be converted to Integer"),
        ("model.net.adapter.rnk=4", "Key 'rnk' not in 'AdapterConfig'"),
        ("model.loss.graph_weight=[1]", "graph_weight"),
    ],
)
def test_typed_model_node_refuses_wrong_types_when_composed(override, reason, tmp_path):
    """The `model` node is a structured config (`method=base`): Hydra refuses a wrong type or an
    unknown key while it composes, naming the override."""
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override], tmp_path)
    text = f"{err.value} {err.value.__cause__}"
    assert override in text and reason in text, text


def test_every_target_in_conf_is_importable():
    """A newcomer finds the code of a yaml file by its `_target_`: each one imports (those of
    optional plugins, e.g. the Optuna sweeper, where the plugin is installed)."""
    import importlib.util

    import yaml
    from hydra.utils import get_object

    found, optional = 0, []
    for path in sorted(Path(config_dir()).rglob("*.yaml")):
        for key, target in _targets(yaml.safe_load(path.read_text()) or {}):
            try:  # a namespace package (hydra_plugins) may lack the plugin
                spec = importlib.util.find_spec(target.rsplit(".", 1)[0])
            except ModuleNotFoundError:
                spec = None
            if spec is None:
                optional.append(target)
                continue
            assert callable(get_object(target)), f"{path.name}: {key}._target_={target}"
            found += 1
    assert found >= 20 and set(optional) <= {
        "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        "optuna.samplers.TPESampler",
    }


def test_method_group_lists_the_six_methods():
    assert METHOD_FILES == sorted(
        ["met", "linear_probe", "full_finetune", "adapter", "lora", "multi_exit_linear"]
    )
    assert not (Path(config_dir()) / "model").exists()  # one group per concept: method


@pytest.mark.parametrize("method", METHOD_FILES)
def test_every_method_composes_into_a_model_node_with_targets(method, tmp_path):
    cfg = compose_config([f"method={method}"], tmp_path)
    validate_config(cfg)
    model = cfg.model
    assert model.name == method and "method" not in cfg
    assert model._target_ == "met_lightning.training.module.MultiExitClassifier"
    assert model.net._target_ == "met_lightning.models.multi_exit_vit.MultiExitViT"
    assert model.loss._target_ == "met_lightning.losses.multi_exit.MultiExitLoss"
    assert model.optimizer == cfg.optimizer and model.scheduler == cfg.scheduler
    # exactly the LightningModule's arguments, no mirrored method switches
    assert set(model) == {"_target_", "name", "net", "loss", "optimizer", "scheduler", "compile",
                          "compile_mode"}  # fmt: skip
    assert set(model.net) == {"_target_", "_partial_", "exits", "adapter", "finetune_backbone",
                              "token_layout"}  # fmt: skip


def test_public_keys_reach_the_network_and_the_module(tmp_path):
    cfg = compose_config(["method=adapter", "model.net.adapter.rank=4", "model.net.exits=[6,12]",
                          "optimizer.lr=0.5", "trainer=gpu"], tmp_path)  # fmt: skip
    validate_config(cfg)
    assert cfg.model.net.adapter.rank == 4 and list(cfg.model.net.exits) == [6, 12]
    assert cfg.model.optimizer.lr == 0.5 and cfg.model.compile is True


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["+model.net.adapter.rnak=4"],
            "model.net.adapter.rnak: unknown key; did you mean model.net.adapter.rank?",
        ),
        (["+model.net.exit=[4]"], "model.net.exit: unknown key; did you mean model.net.exits?"),
        (["+model.loss.grpah=label"], "model.loss.grpah: unknown key"),
        (["model._target_=met_lightning.nowhere.Module"], "model._target_"),
        (["+model.compil=true"], "model.compil: unknown key"),
    ],
)
def test_model_node_errors_name_the_key(overrides, fragment, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(overrides, tmp_path))
    assert fragment in str(err.value)
