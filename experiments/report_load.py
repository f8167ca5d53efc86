"""Reading finished run folders for the report: discovery, run records, method labels and the
config values that tell settings apart (`variant`). Reads only JSON / YAML (no torch)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from experiments.run_vtab1k import VTAB_GROUPS
from met_lightning.checkpoint.migrate import migrate
from met_lightning.errors import CheckpointError

SUMMARY_FILE = "summary.json"
# Config values that never make two runs different settings (seeds, places, logging, workers).
IGNORED_KEYS = (
    "seed", "data.seed", "paths", "task_name", "tags", "logger", "ckpt_path", "optimized_metric",
    "trainer.default_root_dir", "callbacks.model_checkpoint.dirpath", "callbacks.last_checkpoint",
    "resume",
    "callbacks.budget_analysis.output_dir", "callbacks.progress_bar", "data.root",
    "data.num_workers", "data.eval_batch_size", "data.download", "backbone.weights_file",
    # the `model` node's targets and copies: optimizer and scheduler are the top-level groups,
    # name is the method
    "model._target_", "model.name", "model.net._target_", "model.net._partial_",
    "model.loss._target_", "model.loss._partial_", "model.optimizer", "model.scheduler",
)  # fmt: skip


class ReportError(Exception):
    pass


# ---------------------------------------------------------------------- method labels
def get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """`config["a"]["b"]` for "a.b"; `default` when a key is missing."""
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


# (suffix, rule): the suffix joins the label when the rule holds for the run's resolved config.
# A rule must return False for configs without its keys (`get` returns None for them). MET's
# ablation switches only name an ablation of MET: a linear probe has no graph term to remove.
MethodRule = tuple[str, Callable[[Mapping[str, Any]], bool]]


def method_name(config: Mapping[str, Any]) -> str | None:
    """`model.name` (older run folders: `method.name`)."""
    return get(config, "model.name") or get(config, "method.name")


def _is_met(c: Mapping[str, Any]) -> bool:
    return (method_name(c) or "met") == "met"


METHOD_RULES: list[MethodRule] = [
    ("no graph", lambda c: _is_met(c) and get(c, "model.loss.graph_weight") == 0),
    (
        "teacher graph",
        lambda c: (
            _is_met(c)
            and get(c, "model.loss.graph") == "teacher"
            and get(c, "model.loss.graph_weight") != 0
        ),
    ),
    ("shared γ", lambda c: _is_met(c) and get(c, "model.net.adapter.exit_specific") is False),
    ("no separate cls", lambda c: _is_met(c) and get(c, "model.net.adapter.separate_cls") is False),
    ("1-bit", lambda c: get(c, "model.net.adapter.bits") == 1),
]


def method_label(
    config: Mapping[str, Any],
    choices: Mapping[str, Any] | None = None,
    rules: Sequence[MethodRule] = METHOD_RULES,
) -> str:
    """`met`, `met (no graph)`, `met (shared γ, no separate cls)`, `linear_probe`, ...

    The base is the `method` config choice (else `model.name`, or `method.name` in older run
    folders); each rule that holds adds its suffix.
    """
    base = (choices or {}).get("method") or method_name(config) or "?"
    suffixes = [name for name, rule in rules if rule(config)]
    return f"{base} ({', '.join(suffixes)})" if suffixes else str(base)


# ---------------------------------------------------------------------- runs
@dataclass
class RunRecord:
    path: Path
    config: dict[str, Any]
    choices: dict[str, Any]
    summary: dict[str, Any]
    budget: dict[str, Any] | None
    suite: str  # "vtab1k" or the dataset itself
    dataset: str  # VTAB-1K task or data config name
    split: str  # VTAB-1K: tune | final; else the split summary.json reports on (test | val)
    method: str
    seed: Any
    variant: str = ""  # filled in by `assign_variants`

    @property
    def vtab_group(self) -> str | None:
        return VTAB_GROUPS.get(self.dataset) if self.suite == "vtab1k" else None


def _load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def dataset_of(config: Mapping[str, Any], choices: Mapping[str, Any]) -> tuple[str, str]:
    """(suite, dataset): ("vtab1k", task) or (data choice, data choice)."""
    data = config.get("data") or {}
    choice = choices.get("data")
    target = str(data.get("_target_", ""))
    if choice == "vtab1k" or "vtab" in target.lower():
        return "vtab1k", str(data.get("task", "?"))
    if not choice:  # no .hydra/hydra.yaml: the DataModule's class name
        name = target.rsplit(".", 1)[-1].removesuffix("DataModule").lower()
        choice = name or "?"
    if choice == "image_folder" and data.get("root"):
        choice = f"image_folder:{Path(str(data['root'])).name}"
    return str(choice), str(choice)


def load_run(path: Path) -> RunRecord:
    """Read one run folder; ReportError if its summary.json or config.yaml is unreadable."""
    path = Path(path)
    try:
        summary = _load_json(path / SUMMARY_FILE)
        # an earlier version's run folder: its config in today's keys
        config = migrate(_load_yaml(path / "config.yaml"), str(path))
    except (OSError, ValueError, yaml.YAMLError, CheckpointError) as err:
        raise ReportError(f"{path}: {err}") from err
    if not isinstance(config, dict) or not isinstance(summary, dict) or not summary.get("exits"):
        raise ReportError(f"{path}: config.yaml or summary.json is not a run's")
    choices: dict[str, Any] = {}
    try:
        hydra_cfg = _load_yaml(path / ".hydra" / "hydra.yaml")
        choices = dict(get(hydra_cfg, "hydra.runtime.choices") or {})
    except (OSError, ValueError, yaml.YAMLError):
        pass  # only the method and data names come from there; config.yaml has fallbacks
    try:
        budget = _load_json(path / "budget.json")
    except (OSError, ValueError):
        budget = None
    suite, dataset = dataset_of(config, choices)
    split = get(config, "data.split") if suite == "vtab1k" else None
    return RunRecord(
        path=path,
        config=config,
        choices=choices,
        summary=summary,
        budget=budget,
        suite=suite,
        dataset=dataset,
        split=str(split or summary.get("split", "?")),
        method=method_label(config, choices),
        seed=config.get("seed"),
    )


def find_runs(roots: Iterable[Path]) -> list[Path]:
    """Every folder under `roots` (or a root itself) holding summary.json, sorted, once each."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise ReportError(f"{root} does not exist")
        found.update(p.parent.resolve() for p in root.rglob(SUMMARY_FILE))
    return sorted(found)


def flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": value} for every leaf of the nested config (lists are leaves)."""
    return pd.json_normalize(config, sep=".").iloc[0].to_dict() if config else {}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def assign_variants(runs: Sequence[RunRecord]) -> None:
    """Within each (dataset, split, method), name the config values that differ between runs.

    Runs identical up to IGNORED_KEYS (seeds, paths, logging) share the variant "" and are
    aggregated; otherwise the variant is e.g. "rank=4, lr=0.001".
    """
    family = ["suite", "dataset", "split", "method"]
    index = pd.DataFrame([[getattr(r, k) for k in family] for r in runs], columns=family)
    for _, members in index.groupby(family, sort=False).groups.items():
        flats = [flatten(runs[i].config) for i in members]
        table = pd.DataFrame(flats, dtype=object)
        table = table[sorted(k for k in table.columns if not _ignored(k))]
        # a key a run lacks reads as null, as a null value does
        encoded = table.map(lambda v: json.dumps(None if _missing(v) else v, sort_keys=True,
                                                 default=str))  # fmt: skip
        differing = [k for k in table.columns if encoded[k].nunique() > 1]
        short = _short_names(differing)
        for i, flat in zip(members, flats, strict=True):
            runs[i].variant = ", ".join(f"{short[k]}={_show(flat.get(k))}" for k in differing)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last part of each dotted key, or the whole key where the last parts collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )
