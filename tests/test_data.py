"""Digits data module: stratified, seeded, disjoint splits at the backbone's input size."""

import numpy as np
import pytest
import torch

from met_lightning.data.base import InputSpec
from met_lightning.data.digits import DigitsDataModule
from met_lightning.errors import ConfigError

SPEC = InputSpec((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


def make(seed=0, **kwargs):
    dm = DigitsDataModule(seed=seed, batch_size=32, input_spec=SPEC, **kwargs)
    dm.setup()
    return dm


def test_split_sizes_stratified_and_disjoint():
    dm = make()
    sets = [dm.train_set, dm.val_set, dm.test_set]
    assert [len(s) for s in sets] == [1077, 360, 360]
    for ds in sets:
        counts = np.bincount(ds.tensors[1].numpy(), minlength=10)
        assert counts.min() >= 0.9 * counts.mean()  # every class in every split, balanced
    keys = [{x.numpy().tobytes() for x in s.tensors[0]} for s in sets]
    overlap = (keys[0] & keys[2]) | (keys[1] & keys[2])
    assert len(overlap) <= 5  # digits contains a few duplicated images, nothing more


def test_images_match_backbone_input():
    dm = make()
    raw, labels = next(iter(dm.train_dataloader()))
    assert raw.shape == (32, 1, 8, 8) and raw.dtype == torch.uint8  # as stored: values 0..16
    images = dm.prepare_batch(raw, train=True)  # on the device, in on_after_batch_transfer
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long
    assert torch.equal(images[:, 0], images[:, 2])  # grey level repeated over channels
    assert -1.0 - 1e-6 <= images.min() and images.max() <= 1.0 + 1e-6  # (x - 0.5) / 0.5


def test_split_fixed_by_seed():
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    assert torch.equal(a.test_set.tensors[1], b.test_set.tensors[1])
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(batch_size=0), "data.batch_size"),
        (dict(val_fraction=0.0), "data.val_fraction"),
        (dict(val_fraction=0.5, test_fraction=0.45), "data.test_fraction"),
        (dict(num_classes=12), "data.num_classes"),
    ],
)
def test_bad_options(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DigitsDataModule(**{"input_spec": SPEC, "batch_size": 8, **kwargs})


def test_input_spec_comes_from_the_backbone_config_before_the_backbone(tmp_path):
    """InputSpec.from_backbone_config (meta device: no weights, no download) equals the spec of
    the built backbone; the DataModule takes it at construction."""
    from dataclasses import asdict

    from hydra.utils import instantiate

    from met_lightning.data.base import build_datamodule
    from tests.helpers import TINY_OVERRIDES, compose_config

    for overrides in ([], TINY_OVERRIDES):
        cfg = compose_config(list(overrides), tmp_path)
        spec = InputSpec.from_backbone_config(cfg.backbone)
        assert spec == InputSpec.from_timm(instantiate(cfg.backbone))
        dm = build_datamodule(cfg.data, spec)
        assert dm.input_spec == spec and isinstance(dm.input_spec, InputSpec)
        assert not hasattr(dm, "set_input_spec")
    assert InputSpec.of(asdict(spec)) == spec  # as a checkpoint records it
    with pytest.raises(TypeError, match="input_spec"):
        DigitsDataModule(batch_size=8)
