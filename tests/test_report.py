"""experiments/report.py on fixture run folders: groups, mean ± std, suite means, partial data."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments import report
from experiments.report import build_report, find_runs, load_run, method_label, suite_means

REPO = Path(__file__).resolve().parents[1]
FULL = 16e9  # MACs of the last exit of the fixture runs
EXIT_MACS = [4e9, 8e9, 12e9, 16e9]


def make_run(
    folder: Path,
    *,
    data: str = "vtab1k",
    task: str | None = "cifar",
    split: str = "final",
    seed: int = 0,
    accs: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8),
    graph_weight: float = 0.1,
    exit_specific: bool = True,
    separate_cls: bool = True,
    rank: int = 8,
    keep99_macs: float = 8e9,
    budget_acc: float | None = 0.75,
    params: tuple[int, int] = (600_000, 86_000_000),
    with_budget_json: bool = True,
) -> Path:
    """A run folder as `python -m met_lightning` writes it (the files the report reads)."""
    folder.mkdir(parents=True)
    if data == "vtab1k":
        data_cfg = {"_target_": "met_lightning.data.vtab.Vtab1kDataModule", "root": "/d/vtab-1k",
                    "task": task, "split": split, "num_classes": 100, "seed": seed}  # fmt: skip
        experiment = f"vtab1k/{task}"
    else:
        data_cfg = {"_target_": "met_lightning.data.torchvision_data.TorchvisionDataModule",
                    "name": "CIFAR100", "root": "/d", "num_classes": 100, "val_fraction": 0.1,
                    "seed": seed}  # fmt: skip
        experiment = data
    config = {
        "paths": {"output_dir": str(folder)},
        "data": data_cfg,
        "backbone": {"name": "vit_base_patch16_224.orig_in21k", "weights_file": None},
        "method": {"name": "met", "build": {"_target_": "MultiExitViT.from_config"}},
        "model": {
            "exits": [3, 6, 9, 12],
            "adapter": {
                "rank": rank,
                "exit_specific": exit_specific,
                "separate_cls": separate_cls,
                "sites": ["attn", "mlp"],
            },
            "loss": {"graph": "label", "graph_weight": graph_weight},
        },  # fmt: skip
        "optimizer": {"lr": 0.001},
        "trainer": {"max_epochs": 100, "default_root_dir": str(folder)},
        "seed": seed,
        "tags": ["vtab1k", task],
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra").mkdir()
    choices = {"data": data, "method": "met", "backbone": "vit_base_in21k",
               "experiment": experiment}  # fmt: skip
    (folder / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    exits = [
        {"exit": k + 1, "block": 3 * (k + 1), "accuracy": a, "macs": EXIT_MACS[k],
         "macs_fraction": EXIT_MACS[k] / FULL}
        for k, a in enumerate(accs)
    ]  # fmt: skip

    def point(acc: float, macs: float) -> dict:
        return {"label": "p=1", "thresholds": [0.9, 0.8, 0.7, "-inf"], "shares": [0.25] * 4,
                "mean_macs": macs, "accuracy": acc, "speedup": FULL / macs}  # fmt: skip

    keep = {"1": point(accs[-1], 12e9), "0.99": point(0.99 * accs[-1], keep99_macs)}
    budgets = []
    if budget_acc is not None:
        budgets = [{"budget": 0.5, "budget_macs": FULL / 2, "selected": point(budget_acc, 7e9),
                    "evaluated": point(budget_acc, 7.5e9)}]  # fmt: skip
    summary = {
        "split": "test",
        "exits": exits,
        "backbone_macs": 15.5e9,
        "params_trainable": params[0],
        "storage_kb": params[0] * 4 / 1024,
        "params_total": params[1],
        "budget": {
            "confidence": "max_softmax",
            "points": [
                {
                    "setting": "keep 100 %",
                    "accuracy": accs[-1],
                    "mean_macs": 12e9,
                    "macs_fraction": 0.75,
                    "speedup": FULL / 12e9,
                    "shares": [0.25] * 4,
                },
            ],
        },  # fmt: skip
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    if with_budget_json:
        report_json = {"exits": [3, 6, 9, 12], "exit_macs": EXIT_MACS, "anytime": [], "keep": keep,
                       "budgets": budgets, "skipped_budgets": [], "curve": []}  # fmt: skip
        (folder / "budget.json").write_text(json.dumps(report_json))
    return folder


# last-exit accuracies per (task, method, seed)
LAST = {
    ("cifar", "met"): (0.80, 0.82),
    ("dtd", "met"): (0.60, 0.62),
    ("dmlab", "met"): (0.40, 0.44),
    ("cifar", "nograph"): (0.78, 0.78),
    ("dmlab", "nograph"): (0.30, 0.36),
}


def make_fixture_runs(root: Path) -> None:
    """VTAB-1K cifar + dtd (natural) and dmlab (structured) x {met, met without graph} x seeds
    0, 1 (no-graph lacks dtd), a tune run, a CIFAR-100 run, two CIFAR-100 runs with another rank
    and one broken folder."""
    for (task, method), accs in LAST.items():
        for seed, acc in enumerate(accs):
            make_run(
                root / "vtab" / method / task / "final" / f"seed{seed}",
                task=task,
                seed=seed,
                accs=(acc - 0.3, acc - 0.2, acc - 0.1, acc),
                graph_weight=0.0 if method == "nograph" else 0.1,
                keep99_macs=8e9 if seed == 0 else 10e9,
                budget_acc=None if (task, method, seed) == ("dmlab", "met", 1) else acc - 0.05,
            )
    make_run(root / "vtab" / "met" / "cifar" / "tune" / "seed0", task="cifar", split="tune",
             accs=(0.1, 0.2, 0.3, 0.99))  # fmt: skip
    make_run(root / "c100" / "seed0", data="cifar100", task=None, accs=(0.6, 0.7, 0.8, 0.9))
    for seed in (0, 1):
        make_run(root / "c100_rank4" / f"seed{seed}", data="cifar100", task=None, rank=4,
                 accs=(0.5, 0.6, 0.7, 0.85), with_budget_json=False)  # fmt: skip
    broken = root / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_fixture_runs(root)
    return root


@pytest.fixture(scope="module")
def built(runs_root):
    paths = find_runs([runs_root])
    runs, skipped = [], []
    for path in paths:
        try:
            runs.append(load_run(path))
        except report.ReportError as err:
            skipped.append(str(err))
    text, groups = build_report(runs, [0.5], "python experiments/report.py X", [runs_root], skipped)
    return text, groups, skipped


def _group(groups, dataset, method, split="final", variant=""):
    found = [g for g in groups if (g.dataset, g.method, g.split, g.variant)
             == (dataset, method, split, variant)]  # fmt: skip
    assert len(found) == 1, [(g.dataset, g.method, g.split, g.variant) for g in groups]
    return found[0]


def _row(text: str, startswith: str) -> list[str]:
    """The cells of the first markdown table row that starts with `startswith`."""
    for line in text.splitlines():
        if line.startswith(startswith):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no row {startswith!r} in\n{text}")


def test_method_label_from_config_switches():
    def node(adapter: dict, loss: dict, name: str = "met") -> dict:  # load_run's (today's) shape
        return {"model": {"name": name, "net": {"adapter": adapter}, "loss": loss}}

    base = node({"exit_specific": True, "separate_cls": True},
                {"graph_weight": 0.1, "graph": "label"})  # fmt: skip
    assert method_label(base, {"method": "met"}) == "met"
    no_graph = {"model": {**base["model"], "loss": {"graph_weight": 0.0}}}
    assert method_label(no_graph) == "met (no graph)"
    shared = node({"exit_specific": False, "separate_cls": False}, {"graph_weight": 0})
    assert method_label(shared) == "met (no graph, shared γ, no separate cls)"
    # a method without MET's keys (issue 5's baselines) gets its choice name only
    assert method_label({"method": {"name": "lp"}}, {"method": "linear_probe"}) == "linear_probe"
    # run folders since the `model` node names its targets: the name is model.name
    adapter = {"model": {"name": "adapter", "loss": {"graph_weight": 0.0}}}
    assert method_label(adapter) == "adapter"
    assert method_label({"model": {**base["model"], "name": "met", "loss": {"graph_weight": 0}}}
                        ) == "met (no graph)"  # fmt: skip
    # the rule list is the extension point
    rules = [
        *report.METHOD_RULES,
        ("rank 4", lambda c: report.get(c, "model.net.adapter.rank") == 4),
    ]
    cfg = node({"rank": 4}, base["model"]["loss"])
    assert method_label(cfg, rules=rules) == "met (rank 4)"


def test_runs_are_found_grouped_and_broken_ones_listed(built):
    text, groups, skipped = built
    assert len(skipped) == 1 and "broken" in skipped[0]
    assert "Skipped 1 unreadable run folder(s)" in text
    met_cifar = _group(groups, "cifar", "met")
    assert met_cifar.n == 2 and met_cifar.seeds == [0, 1]
    assert _group(groups, "cifar", "met (no graph)").n == 2
    assert _group(groups, "cifar", "met", split="tune").n == 1
    # CIFAR-100: the data choice names the dataset; another rank is another variant
    assert _group(groups, "cifar100", "met", split="test", variant="rank=8").n == 1
    assert _group(groups, "cifar100", "met", split="test", variant="rank=4").n == 2


def test_mean_and_std_over_seeds(built):
    text, groups, _ = built
    g = _group(groups, "cifar", "met")
    stat = g.stats["acc_last"]
    assert stat.mean == pytest.approx(0.81) and stat.n == 2
    assert stat.std == pytest.approx(statistics.stdev([0.80, 0.82]))
    assert g.stats["acc_exit1"].mean == pytest.approx(0.51)
    assert g.value("keep99_macs") == pytest.approx(9e9)
    assert g.value("keep99_speedup") == pytest.approx((16 / 8 + 16 / 10) / 2)
    assert g.value("budget0.5_acc") == pytest.approx(0.76)
    # the per-dataset row: exits, keep 100 / 99 %, budget 50 %, params
    row = [c.strip("*") for c in _row(text, "| final | met | 2 |")]  # bold: best in column
    assert row[3] == row[7] == "81.00 ± 1.41"  # last exit = the exit after block 12
    assert row[4] == "51.00 ± 1.41"  # exit after block 3
    assert row[8] == "12.00 G (75 %)" and row[9] == "1.33x"  # keep 100 %
    assert row[11] == "9.00 G (56 %)" and row[12] == "1.80x"  # keep 99 %
    assert row[13] == "76.00 ± 1.41" and row[14] == "7.50 G (47 %)"  # budget 50 %
    assert row[15] == "0.600 M (0.70 %)"
    assert row[16] == "2,343.8"  # storage (KB) from summary.json
    # a seed without the budget point: n = 1 for that number, no ±
    dmlab = _group(groups, "dmlab", "met")
    assert dmlab.stats["budget0.5_acc"].n == 1 and dmlab.stats["budget0.5_acc"].std is None
    assert "| final | met | 2 | **42.00 ± 2.83** | **12.00 ± 2.83** |" in text


def test_suite_table_means_group_means_and_missing_tasks(built):
    text, _, _ = built
    suite = text.split("## Per dataset")[0]
    header = _row(suite, "| method | metric |")
    row = _row(suite, "| met | acc (%) |")
    cells = dict(zip(header, row, strict=True))
    assert cells["cifar"] == "81.00" and cells["dtd"] == "61.00" and cells["dmlab"] == "42.00"
    assert cells["caltech101"] == "-" and cells["eurosat"] == "-"
    natural, structured = (81 + 61) / 2, 42.0
    assert cells["natural"] == f"{natural:.2f}*"
    assert cells["specialized"] == "-"
    assert cells["structured"] == f"{structured:.2f}*"
    assert cells["mean"] == f"{(81 + 61 + 42) / 3:.2f}*"  # plain mean over tasks: 61.67
    assert cells["group mean"] == f"{(natural + structured) / 2:.2f}*"  # of group means: 56.50
    params = dict(zip(header, _row(suite, "| met | trainable params (M) |"), strict=True))
    assert params["cifar"] == "0.600"
    # tune runs stay out of the suite (their 99 % would show otherwise)
    assert "99.00" not in _row(suite, "| met | acc (%) |")
    assert "- met: 3 of 19 tasks; missing: caltech101, oxford_flowers102" in suite
    assert "- met (no graph): 2 of 19 tasks; missing: caltech101, dtd," in suite
    # early-exit settings: accuracy and MACs share per task
    keep99 = suite.split("### keep 99 %")[1].split("###")[0]
    macs = dict(zip(header, _row(keep99, "| met | MACs (% of last exit) |"), strict=True))
    assert macs["cifar"] == "56"  # (8 + 10) / 2 of 16 GMACs
    assert "### budget 50 %" in suite
    assert "Made with `python experiments/report.py X` on " in text


def test_suite_means_of_complete_groups():
    per_task = {t: 0.5 for t in report.VTAB_GROUPS}
    per_task.update(cifar=0.9, eurosat=0.7)
    means = suite_means(per_task)
    natural = (0.9 + 6 * 0.5) / 7
    specialized = (0.7 + 3 * 0.5) / 4
    assert means["natural"] == pytest.approx(natural)
    assert means["specialized"] == pytest.approx(specialized)
    assert means["structured"] == pytest.approx(0.5)
    assert means["mean"] == pytest.approx((0.9 + 0.7 + 17 * 0.5) / 19)
    assert means["group mean"] == pytest.approx((natural + specialized + 0.5) / 3)
    assert means["mean"] != pytest.approx(means["group mean"])


def test_suite_row_without_missing_tasks_has_no_star(tmp_path):
    for task in report.VTAB_GROUPS:
        make_run(tmp_path / task, task=task, accs=(0.1, 0.2, 0.3, 0.5))
    runs = [load_run(p) for p in find_runs([tmp_path])]
    text, _ = build_report(runs, [], "cmd", [tmp_path])
    header = _row(text, "| method | metric |")
    cells = dict(zip(header, _row(text, "| met | acc (%) |"), strict=True))
    assert cells["mean"] == "50.00" and cells["group mean"] == "50.00"
    assert "Missing tasks" not in text and "*" not in _row(text, "| met | acc (%) |")[-1]


def test_cli_writes_markdown_and_csv(runs_root, tmp_path, capsys):
    out, long_csv = tmp_path / "r" / "report.md", tmp_path / "long.csv"
    result = subprocess.run(
        [sys.executable, "experiments/report.py", str(runs_root / "vtab"), str(runs_root / "c100"),
         "--out", str(out), "--budgets", "0.5", "0.75", "--csv", str(long_csv)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.startswith("# MET results\n")
    assert f"Made with `python experiments/report.py {runs_root / 'vtab'}" in text
    assert "budget 75 %: acc" in text  # requested, absent from every run: '-'
    with open(long_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if (r["dataset"], r["method"], r["split"]) == ("cifar", "met",
               "final"))  # fmt: skip
    assert float(row["acc_last_mean"]) == pytest.approx(0.81)
    assert float(row["acc_last_std"]) == pytest.approx(statistics.stdev([0.80, 0.82]))
    assert row["n"] == "2" and row["seeds"] == "0 1" and row["vtab_group"] == "natural"
    assert row["budget0.75_acc_mean"] == ""
    # no run folder: a clear error
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 1  # in-process: the subprocess above is the CLI check
    assert "no run folder" in capsys.readouterr().err


def test_report_reads_a_real_run_folder(tiny_run, tmp_path):
    """The files a real (tiny, seconds-long) training run writes, not our fixture copies."""
    run = load_run(tiny_run)
    assert (run.suite, run.dataset, run.split, run.method) == ("digits", "digits", "test", "met")
    budgets = report.budgets_in([run])
    text, groups = build_report([run], budgets, "cmd", [tmp_path])
    (group,) = groups
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert group.stats["acc_last"].mean == pytest.approx(summary["exits"][-1]["accuracy"])
    assert group.value("params_trainable") == summary["params_trainable"]
    assert group.value("keep100_macs") is not None and group.value("keep99_speedup") is not None
    assert "### digits" in text and "## VTAB-1K suite" not in text


def _as_method(folder: Path, method: str, model: dict, exits: list[int], storage_kb: float):
    """Turn a `make_run` folder into a run of another method (its config, choices, exits)."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["method"] = {"name": method}
    config["model"] = model
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
    hydra["hydra"]["runtime"]["choices"]["method"] = method
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    summary = json.loads((folder / "summary.json").read_text())
    summary["exits"] = [e for e in summary["exits"] if e["block"] in exits]
    summary["storage_kb"] = storage_kb
    (folder / "summary.json").write_text(json.dumps(summary))


def make_method_runs(root: Path) -> None:
    """MET, linear probe (one exit) and 1-bit MET on CIFAR-100, seeds 0 and 1."""
    probe = {"exits": [-1], "adapter": {"kind": "none", "exit_specific": False,
             "separate_cls": False, "bits": 32}, "loss": {"graph_weight": 0.0}}  # fmt: skip
    for seed in (0, 1):
        make_run(root / "met" / f"s{seed}", data="cifar100", task=None, seed=seed)
        folder = make_run(root / "lp" / f"s{seed}", data="cifar100", task=None, seed=seed,
                          accs=(0.1, 0.2, 0.3, 0.7 + 0.02 * seed))  # fmt: skip
        _as_method(folder, "linear_probe", probe, [12], 300.0)
        folder = make_run(root / "bin" / f"s{seed}", data="cifar100", task=None, seed=seed,
                          accs=(0.55, 0.6, 0.7, 0.9))  # fmt: skip
        adapter = {"kind": "e_adapter", "bits": 1, "exit_specific": True, "separate_cls": True}
        model = {"exits": [3, 6, 9, 12], "adapter": adapter, "loss": {"graph_weight": 0.1}}
        _as_method(folder, "met", model, [3, 6, 9, 12], 75.0)


def test_methods_compare_in_one_table_by_exit_block(tmp_path):
    """Baselines with one exit sit in the block-12 column; MET switches name MET ablations only;
    1-bit is named for any method; storage comes from summary.json."""
    make_method_runs(tmp_path)
    out = tmp_path / "report.md"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    header = _row(text, "| split | method |")
    assert header[3:8] == ["last exit", "exit @ block 3", "exit @ block 6", "exit @ block 9",
                           "exit @ block 12"]  # fmt: skip
    assert header[-1] == "storage (KB)"
    probe_row = _row(text, "| test | linear_probe | 2 |")  # not "linear_probe (no graph)"
    assert probe_row[3] == "71.00 ± 1.41" and probe_row[4:7] == ["-", "-", "-"]
    assert probe_row[7] == "71.00 ± 1.41" and probe_row[-1] == "300.0"
    one_bit = _row(text, "| test | met (1-bit) | 2 |")
    assert one_bit[3] == "**90.00 ± 0.00**" and one_bit[4] == "**55.00 ± 0.00**"  # the best
    assert one_bit[-1] == "75.0"
    assert _row(text, "| test | met | 2 |")[-1] == "2,343.8"


def test_runs_of_the_model_node_layout_vary_by_their_switches_only(tmp_path):
    """config.yaml since the `model` node names its `_target_`s (here the one that mirrored the
    switches into model.net, read in today's shape): model.name is the method, and the node's
    copies (model.optimizer.*) do not make variants of their own."""
    from experiments.report_load import assign_variants, load_run

    runs = []
    for rank in (4, 8):
        folder = make_run(tmp_path / f"r{rank}", rank=rank)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        del config["method"]
        config["model"] = {
            "_target_": "met_lightning.training.module.MultiExitClassifier", "name": "met",
            **config["model"],
            "net": {"_target_": "met_lightning.models.multi_exit_vit.MultiExitViT",
                    "_partial_": True, "rank": rank},
            "optimizer": config["optimizer"],
        }  # fmt: skip
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        hydra = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
        del hydra["hydra"]["runtime"]["choices"]["method"]  # model.name names it
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
        runs.append(load_run(folder))
    assign_variants(runs)
    assert [(r.method, r.variant) for r in runs] == [("met", "rank=4"), ("met", "rank=8")]
