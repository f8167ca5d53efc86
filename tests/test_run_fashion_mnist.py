"""experiments/run_fashion_mnist.py: the planned runs, the pixel baselines on the runs' own split
(tiny idx files in the Debian layout) and the table, in-process."""

from __future__ import annotations

import json

import numpy as np

from experiments import run_fashion_mnist as script
from tests.test_torchvision_data import mnist_arrays, write_idx_folder


def test_dry_run_plans_every_method_and_seed(tmp_path, capsys):
    argv = ["--dry-run", "--seeds", "0", "1", "2", "--out", str(tmp_path),
            "--extra", f"data.root={tmp_path}"]  # fmt: skip
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    for method in script.METHODS:
        for seed in (0, 1, 2):
            assert f"method={method} seed={seed} data.root={tmp_path}" in out
    assert out.count("# baselines logreg, svm_rbf seed") == 3
    assert "18 run(s) to do" in out
    assert "+experiment=fashion_mnist_1k" in out and "/usr/share" not in out


def test_baselines_see_the_runs_split_and_the_table_renders(tmp_path):
    root = write_idx_folder(tmp_path / "fm", mnist_arrays(300, 100), gz=True)
    overrides = ["+experiment=fashion_mnist_1k", f"data.root={root}", "data.train_size=100",
                 "data.val_size=20", "seed=0"]  # fmt: skip
    data = script.split_pixels(overrides)
    assert [len(data[s][1]) for s in ("train", "val", "test")] == [100, 20, 100]
    assert data["train"][0].shape[1] == 784 and 0.0 <= data["train"][0].min() <= 1.0
    said = []
    results = script.run_baselines(tmp_path / "out", 0, overrides, script.BASELINES, False,
                                   said.append)  # fmt: skip
    assert [r["method"] for r in results] == ["logreg", "svm_rbf"]
    assert results[0]["params"] == 784 * 10 + 10 and results[0]["sizes"]["val"] == 20
    saved = json.loads((tmp_path / "out" / "baselines" / "seed0.json").read_text())
    assert saved == results
    again = script.run_baselines(tmp_path / "out", 0, overrides, ["logreg"], False, said.append)
    assert again == results[:1] and "skip, finished" in said[-1]
    run = tmp_path / "out" / "met" / "seed0"
    run.mkdir(parents=True)
    exits = [{"exit": k + 1, "block": 3 * (k + 1), "accuracy": 0.5 + 0.1 * k, "macs": 1e6 * (k + 1)}
             for k in range(4)]  # fmt: skip
    point = {"setting": "keep 100 %", "accuracy": 0.8, "macs_fraction": 0.5, "speedup": 2.0}
    (run / "summary.json").write_text(json.dumps(
        {"exits": exits, "params_trainable": 44776, "budget": {"points": [point]}}))  # fmt: skip
    rows = script.collect(tmp_path / "out", ["met", "lora"], [0])
    assert [r["method"] for r in rows] == ["met"]
    table = script.render(rows, results, "# title")
    assert "| `met` | 80.00 | 1 | 3: 50.00 / 6: 60.00 / 9: 70.00 / 12: 80.00 | 44.8 k |" in table
    assert "50 % (2.00x; 80.00)" in table and "logreg on pixels (C=" in table
    assert np.isfinite(results[1]["test_accuracy"])
