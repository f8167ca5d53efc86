"""The predict CLI and the engine on real run folders (a tiny CLI run, and the full demo)."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_digits

from met_lightning.checkpoint import load_trainable
from met_lightning.data.digits import stratified_split
from met_lightning.errors import CheckpointError, ConfigError, DataError
from met_lightning.inference.budget import SplitScores, simulate_exits
from met_lightning.inference.engine import EarlyExitEngine
from met_lightning.inference.logit_store import LogitStore
from met_lightning.macs import model_exit_costs
from met_lightning.predict import predict
from tests.helpers import predict_config, run_cli, run_split, run_task


def write_digits(folder, indices):
    """scikit-learn digits as 8x8 grey PNG files named `<index>_<label>.png`."""
    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        pixels = np.round(digits.images[i] / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"{i:04d}_{digits.target[i]}.png")
    return folder


def run_predict(args, cwd):
    return run_cli(args, cwd=cwd, module="met_lightning.predict")


def test_engine_reproduces_the_runs_stored_simulation(tiny_run):
    """Thresholds from the run's budget.json, engine on the val images = simulation on the store."""
    net, _ = load_trainable(tiny_run)
    images, labels = run_split(tiny_run, "val")  # stored uint8 -> the model's input, as in training
    store = LogitStore.load(tiny_run)
    assert torch.equal(store["val"].labels, labels)  # the stored pass covered the whole val split
    report = json.loads((tiny_run / "budget.json").read_text())
    for budget in report["budgets"]:
        thresholds = [float(t) for t in budget["selected"]["thresholds"]]
        scores = SplitScores.from_logits(store["val"].logits, labels)
        simulated = simulate_exits(scores.confidence, thresholds)
        result = EarlyExitEngine(net, thresholds)(images)
        assert torch.equal(result.exit_index, simulated)
        rows = torch.arange(len(labels))
        assert torch.equal(result.predictions, scores.predictions[rows, simulated])


def test_predict_cli_with_a_budget(tiny_run, tmp_path):
    inputs = write_digits(tmp_path / "in", range(24))
    out = tmp_path / "preds.csv"
    args = [f"checkpoint={tiny_run}", f"input={inputs}", "budget=0.7", f"output={out}"]
    result = run_task(args, tmp_path, module="met_lightning.predict")  # the CLI's error: below
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fewer MACs than the last exit" in result.stdout and "MMACs" in result.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24
    assert {"file", "class", "class_name", "confidence", "exit", "block", "macs"} == set(rows[0])
    net, _ = load_trainable(tiny_run)
    costs = model_exit_costs(net)
    for row in rows:
        assert int(row["macs"]) == costs.to_exit[int(row["exit"]) - 1]
        assert 0.0 <= float(row["confidence"]) <= 1.0
    mean = sum(int(r["macs"]) for r in rows) / len(rows)
    assert mean < costs.full  # a budget of 70 % sends some images out early


def test_predict_thresholds_and_defaults(tiny_run, tmp_path):
    inputs = write_digits(tmp_path / "in", range(10))
    everyone_first = predict(predict_config(checkpoint=str(tiny_run), input=str(inputs),
                                         thresholds=[0.0], show=0))  # fmt: skip
    assert {r["exit"] for r in everyone_first["rows"]} == {1}
    nobody_early = predict(predict_config(checkpoint=str(tiny_run), input=[str(inputs)], show=0))
    assert {r["exit"] for r in nobody_early["rows"]} == {2}
    assert nobody_early["totals"]["speedup"] == pytest.approx(1.0)
    one_file = predict(predict_config(checkpoint=str(tiny_run / "trainable.safetensors"),
                                   input=str(inputs / "0000_0.png"), show=0))  # fmt: skip
    assert len(one_file["rows"]) == 1


def test_predict_errors_name_the_problem(tiny_run, tmp_path):
    inputs = write_digits(tmp_path / "in", range(3))
    ok = dict(checkpoint=str(tiny_run), input=str(inputs), show=0)
    cases = [
        (dict(ok, checkpoint=str(tmp_path / "nope")), CheckpointError, "does not exist"),
        (dict(ok, input=str(tmp_path / "missing.png")), DataError, "missing.png"),
        (dict(ok, budget=0.01), ConfigError, "below the cost of exit 1"),
        (dict(ok, thresholds=[0.1, 0.2, 0.3]), ConfigError, "thresholds has 3 values"),
        (dict(ok, thresholds=[0.5], budget=0.5), ConfigError, "not both"),
        (dict(ok, batch_size=0), ConfigError, "batch_size=0"),
        (dict(ok, confidence="top1"), ConfigError, "confidence='top1'"),
        (dict(ok, budget=0.5, store=str(tmp_path)), CheckpointError, "logit store"),
    ]
    for values, error, message in cases:
        with pytest.raises(error, match=message):
            predict(predict_config(**values))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        predict(predict_config(**dict(ok, input=str(tmp_path / "empty"))))
    (inputs / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        predict(predict_config(**ok))
    kept = predict(predict_config(**dict(ok, skip_bad_images=True)))
    assert len(kept["rows"]) == 3


def test_predict_cli_error_is_one_line(tiny_run, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_predict([f"checkpoint={tiny_run}", f"input={tmp_path / 'empty'}"], tmp_path)
    assert result.returncode == 2
    assert "error: input folder" in result.stderr and "has no images" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.log"))  # predict writes nothing unless asked


@pytest.mark.demo
def test_predict_on_the_demo_checkpoint(demo_run, tmp_path):
    _, folder = demo_run
    config = OmegaConf.load(folder / "config.yaml")
    assert config.data._target_.endswith("DigitsDataModule")
    _, _, test_index = stratified_split(load_digits().target, 0.2, 0.2, seed=config.seed)
    inputs = write_digits(tmp_path / "in", test_index[:100])  # images the run never trained on
    result = predict(predict_config(checkpoint=str(folder), input=str(inputs), budget=0.5, show=0))
    rows, totals = result["rows"], result["totals"]
    accuracy = np.mean([r["class_name"] == r["file"].split("_")[-1][0] for r in rows])
    assert accuracy >= 0.9
    assert totals["mean_macs"] <= 0.6 * totals["full_macs"]  # the 50 % budget, give or take
    assert math.isinf(float(totals["thresholds"][-1]))
