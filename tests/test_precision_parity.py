"""Precision parity: the logit store records the precision it was made in; predict runs in it."""

import warnings

import pytest
import torch

from met_lightning.errors import ConfigError
from met_lightning.inference.logit_store import LogitStore, SplitLogits
from met_lightning.inference.session import choose_precision
from met_lightning.predict import predict
from tests.helpers import predict_config
from tests.test_predict import write_digits


def store(tmp_path, precision):
    splits = {s: SplitLogits(torch.randn(6, 2, 3), torch.arange(6) % 3) for s in ("val", "test")}
    path = tmp_path / "logits.safetensors"
    LogitStore(splits, (2, 4), (10, 20), precision).save(path)
    return path


def test_store_round_trips_its_precision(tmp_path):
    assert LogitStore.load(store(tmp_path, "bf16-mixed")).precision == "bf16-mixed"
    assert LogitStore.load(store(tmp_path, None)).precision is None  # older stores


def test_predict_precision_defaults_to_the_stores(tmp_path):
    path = store(tmp_path, "bf16-mixed")
    assert (
        choose_precision(predict_config(checkpoint=str(tmp_path), store=str(path))) == "bf16-mixed"
    )
    elsewhere = str(tmp_path / "other" / "trainable.safetensors")  # a folder without a store
    assert choose_precision(predict_config(checkpoint=elsewhere)) == "32-true"
    with pytest.warns(UserWarning, match="calibrated on logits made in precision bf16-mixed"):
        got = choose_precision(predict_config(checkpoint=str(tmp_path), precision="32-true"))
    assert got == "32-true"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            choose_precision(predict_config(checkpoint=str(tmp_path), precision="bf16"))
            == "bf16-mixed"
        )


def test_trained_run_records_the_trainer_precision_and_predict_uses_it(tiny_run, tmp_path):
    assert LogitStore.load(tiny_run).precision == "32-true"  # trainer.precision of the run
    inputs = write_digits(tmp_path / "in", range(6))
    result = predict(
        predict_config(checkpoint=str(tiny_run), input=str(inputs), budget=0.7, show=0)
    )
    assert result["totals"]["precision"] == "32-true"


def test_predict_rejects_bad_precision_and_mode(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="precision='fp8' must be one of"):
        predict(predict_config(checkpoint=str(tiny_run), input=str(tmp_path), precision="fp8"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="engine_mode=graphs replays CUDA graphs"):
            options = dict(input=str(tmp_path), engine_mode="graphs", device="cpu")
            predict(predict_config(checkpoint=str(tiny_run), **options))
