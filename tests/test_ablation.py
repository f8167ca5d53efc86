"""experiments/run_ablation.py (the demo ablation) and experiments/plot_budget_curves.py."""

from __future__ import annotations

import csv

import pytest

from experiments import plot_budget_curves, run_ablation
from met_lightning.config import validate_config
from tests.helpers import compose_config
from tests.test_report import _as_method, make_run


@pytest.mark.parametrize("setting", list(run_ablation.SETTINGS))
def test_every_setting_composes_into_a_valid_demo_config(setting, tmp_path):
    cfg = compose_config(list(run_ablation.SETTINGS[setting]), tmp_path)
    validate_config(cfg)
    assert cfg.backbone.weights_file.endswith("demo_vit_glyphs.safetensors")  # offline demo
    method = run_ablation.SETTINGS[setting][0].removeprefix("method=")
    assert cfg.model.name == method and setting.startswith(method)


def test_dry_run_lists_every_setting_and_seed(tmp_path, capsys):
    out = tmp_path / "runs"
    assert run_ablation.main(["--dry-run", "--seeds", "0", "1", "--out", str(out)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "-m met_lightning" in x]
    assert len(lines) == 2 * len(run_ablation.SETTINGS)
    assert any("method=lora seed=1" in x and f"{out}/lora/seed1" in x for x in lines)
    assert not (tmp_path / "results").exists()


def _write_curve(folder, points):
    with open(folder / "budget_curve.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["p", "mean_macs", "accuracy"])
        writer.writerows([(i, m, a) for i, (m, a) in enumerate(points)])


def test_curves_are_averaged_over_seeds_per_method(tmp_path):
    for seed in (0, 1):
        met = make_run(tmp_path / "met" / f"s{seed}", data="cifar100", task=None, seed=seed)
        _write_curve(met, [(4e9, 0.5 + 0.1 * seed), (16e9, 0.8)])
        probe = make_run(tmp_path / "lp" / f"s{seed}", data="cifar100", task=None, seed=seed)
        model = {"exits": [-1], "adapter": {"kind": "none", "exit_specific": False}}
        _as_method(probe, "linear_probe", model, [12], 1.0)
        _write_curve(probe, [(16e9, 0.6), (16e9, 0.6)])
    curves = plot_budget_curves.mean_curves([tmp_path])
    assert set(curves) == {"met", "linear_probe"}
    assert curves["met"]["acc"] == pytest.approx([0.55, 0.8]) and curves["met"]["n"] == 2
    assert curves["met"]["fraction"] == pytest.approx([0.25, 1.0])
    png = tmp_path / "curves.png"
    assert plot_budget_curves.main([str(tmp_path), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_budget_curves.main([str(tmp_path / "met" / "s0" / ".hydra"), "--out",
                                    str(png)]) == 1  # fmt: skip
