"""`structured.target_config`: a signature as a typed Hydra node (defaults written once)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from met_lightning.errors import ConfigError
from met_lightning.models.adapters import AdapterConfig
from met_lightning.models.multi_exit_vit import MultiExitViT, NetConfig
from met_lightning.structured import target_config, typed


@dataclass
class Inner:
    size: int = 3


def build(count: int, ratios: Sequence[float] = (0.5, 0.25), name: str | None = None,
          inner: Inner | None = None, **rest: object) -> None:  # fmt: skip
    """A target: one argument without a default, a sequence, an optional, a nested config."""


def test_fields_come_from_the_signature_with_their_types():
    schema = target_config(build, partial=True, skip=("count",), inner=Inner)
    node = OmegaConf.structured(schema)
    assert OmegaConf.to_container(node) == {
        "_target_": f"{__name__}.build", "_partial_": True, "ratios": [0.5, 0.25], "name": None,
        "inner": {"size": 3},
    }  # fmt: skip
    with pytest.raises(ValidationError):
        node.ratios = ["x"]  # list[float]
    with pytest.raises(ConfigAttributeError):
        node.inner.sise = 4  # the nested node is typed too
    with pytest.raises(TypeError, match="'count' has no default"):
        target_config(build)


def test_the_network_node_holds_the_networks_defaults():
    node = OmegaConf.structured(NetConfig)
    assert list(node.exits) == [3, 6, 9, 12] and node.token_layout == "auto"
    assert OmegaConf.to_object(node.adapter) == AdapterConfig()
    assert node._target_ == f"{MultiExitViT.__module__}.MultiExitViT" and node._partial_


def test_typed_names_the_key_and_the_closest_valid_one():
    cfg = OmegaConf.create({"net": {"adapter": {"rnak": 4}}})
    with pytest.raises(ConfigError, match=r"net\.adapter\.rnak: unknown key; did you mean "
                                          r"net\.adapter\.rank\?"):  # fmt: skip
        typed(cfg, "net", NetConfig)
