"""Budgeted batch classification (MSDNet): calibrate exit thresholds, simulate, trace budgets.

Works on stored per-exit logits, never on the model. Exits are 0-based here, 1-based in every
output; an image leaves at the first exit k with `confidence_k >= T_k` (the last T is -inf).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from met_lightning.errors import ConfigError
from met_lightning.inference.confidence import DEFAULT_CONFIDENCE, confidence
from met_lightning.inference.engine import check_thresholds, early_exit
from met_lightning.macs import format_macs

# the spec's sweep: 40 values of p in (0, 2]
DEFAULT_P_VALUES = tuple(float(p) for p in np.linspace(0.05, 2.0, 40))
# a wider, denser sweep for choosing thresholds under a budget (reaches near-all-last-exit too)
SELECTION_P_VALUES = tuple(float(p) for p in np.geomspace(1e-3, 1e3, 241))


@dataclass(frozen=True)
class SplitScores:
    """What the budget analysis needs of one split: per-exit confidence and correctness."""

    confidence: torch.Tensor  # [N, K] float32
    correct: torch.Tensor  # [N, K] bool
    predictions: torch.Tensor  # [N, K] long

    @classmethod
    def from_logits(
        cls, logits: torch.Tensor, labels: torch.Tensor, kind: str = DEFAULT_CONFIDENCE
    ) -> SplitScores:
        predictions = logits.argmax(dim=-1)
        return cls(confidence(logits, kind), predictions == labels[:, None], predictions)

    @property
    def num_exits(self) -> int:
        return self.confidence.shape[1]


@dataclass(frozen=True)
class BudgetPoint:
    """One threshold setting and what it gives: shares leaving at each exit, MACs, accuracy."""

    label: str  # "p=0.45", "exit 2 only", ...
    thresholds: tuple[float, ...]
    shares: tuple[float, ...]
    mean_macs: float
    accuracy: float


def target_shares(p: float, num_exits: int) -> np.ndarray:
    """MSDNet's share of samples to leave at each exit: q_k ∝ p^k (k = 1..K), normalized."""
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    logw = np.arange(1, num_exits + 1) * math.log(p)
    w = np.exp(logw - logw.max())
    return w / w.sum()


def calibrate_thresholds(conf: torch.Tensor, shares: Sequence[float]) -> tuple[float, ...]:
    """Thresholds that let `shares[k]` of all samples leave at exit k (MSDNet's calibration).

    At each exit the `round(cumsum(shares)[k]·N) - left so far` most confident samples still
    present leave. A threshold is the midpoint between the last sample that leaves and the next,
    so a sample recomputed in another batch composition lands on the same side.
    """
    n, k_exits = conf.shape
    if len(shares) != k_exits:
        raise ValueError(f"{len(shares)} shares for {k_exits} exits")
    cumulative = np.rint(np.cumsum(np.asarray(shares, dtype=np.float64)) * n).astype(int)
    conf64 = conf.double()
    present = torch.ones(n, dtype=torch.bool)
    thresholds: list[float] = []
    left = 0
    for k in range(k_exits - 1):
        remaining = int(present.sum())
        count = min(max(int(cumulative[k]) - left, 0), remaining)
        if count == 0:
            threshold = math.inf
        elif count == remaining:
            threshold = -math.inf
        else:
            ranked = conf64[present, k].sort(descending=True).values
            threshold = float((ranked[count - 1] + ranked[count]) / 2)
        thresholds.append(threshold)
        leaving = present & (conf64[:, k] >= threshold)
        left += int(leaving.sum())
        present &= ~leaving
    thresholds.append(-math.inf)
    return tuple(thresholds)


def simulate_exits(conf: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """0-based exit [N] of every sample of `conf` [N, K], by the engine's loop (`early_exit`)
    over the stored confidences. `thresholds`: K values (the last ignored) or K-1."""
    limits = torch.tensor(check_thresholds(thresholds, conf.shape[1]), dtype=torch.float64)
    exit_index, _ = early_exit(lambda k, rows: (rows, rows[:, k], ()), conf, limits)
    return exit_index


def evaluate(
    scores: SplitScores, thresholds: Sequence[float], exit_macs: Sequence[int], label: str = ""
) -> BudgetPoint:
    """Accuracy, exit shares and mean MACs per image of a threshold setting on one split."""
    thresholds = check_thresholds(thresholds, scores.num_exits)
    exit_index = simulate_exits(scores.confidence, thresholds)
    rows = torch.arange(len(exit_index))
    accuracy = scores.correct[rows, exit_index].float().mean().item()
    counts = torch.bincount(exit_index, minlength=scores.num_exits).double()
    shares = (counts / counts.sum()).tolist()
    mean_macs = float(sum(s * m for s, m in zip(shares, exit_macs, strict=True)))
    return BudgetPoint(label, tuple(thresholds), tuple(shares), mean_macs, accuracy)


def forced_thresholds(exit_index: int, num_exits: int) -> tuple[float, ...]:
    """Thresholds that send every sample out at exit `exit_index` (0-based)."""
    return tuple(math.inf if k < exit_index else -math.inf for k in range(num_exits))


def anytime_points(scores: SplitScores, exit_macs: Sequence[int]) -> list[BudgetPoint]:
    """Every image out at exit k, for each k: each exit's own accuracy at its own cost."""
    return [
        evaluate(scores, forced_thresholds(k, scores.num_exits), exit_macs, f"exit {k + 1} only")
        for k in range(scores.num_exits)
    ]


def budget_curve(
    calibration: SplitScores,
    evaluation: SplitScores,
    exit_macs: Sequence[int],
    p_values: Sequence[float] = DEFAULT_P_VALUES,
) -> list[tuple[float, BudgetPoint]]:
    """For each p: thresholds calibrated on `calibration`, evaluated on `evaluation`."""
    curve = []
    for p in p_values:
        shares = target_shares(p, calibration.num_exits)
        thresholds = calibrate_thresholds(calibration.confidence, shares)
        curve.append((float(p), evaluate(evaluation, thresholds, exit_macs, f"p={p:.3g}")))
    return curve


def resolve_budget(budget: float, full_macs: int, key: str = "budget") -> float:
    """A budget in MACs per image: values in (0, 1] are a fraction of the last exit's cost."""
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}={budget!r} must be a number: a fraction of the full cost in (0, 1] or MACs"
        ) from None
    if not budget > 0 or math.isinf(budget):
        raise ConfigError(
            f"{key}={budget} must be > 0: a fraction of the full cost in (0, 1] or MACs per image"
        )
    return budget * full_macs if budget <= 1 else budget


def budget_candidates(
    calibration: SplitScores,
    exit_macs: Sequence[int],
    p_values: Sequence[float] = SELECTION_P_VALUES,
) -> list[BudgetPoint]:
    """Settings to choose from under a budget: the calibrated p sweep and each single exit."""
    curve = budget_curve(calibration, calibration, exit_macs, p_values)
    return [point for _, point in curve] + anytime_points(calibration, exit_macs)


def smallest_fraction(macs: float, full_macs: int, decimals: int = 3) -> float:
    """The smallest fraction of `full_macs` with `decimals` decimals that covers `macs`."""
    step = 10**decimals
    units = math.ceil(macs / full_macs * step)
    while units / step * full_macs < macs:  # the float product must fit too
        units += 1
    return units / step


def select_for_budget(
    calibration: SplitScores,
    exit_macs: Sequence[int],
    budget_macs: float,
    key: str = "budget",
    candidates: Sequence[BudgetPoint] | None = None,
) -> BudgetPoint:
    """The thresholds with the best accuracy on `calibration` whose mean MACs fit the budget
    (among `candidates`, default `budget_candidates`); ConfigError if below exit 1's cost."""
    if budget_macs < exit_macs[0]:
        raise ConfigError(
            f"{key}: {format_macs(budget_macs)} per image is below the cost of exit 1 "
            f"({format_macs(exit_macs[0])}, {100 * exit_macs[0] / exit_macs[-1]:.1f} % of the "
            "full model), so no image can be classified within it; raise the budget to at least "
            f"{exit_macs[0]} MACs or {smallest_fraction(exit_macs[0], exit_macs[-1]):.3f} of the "
            "full cost"
        )
    if candidates is None:
        candidates = budget_candidates(calibration, exit_macs)
    feasible = [c for c in candidates if c.mean_macs <= budget_macs * (1 + 1e-9)]
    return max(feasible, key=lambda c: (c.accuracy, -c.mean_macs))


def keeping(
    points: Sequence[BudgetPoint], reference_accuracy: float, fraction: float
) -> list[BudgetPoint]:
    """The Pareto points (cheapest first, each more accurate than the one before) whose accuracy
    is at least `fraction` of `reference_accuracy`."""
    kept = [p for p in points if p.accuracy >= fraction * reference_accuracy - 1e-12]
    frontier: list[BudgetPoint] = []
    for p in sorted(kept, key=lambda p: (p.mean_macs, -p.accuracy)):
        if not frontier or p.accuracy > frontier[-1].accuracy:
            frontier.append(p)
    return frontier
