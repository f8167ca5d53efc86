"""A latency SLO controller: which calibrated budget point a server runs at, given its load.

The actions are points of the run's calibrated budget curve (`budget.budget_candidates` on the
logit store's val split): thresholds, val accuracy, mean MACs per image, and the share of val
images whose answer equals the last exit's (what the accuracy guard checks). Only the Pareto
points whose val accuracy is at least `accuracy_floor` x the last exit's are kept, so the floor
is never crossed.

`decide(points, config, state, signals, cost)` is pure: the signals a server knows (arrival rate,
waiting requests, recent p95, the guard's agreement), a cost model fitted from measured batch
times, and the previous state in; a `Decision` (point, reason) and the next state out.
`Controller` keeps that state and the cost model for one worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from met_lightning.inference.budget import SplitScores, budget_candidates, keeping, simulate_exits


@dataclass(frozen=True)
class OperatingPoint:
    """A calibrated threshold setting the controller may serve at."""

    label: str
    thresholds: tuple[float, ...]
    accuracy: float  # val accuracy
    mean_macs: float  # mean MACs per image on val
    agreement: float  # val share answered as the last exit answers


def agreement_with_last(scores: SplitScores, thresholds: Sequence[float]) -> float:
    """The share of `scores`' images whose answer at their exit equals the last exit's."""
    exit_index = simulate_exits(scores.confidence, thresholds)
    served = scores.predictions[torch.arange(len(exit_index)), exit_index]
    return (served == scores.predictions[:, -1]).float().mean().item()


def operating_points(
    scores: SplitScores, exit_macs: Sequence[int], accuracy_floor: float
) -> list[OperatingPoint]:
    """The Pareto points (cheapest first, each more accurate than the one before) of the budget
    candidates whose val accuracy is >= `accuracy_floor` x the last exit's."""
    candidates = budget_candidates(scores, exit_macs)  # the p sweep, then each exit alone
    frontier = keeping(candidates, candidates[-1].accuracy, accuracy_floor)  # of "exit K only"
    return [
        OperatingPoint(c.label, c.thresholds, c.accuracy, c.mean_macs,
                       agreement_with_last(scores, c.thresholds))
        for c in frontier
    ]  # fmt: skip


# ---------------------------------------------------------------------- the cost model
@dataclass(frozen=True)
class CostModel:
    """Batch time = overhead_s + s_per_mac x the batch's MACs, fitted by exponentially weighted
    least squares over measured batches (MACs predict the ratio between points; the
    measurements set the scale and the per-batch overhead)."""

    overhead_s: float = 0.002
    s_per_mac: float = 1e-10
    decay: float = 0.9
    # weighted sums: w, x, y, xx, xy (x: MACs of a batch, y: its seconds)
    sums: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def measured(self, macs: float, seconds: float) -> CostModel:
        w, x, y, xx, xy = (self.decay * s for s in self.sums)
        w, x, y, xx, xy = w + 1, x + macs, y + seconds, xx + macs * macs, xy + macs * seconds
        overhead, slope = self.overhead_s, self.s_per_mac
        spread = w * xx - x * x
        if spread > 1e-6 * max(xx * w, 1e-30):  # batches of several sizes: fit both
            slope = (w * xy - x * y) / spread
            overhead = (y - slope * x) / w
        if slope <= 0 or overhead < 0:  # too few or noisy points: keep the overhead
            overhead = max(0.0, min(overhead, y / w))
            slope = max((y - overhead * w) / max(x, 1.0), 1e-15)
        return replace(self, overhead_s=overhead, s_per_mac=slope, sums=(w, x, y, xx, xy))

    def batch_seconds(self, batch: float, mean_macs: float) -> float:
        return self.overhead_s + self.s_per_mac * batch * mean_macs


def predicted_ms(
    cost: CostModel, mean_macs: float, rate: float, waiting: float, max_batch: int,
    extra_s: float = 0.0,
) -> float:  # fmt: skip
    """Predicted p95-ish latency (ms) of one worker at `rate` requests/s with `waiting` requests
    queued: the batch that forms, the batches ahead, M/D/1 queueing; inf at or over capacity."""
    full = cost.batch_seconds(max_batch, mean_macs)
    rho = rate * full / max_batch
    if rho >= 1:
        return math.inf
    tau = cost.s_per_mac * mean_macs
    batch = min(max_batch, max(1.0, waiting + rate * cost.overhead_s / max(1 - rate * tau, 1e-9)))
    seconds = cost.batch_seconds(batch, mean_macs)
    ahead = seconds * waiting / batch
    queueing = seconds * rho / (2 * (1 - rho))
    return 1000 * (extra_s + seconds + ahead + 2 * queueing)


# ---------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class ControlConfig:
    slo_ms: float
    max_batch_size: int
    workers: int = 1  # the arrival rate and waiting requests are shared among them
    up_margin: float = 0.7  # move to a more accurate point only if predicted <= this x SLO
    hold: int = 3  # control intervals after a change before moving up again
    guard_min_samples: int = 30  # guard samples at a point before judging its agreement
    guard_z: float = 2.0  # agreement below promise - z x its standard error: a shift


@dataclass(frozen=True)
class Signals:
    """What the server knows at a control step (the whole server's, not one worker's)."""

    arrival_rate: float = 0.0  # requests per second, recent
    waiting: float = 0.0  # requests accepted and not answered yet
    p95_ms: float | None = None  # recent end-to-end latency (None: no recent request)
    guard_agreement: float | None = None  # sampled agreement with the last exit at this point
    guard_samples: int = 0


@dataclass(frozen=True)
class ControlState:
    index: int  # the current point
    since_change: int = 0  # control steps since the last change
    guard_floor: int = 0  # the guard's lowest allowed point (0: none)
    extra_s: float = 0.0  # latency the cost model does not explain (HTTP, queues), fitted


@dataclass(frozen=True)
class Decision:
    index: int
    changed: bool
    reason: str
    predicted_ms: tuple[float, ...] = field(default=(), repr=False)


def guard_failing(point: OperatingPoint, config: ControlConfig, signals: Signals) -> bool | None:
    """True: agreement below the promise (a shift); False: within it; None: too few samples."""
    if signals.guard_agreement is None or signals.guard_samples < config.guard_min_samples:
        return None
    p = min(max(point.agreement, 1e-3), 1 - 1e-3)
    error = config.guard_z * math.sqrt(p * (1 - p) / signals.guard_samples)
    return signals.guard_agreement < point.agreement - error


def decide(
    points: Sequence[OperatingPoint], config: ControlConfig, state: ControlState,
    signals: Signals, cost: CostModel,
) -> tuple[Decision, ControlState]:  # fmt: skip
    """The point to serve next and why (pure). Points: cheapest first, most accurate last."""
    top, current = len(points) - 1, state.index
    rate = signals.arrival_rate / config.workers
    waiting = signals.waiting / config.workers
    extra = state.extra_s
    if signals.p95_ms is not None:  # correct the model with what was measured at this point
        model = predicted_ms(cost, points[current].mean_macs, rate, waiting, config.max_batch_size)
        if math.isfinite(model):
            miss = min(max(signals.p95_ms / 1000 - model / 1000, 0.0), config.slo_ms / 1000)
            extra = 0.7 * extra + 0.3 * miss
    predicted = tuple(
        predicted_ms(cost, p.mean_macs, rate, waiting, config.max_batch_size, extra) for p in points
    )
    state = replace(state, extra_s=extra, since_change=state.since_change + 1)

    def move(index: int, reason: str, **changes) -> tuple[Decision, ControlState]:
        index = min(max(index, 0), top)
        changed = index != current
        since = 0 if changed else state.since_change
        new = replace(state, index=index, since_change=since, **changes)
        return Decision(index, changed, reason, predicted), new

    failing = guard_failing(points[current], config, signals)
    agreement = f"agreement {signals.guard_agreement or 0:.3f} over {signals.guard_samples}"
    promise = f"promised {points[current].agreement:.3f}"
    if failing:
        if current == top:
            return move(current, f"guard: {agreement} < {promise}; at the most accurate point")
        return move(current + 1, f"guard: {agreement} < {promise}", guard_floor=current + 1)
    # recovered: the promise met, not merely "not yet shown to fail" (few samples at a new point)
    recovered = failing is False and signals.guard_agreement >= points[current].agreement
    if recovered and state.guard_floor > 0:
        decision, new = decide(points, config, replace(state, guard_floor=0), signals, cost)
        return replace(decision, reason=f"guard: recovered ({agreement}); {decision.reason}"), new
    floor, slo = state.guard_floor, config.slo_ms
    meeting = [i for i in range(floor, top + 1) if predicted[i] <= slo]
    best = max(meeting) if meeting else floor
    load = f"rate {signals.arrival_rate:.1f}/s, waiting {signals.waiting:.0f}"
    if best < current:
        return move(best, f"load: {load}, predicted {predicted[current]:.1f} ms > SLO {slo:g}")
    observed = signals.p95_ms
    if observed is not None and observed > slo and current > floor:
        return move(current - 1, f"latency: p95 {observed:.1f} ms > SLO {slo:g} ms")
    roomy = [i for i in range(current + 1, top + 1) if predicted[i] <= config.up_margin * slo]
    calm = observed is None or observed <= config.up_margin * slo
    if roomy and calm and state.since_change >= config.hold:
        up = max(roomy)
        return move(up, f"load: {load}, predicted {predicted[up]:.1f} ms <= "
                        f"{config.up_margin:g} x SLO")  # fmt: skip
    return move(current, "hold")


@dataclass
class Controller:
    """One worker's controller: the state, cost model and guard counts between decisions."""

    points: list[OperatingPoint]
    config: ControlConfig
    state: ControlState = None  # type: ignore[assignment]
    cost: CostModel = field(default_factory=CostModel)
    agree: int = 0  # guard samples at the current point that agreed
    sampled: int = 0

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = ControlState(index=len(self.points) - 1)  # start at the most accurate

    @property
    def point(self) -> OperatingPoint:
        return self.points[self.state.index]

    @property
    def agreement(self) -> float | None:
        """The guard's sampled agreement at the current point (None: no sample yet)."""
        return self.agree / self.sampled if self.sampled else None

    def measured(self, macs: float, seconds: float) -> None:
        self.cost = self.cost.measured(macs, seconds)

    def guarded(self, agreed: int, samples: int) -> None:
        self.agree += agreed
        self.sampled += samples

    def step(self, signals: Signals) -> Decision:
        signals = replace(signals, guard_agreement=self.agreement, guard_samples=self.sampled)
        decision, self.state = decide(self.points, self.config, self.state, signals, self.cost)
        if decision.changed:  # agreement is measured per point
            self.agree = self.sampled = 0
        return decision
