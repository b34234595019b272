"""Coupon design: a genetic algorithm over offer parameters, scored by a response model.

A catalogue's objective is the expected incremental profit of its best allocation under
a budget, so a search result is directly comparable with the hand-made catalogue.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

from couponflow import lake
from couponflow.allocation import (
    Solution,
    score_users,
    solve_budget,
)
from couponflow.schemas import (
    ALL_CATEGORIES,
    CATEGORIES,
    CHANNELS,
    COUPON_KINDS,
    COUPONS,
    coerce,
)
from couponflow.settings import Settings, get_settings

log = logging.getLogger(__name__)

DESIGN_EXPERIMENT = "couponflow-design"
CATALOGUE_ARTIFACT = "designed_catalogue.csv"
# Genetic algorithm defaults: large enough to recombine several good coupons per
# generation, small enough that one generation costs a few seconds on 3,000 users.
DEFAULT_POPULATION_SIZE = 24
DEFAULT_ELITE = 2
DEFAULT_TOURNAMENT_SIZE = 3
DEFAULT_CROSSOVER_RATE = 0.9
# Chance that each coupon of a child catalogue is mutated.
DEFAULT_MUTATION_RATE = 0.3
# Share of mutations that replace the coupon by a new random one.
FRESH_COUPON_SHARE = 0.15
DEFAULT_CATALOGUE_DAYS = 90
BASIS_POINTS = 10_000
# Attempts at drawing a coupon that the catalogue does not already contain.
_MAX_UNIQUE_DRAWS = 100
_DESIGN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}")
_KIND_LABELS = {"amount_off": "amt", "percent_off": "pct", "free_shipping": "ship"}


class ConversionModel(Protocol):
    """A response model: P(convert) of each user with no offer and with each offer."""

    def predict_conversion(
        self, users: pd.DataFrame, offers: pd.DataFrame
    ) -> npt.NDArray[np.float64]: ...


class Coupon(NamedTuple):
    """The designed parameters of one coupon, in the field order that sorts them."""

    kind: str
    # Cents for amount_off and free_shipping, basis points for percent_off.
    value: int
    min_spend_cents: int
    category: str
    valid_days: int


@dataclass(frozen=True)
class DesignSpace:
    """The grid of offer parameters the search draws from, and its constraints.

    Margin floor: on the smallest basket a coupon accepts, the store keeps at least
    ``margin_floor`` of the basket after the discount. For amount_off and
    free_shipping that is ``value * 10000 <= max_discount_bp * min_spend_cents``, so
    they need a minimum spend. For percent_off it is ``value <= max_discount_bp``
    on every basket. ``max_discount_bp`` is ``round((1 - margin_floor) * 10000)``.
    Maximum face value: amount_off value and the free_shipping fee are at most
    ``max_face_value_cents``, and percent_off value is at most ``max_percent_bp``.
    A free_shipping coupon waives the store's shipping fee, so its value is always
    ``shipping_fee_cents``.
    """

    max_face_value_cents: int = 3_000
    margin_floor: float = 0.5
    max_percent_bp: int = 3_000
    amount_step_cents: int = 100
    percent_step_bp: int = 250
    max_min_spend_cents: int = 20_000
    min_spend_step_cents: int = 500
    shipping_fee_cents: int = 599
    valid_days: tuple[int, ...] = (3, 7, 14, 30)
    kinds: tuple[str, ...] = COUPON_KINDS
    categories: tuple[str, ...] = (ALL_CATEGORIES, *CATEGORIES)

    def __post_init__(self) -> None:
        self._check_limits()
        self._check_choices()

    def _check_limits(self) -> None:
        if not 0.0 <= self.margin_floor < 1.0:
            raise ValueError(
                f"margin_floor must be in [0, 1), got {self.margin_floor}; it is the "
                "share of the basket the store keeps after the discount"
            )
        positive = {
            "max_face_value_cents": self.max_face_value_cents,
            "max_percent_bp": self.max_percent_bp,
            "amount_step_cents": self.amount_step_cents,
            "percent_step_bp": self.percent_step_bp,
            "max_min_spend_cents": self.max_min_spend_cents,
            "min_spend_step_cents": self.min_spend_step_cents,
            "shipping_fee_cents": self.shipping_fee_cents,
        }

        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_percent_bp > BASIS_POINTS:
            raise ValueError(
                f"max_percent_bp must be <= {BASIS_POINTS}, got {self.max_percent_bp}"
            )
        if self.max_discount_bp < 1:
            raise ValueError(
                f"margin_floor={self.margin_floor} leaves no room for a discount of "
                "one basis point; lower it"
            )

    def _check_choices(self) -> None:
        if not self.valid_days or min(self.valid_days) < 1:
            raise ValueError(
                f"valid_days must list whole days >= 1, got {self.valid_days}"
            )
        unknown_kinds = sorted(set(self.kinds) - set(COUPON_KINDS))
        if not self.kinds or unknown_kinds:
            raise ValueError(
                f"kinds must be a non-empty subset of {COUPON_KINDS}, got {self.kinds}"
            )
        known_categories = {ALL_CATEGORIES, *CATEGORIES}
        unknown_categories = sorted(set(self.categories) - known_categories)
        if not self.categories or unknown_categories:
            raise ValueError(
                f"categories must be a non-empty subset of {sorted(known_categories)}"
                f", got {self.categories}"
            )

        empty = [kind for kind in self.kinds if not self.values(kind)]
        if empty:
            raise ValueError(
                f"no value of kind {empty} meets max_face_value_cents="
                f"{self.max_face_value_cents}, max_percent_bp={self.max_percent_bp} "
                f"and margin_floor={self.margin_floor} with a minimum spend of at "
                f"most {self.max_min_spend_cents} cents; raise those limits or "
                "leave the kind out"
            )

    @property
    def max_discount_bp(self) -> int:
        """Largest discount share of the smallest accepted basket, in basis points."""
        return round((1.0 - self.margin_floor) * BASIS_POINTS)

    def values(self, kind: str) -> tuple[int, ...]:
        """Return the feasible values of ``kind``, in ascending order."""
        if kind == "percent_off":
            top = min(self.max_percent_bp, self.max_discount_bp)
            return tuple(range(self.percent_step_bp, top + 1, self.percent_step_bp))
        if kind == "amount_off":
            candidates: Sequence[int] = range(
                self.amount_step_cents,
                self.max_face_value_cents + 1,
                self.amount_step_cents,
            )
        else:
            fee = self.shipping_fee_cents
            candidates = (fee,) if fee <= self.max_face_value_cents else ()
        return tuple(
            v
            for v in candidates
            if self.required_min_spend(kind, v) <= self.max_min_spend_cents
        )

    def min_spends(self) -> tuple[int, ...]:
        return tuple(range(0, self.max_min_spend_cents + 1, self.min_spend_step_cents))

    def required_min_spend(self, kind: str, value: int) -> int:
        """Return the smallest minimum spend on the grid that meets the margin floor."""
        if kind == "percent_off":
            return 0
        cents = -(-value * BASIS_POINTS // self.max_discount_bp)
        step = self.min_spend_step_cents
        return -(-cents // step) * step

    def size(self) -> int:
        """Return the number of distinct feasible coupons."""
        spends = self.min_spends()
        count = 0
        for kind in self.kinds:
            for value in self.values(kind):
                required = self.required_min_spend(kind, value)
                count += sum(1 for s in spends if s >= required)
        return count * len(self.categories) * len(self.valid_days)


@dataclass(frozen=True)
class GenerationStats:
    """Objective of one generation, where generation 0 is the initial population."""

    generation: int
    best_objective_cents: float
    mean_objective_cents: float
    new_coupons_scored: int
    elapsed_seconds: float


@dataclass(frozen=True)
class DesignResult:
    """A designed catalogue (COUPONS contract) and the search that produced it.

    ``objective_cents`` is the expected incremental profit of the catalogue's best
    allocation on the searched users at ``search_budget_cents``, and
    ``initial_objective_cents`` the best of the initial population. ``solution``
    is that allocation, whose offer column ``j`` is row ``j`` of ``catalogue``.
    """

    catalogue: pd.DataFrame
    objective_cents: float
    initial_objective_cents: float
    history: list[GenerationStats]
    solution: Solution
    search_budget_cents: int
    n_users_searched: int
    params: dict[str, Any] = field(default_factory=dict)


def score_catalogue(
    model: ConversionModel,
    users: pd.DataFrame,
    catalogue: pd.DataFrame,
    budget_cents: int,
    margin_rate: float,
) -> float:
    """Return the expected incremental profit, in cents, of the catalogue's best
    allocation to ``users`` under ``budget_cents``."""
    return allocate_catalogue(
        model, users, catalogue, budget_cents, margin_rate
    ).total_profit_cents


def allocate_catalogue(
    model: ConversionModel,
    users: pd.DataFrame,
    catalogue: pd.DataFrame,
    budget_cents: int,
    margin_rate: float,
) -> Solution:
    """Allocate at most one coupon of ``catalogue`` per user, maximizing profit.

    Scores every user x coupon with ``model.predict_conversion`` and
    :func:`couponflow.allocation.score_offers`, on each user's expected basket
    (``aov_cents``, or the median of the buyers for a user with none), then solves
    the budget with :func:`couponflow.allocation.solve_budget`.
    """
    _, scores = score_users(model, users, catalogue, margin_rate)
    return solve_budget(scores.profit_cents, scores.cost_cents, budget_cents)


def design_catalogue(
    model: ConversionModel,
    users: pd.DataFrame,
    budget_cents: int,
    margin_rate: float,
    n_coupons: int,
    seed: int,
    generations: int,
    *,
    space: DesignSpace | None = None,
    population_size: int = DEFAULT_POPULATION_SIZE,
    elite: int = DEFAULT_ELITE,
    tournament_size: int = DEFAULT_TOURNAMENT_SIZE,
    crossover_rate: float = DEFAULT_CROSSOVER_RATE,
    mutation_rate: float = DEFAULT_MUTATION_RATE,
    max_users: int | None = None,
    starts_at: datetime | None = None,
    catalogue_days: int = DEFAULT_CATALOGUE_DAYS,
    id_prefix: str = "designed",
    channels: str = ",".join(CHANNELS),
) -> DesignResult:
    """Search for the ``n_coupons`` catalogue with the highest :func:`score_catalogue`.

    A genetic algorithm: each generation keeps the ``elite`` best catalogues, and
    breeds the rest by tournament selection, crossover (a child draws its coupons
    from the union of two parents) and mutation of single parameters. Every coupon
    comes from ``space``, so each meets its margin floor and maximum face value.
    The same inputs and ``seed`` give the same catalogue and history. The search
    is genetic rather than simulated annealing because crossover recombines good
    coupons found in different catalogues, and because a whole generation shares
    one model call for its new coupons, whose score columns are then cached.

    With ``max_users``, a seeded sample of that many users is searched, and the
    budget is scaled by the sampled share. ``starts_at`` defaults to the latest
    ``event_timestamp`` of ``users``, and the coupons stay valid ``catalogue_days``
    from it. Stock is the number of users, because an allocation gives each user
    one coupon at most.

    NOTE: the model scores coupons unlike its training arms by extrapolation, and
    the search favours exactly the coupons it overrates. Check a design on the
    simulator's truth or in a randomized campaign before relying on its objective.
    """
    space = space or DesignSpace()
    _check_search_arguments(
        n_coupons, generations, population_size, elite, tournament_size, space
    )
    for name, rate in (
        ("crossover_rate", crossover_rate),
        ("mutation_rate", mutation_rate),
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    start = _catalogue_start(users, starts_at)
    sample_rng, search_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)
    )
    searched, search_budget = _sample_users(users, budget_cents, max_users, sample_rng)
    evaluator = _Evaluator(model, searched, search_budget, margin_rate)
    operators = _Operators(space, search_rng)
    started = time.perf_counter()
    log.info(
        "designing %d coupons for %d users (budget %d cents): %d generations of %d "
        "catalogues from %d feasible coupons, seed %d",
        n_coupons,
        len(searched),
        search_budget,
        generations,
        population_size,
        space.size(),
        seed,
    )

    population = [operators.random_catalogue(n_coupons) for _ in range(population_size)]
    ranked, stats = _evaluate_generation(evaluator, population, 0, started)
    history = [stats]
    for generation in range(1, generations + 1):
        children = [catalogue for catalogue, _ in ranked[:elite]]
        while len(children) < population_size:
            first = operators.tournament(ranked, tournament_size)
            second = operators.tournament(ranked, tournament_size)
            child = (
                operators.crossover(first, second, n_coupons)
                if search_rng.random() < crossover_rate
                else first
            )
            children.append(operators.mutate(child, mutation_rate))
        ranked, stats = _evaluate_generation(evaluator, children, generation, started)
        history.append(stats)

    best, best_objective = ranked[0]
    frame = catalogue_frame(
        best,
        start,
        start + timedelta(days=catalogue_days),
        len(users),
        id_prefix,
        channels,
    )
    solution = solve_budget(*evaluator.matrices(best), search_budget)
    params = {
        "budget_cents": budget_cents,
        "search_budget_cents": search_budget,
        "n_users": len(users),
        "n_users_searched": len(searched),
        "margin_rate": margin_rate,
        "n_coupons": n_coupons,
        "seed": seed,
        "generations": generations,
        "population_size": population_size,
        "elite": elite,
        "tournament_size": tournament_size,
        "crossover_rate": crossover_rate,
        "mutation_rate": mutation_rate,
        "model_uri": str(getattr(model, "model_uri", None) or "unregistered"),
        **{f"space_{k}": v for k, v in asdict(space).items()},
    }
    log.info(
        "designed catalogue %s: expected profit %.0f cents (initial best %.0f) after "
        "%d generations in %.1f s",
        frame["coupon_id"].tolist(),
        best_objective,
        history[0].best_objective_cents,
        generations,
        time.perf_counter() - started,
    )
    return DesignResult(
        catalogue=frame,
        objective_cents=best_objective,
        initial_objective_cents=history[0].best_objective_cents,
        history=history,
        solution=solution,
        search_budget_cents=search_budget,
        n_users_searched=len(searched),
        params=params,
    )


def constraint_violations(catalogue: pd.DataFrame, space: DesignSpace) -> list[str]:
    """Return one message per coupon row that breaks a constraint of ``space``.

    Checks the kind, category and validity days against the space, the margin
    floor and the maximum face value as :class:`DesignSpace` defines them, and that
    each coupon id is unique. An empty list means the catalogue is feasible.
    """
    problems: list[str] = []
    duplicated = catalogue["coupon_id"][catalogue["coupon_id"].duplicated()]
    problems.extend(f"coupon_id {c} appears more than once" for c in duplicated)
    for row in catalogue.to_dict("records"):
        coupon = Coupon(
            str(row["kind"]),
            int(row["value"]),
            int(row["min_spend_cents"]),
            str(row["category"]),
            int(row["valid_days"]),
        )
        problems.extend(
            f"{row['coupon_id']}: {p}" for p in _coupon_problems(coupon, space)
        )
    return problems


def catalogue_frame(
    coupons: Sequence[Coupon],
    starts_at: datetime,
    ends_at: datetime,
    stock: int,
    id_prefix: str,
    channels: str = ",".join(CHANNELS),
) -> pd.DataFrame:
    """Return ``coupons`` as a frame of the COUPONS contract, ids numbered in order.

    An id reads ``<id_prefix>-<nn>-<kind><value>-<category>``, for example
    ``designed-01-pct1500-beauty``.
    """
    rows = [
        {
            "coupon_id": (
                f"{id_prefix}-{number:02d}-{_KIND_LABELS[c.kind]}{c.value}-{c.category}"
            ),
            "kind": c.kind,
            "value": c.value,
            "min_spend_cents": c.min_spend_cents,
            "category": c.category,
            "valid_days": c.valid_days,
            "stock": stock,
            "channels": channels,
            "starts_at": pd.Timestamp(starts_at),
            "ends_at": pd.Timestamp(ends_at),
        }
        for number, c in enumerate(coupons, start=1)
    ]
    frame = pd.DataFrame(rows) if rows else COUPONS.empty_frame()
    return coerce(frame, COUPONS)


def log_design(result: DesignResult, settings: Settings) -> str:
    """Log a design run to MLflow experiment "couponflow-design" and return its run id.

    Logs ``result.params``, the best and mean objective of every generation as
    metrics with the generation as step, the final objectives, and the catalogue as
    the CSV artifact ``designed_catalogue.csv``.
    """
    import mlflow

    from training.registry import ensure_experiment, mlflow_tracking

    with mlflow_tracking(settings) as client:
        experiment_id = ensure_experiment(client, DESIGN_EXPERIMENT, settings)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_params(result.params)
            for stats in result.history:
                mlflow.log_metrics(
                    {
                        "best_objective_cents": stats.best_objective_cents,
                        "mean_objective_cents": stats.mean_objective_cents,
                        "new_coupons_scored": float(stats.new_coupons_scored),
                    },
                    step=stats.generation,
                )
            mlflow.log_metrics(
                {
                    "objective_cents": result.objective_cents,
                    "initial_objective_cents": result.initial_objective_cents,
                    "offers_granted": float(result.solution.n_granted),
                    "expected_cost_cents": result.solution.total_cost_cents,
                }
            )
            mlflow.log_text(result.catalogue.to_csv(index=False), CATALOGUE_ARTIFACT)
            run_id = str(run.info.run_id)
    log.info("logged design run %s to %s", run_id, settings.mlflow_tracking_uri)
    return run_id


# --- design_coupons DAG ----------------------------------------------------------


def latest_feature_snapshot(settings: Settings) -> pd.DataFrame:
    """Return the user feature rows of the latest as-of time in the feature folder."""
    assert settings.feature_dir is not None
    path = settings.feature_dir / "user_features.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run the build_features DAG first")
    frame = pd.read_parquet(path)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    latest = frame["event_timestamp"].max()
    return frame[frame["event_timestamp"] == latest].reset_index(drop=True)


def design_id_from_run(run_id: str | None) -> str:
    """Return a design id made of the digits of an Airflow run id, or of the clock."""
    digits = re.sub(r"[^0-9]", "", run_id or "")[:14]
    return digits or pd.Timestamp.now(tz="UTC").strftime("%Y%m%d%H%M%S")


def search_designed_catalogue(
    design_id: str,
    budget_cents: int,
    n_coupons: int,
    generations: int,
    seed: int,
    max_face_value_cents: int,
    margin_floor: float,
    max_users: int | None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Design a catalogue for the champion model and the latest features, and save it.

    Users get the champion's features from Feast as of the latest snapshot, as the
    allocate_campaign DAG scores them. The run is logged to MLflow and the catalogue
    saved under ``<home>/designs/<design_id>/``. Returns a JSON-safe summary.
    """
    from couponflow.feature_store import training_frame
    from training.registry import load_champion

    settings = settings or get_settings()
    folder = _design_dir(settings, design_id)
    model = load_champion(settings)
    latest = latest_feature_snapshot(settings)
    as_of = latest["event_timestamp"].max()
    users = training_frame(settings, latest[["user_id", "event_timestamp"]])
    space = DesignSpace(
        max_face_value_cents=max_face_value_cents, margin_floor=margin_floor
    )
    result = design_catalogue(
        model,
        users,
        budget_cents,
        settings.margin_rate,
        n_coupons,
        seed,
        generations,
        space=space,
        max_users=max_users,
        starts_at=as_of.to_pydatetime(),
        id_prefix=f"dsg-{design_id}",
    )
    run_id = log_design(result, settings)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "catalogue.parquet"
    result.catalogue.to_parquet(path, index=False)
    return {
        "design_id": design_id,
        "catalogue_path": str(path),
        "mlflow_run_id": run_id,
        "coupons": result.catalogue["coupon_id"].tolist(),
        "objective_cents": result.objective_cents,
        "initial_objective_cents": result.initial_objective_cents,
        "users_searched": result.n_users_searched,
        "as_of": as_of.isoformat(),
    }


def write_designed_batch(
    summary: dict[str, Any], settings: Settings | None = None
) -> dict[str, Any]:
    """Write the saved catalogue of ``summary`` as the raw coupons batch
    ``coupons-designed-<design_id>``, which ingest_events then checks."""
    settings = settings or get_settings()
    design_id = str(summary["design_id"])
    _design_dir(settings, design_id)
    frame = coerce(pd.read_parquet(summary["catalogue_path"]), COUPONS)
    batch_id = f"coupons-designed-{design_id}"
    path = lake.write_raw_batch(settings, "coupons", batch_id, frame)
    log.info("wrote %d designed coupons as raw batch %s", len(frame), path)
    return {"batch_id": batch_id, "path": str(path), "rows": len(frame)}


# --- search internals ------------------------------------------------------------

Catalogue = tuple[Coupon, ...]
Ranked = list[tuple[Catalogue, float]]


class _Evaluator:
    """Objective of catalogues, with each coupon's profit and cost column cached.

    score_offers treats each offer column on its own, so a catalogue's matrices are
    the cached columns of its coupons, and only new coupons go to the model.
    """

    def __init__(
        self,
        model: ConversionModel,
        users: pd.DataFrame,
        budget_cents: int,
        margin_rate: float,
    ) -> None:
        self.model = model
        self.users = users
        self.budget_cents = budget_cents
        self.margin_rate = margin_rate
        self.profit: dict[Coupon, npt.NDArray[np.float64]] = {}
        self.cost: dict[Coupon, npt.NDArray[np.float64]] = {}
        self.objectives: dict[Catalogue, float] = {}

    def score_new_coupons(self, catalogues: Sequence[Catalogue]) -> int:
        new = [
            c
            for c in dict.fromkeys(c for catalogue in catalogues for c in catalogue)
            if c not in self.profit
        ]
        if not new:
            return 0
        # The ids only label columns, because the model reads the offer attributes.
        offers = catalogue_frame(
            new, pd.Timestamp(0, tz="UTC"), pd.Timestamp(0, tz="UTC"), 1, "candidate"
        )
        _, scores = score_users(self.model, self.users, offers, self.margin_rate)
        for j, coupon in enumerate(new):
            self.profit[coupon] = scores.profit_cents[:, j]
            self.cost[coupon] = scores.cost_cents[:, j]
        return len(new)

    def matrices(
        self, catalogue: Catalogue
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        profit = np.column_stack([self.profit[c] for c in catalogue])
        cost = np.column_stack([self.cost[c] for c in catalogue])
        return profit, cost

    def objective(self, catalogue: Catalogue) -> float:
        cached = self.objectives.get(catalogue)
        if cached is None:
            solution = solve_budget(*self.matrices(catalogue), self.budget_cents)
            cached = solution.total_profit_cents
            self.objectives[catalogue] = cached
        return cached


class _Operators:
    """Random draws, crossover, mutation and selection over a design space."""

    def __init__(self, space: DesignSpace, rng: np.random.Generator) -> None:
        self.space = space
        self.rng = rng
        self.values = {kind: space.values(kind) for kind in space.kinds}
        self.spends = space.min_spends()

    def random_coupon(self) -> Coupon:
        kind = self._pick(self.space.kinds)
        value = self._pick(self.values[kind])
        required = self.space.required_min_spend(kind, value)
        spend = self._pick(tuple(s for s in self.spends if s >= required))
        return Coupon(
            kind,
            value,
            spend,
            self._pick(self.space.categories),
            self._pick(self.space.valid_days),
        )

    def random_catalogue(self, n_coupons: int) -> Catalogue:
        coupons: list[Coupon] = []
        while len(coupons) < n_coupons:
            coupons.append(self._unique(self.random_coupon, coupons))
        return tuple(sorted(coupons))

    def crossover(
        self, first: Catalogue, second: Catalogue, n_coupons: int
    ) -> Catalogue:
        # Each parent has n_coupons distinct coupons, so the pool contains enough.
        pool = list(dict.fromkeys(first + second))
        picked = self.rng.choice(len(pool), size=n_coupons, replace=False)
        return tuple(sorted(pool[i] for i in sorted(picked)))

    def mutate(self, catalogue: Catalogue, rate: float) -> Catalogue:
        coupons = list(catalogue)
        for position, coupon in enumerate(catalogue):
            if self.rng.random() >= rate:
                continue
            others = coupons[:position] + coupons[position + 1 :]
            coupons[position] = self._unique(
                partial(self.mutate_coupon, coupon), others
            )
        return tuple(sorted(coupons))

    def mutate_coupon(self, coupon: Coupon) -> Coupon:
        """Change one parameter of ``coupon``, then raise its minimum spend if the
        margin floor needs it."""
        if self.rng.random() < FRESH_COUPON_SHARE:
            return self.random_coupon()
        kind, value, spend, category, days = coupon
        choice = self._pick(("kind", "value", "min_spend", "category", "valid_days"))
        if choice == "kind" and len(self.space.kinds) > 1:
            kind = self._pick(tuple(k for k in self.space.kinds if k != kind))
            value = self._pick(self.values[kind])
        elif choice == "value":
            value = self._step(self.values[kind], value, max_steps=2)
        elif choice == "min_spend":
            spend = self._step(self.spends, spend, max_steps=3)
        elif choice == "category" and len(self.space.categories) > 1:
            category = self._pick(
                tuple(c for c in self.space.categories if c != category)
            )
        elif choice == "valid_days" and len(self.space.valid_days) > 1:
            days = self._pick(tuple(d for d in self.space.valid_days if d != days))
        spend = max(spend, self.space.required_min_spend(kind, value))
        return Coupon(kind, value, spend, category, days)

    def tournament(self, ranked: Ranked, size: int) -> Catalogue:
        # ranked is sorted best first, so the lowest drawn position wins.
        drawn = self.rng.integers(0, len(ranked), size=size)
        return ranked[int(drawn.min())][0]

    def _unique(self, draw: Callable[[], Coupon], existing: Sequence[Coupon]) -> Coupon:
        for _ in range(_MAX_UNIQUE_DRAWS):
            coupon = draw()
            if coupon not in existing:
                return coupon
        for _ in range(_MAX_UNIQUE_DRAWS):
            coupon = self.random_coupon()
            if coupon not in existing:
                return coupon
        raise RuntimeError(
            f"drew {2 * _MAX_UNIQUE_DRAWS} coupons that the catalogue already has; "
            "widen the design space or ask for fewer coupons"
        )

    def _pick(self, options: Sequence[Any]) -> Any:
        return options[int(self.rng.integers(0, len(options)))]

    def _step(self, grid: Sequence[int], current: int, max_steps: int) -> int:
        position = int(np.searchsorted(grid, current))
        offset = int(self.rng.integers(1, max_steps + 1)) * (
            1 if self.rng.random() < 0.5 else -1
        )
        return grid[min(max(position + offset, 0), len(grid) - 1)]


def _evaluate_generation(
    evaluator: _Evaluator,
    population: Sequence[Catalogue],
    generation: int,
    started: float,
) -> tuple[Ranked, GenerationStats]:
    new = evaluator.score_new_coupons(population)
    scored = [(catalogue, evaluator.objective(catalogue)) for catalogue in population]
    # Best first, and ties go to the lower catalogue in tuple order, so the ranking
    # does not depend on the order of the population.
    ranked = sorted(scored, key=lambda pair: (-pair[1], pair[0]))
    objectives = [objective for _, objective in scored]
    stats = GenerationStats(
        generation=generation,
        best_objective_cents=ranked[0][1],
        mean_objective_cents=float(np.mean(objectives)),
        new_coupons_scored=new,
        elapsed_seconds=time.perf_counter() - started,
    )
    log.info(
        "generation %d: best %.0f cents, mean %.0f cents, %d new coupons scored, "
        "%.1f s",
        generation,
        stats.best_objective_cents,
        stats.mean_objective_cents,
        new,
        stats.elapsed_seconds,
    )
    return ranked, stats


def _coupon_problems(coupon: Coupon, space: DesignSpace) -> list[str]:
    problems = []
    if coupon.kind not in space.kinds:
        problems.append(f"kind {coupon.kind!r} is not one of {space.kinds}")
        return problems
    if coupon.category not in space.categories:
        problems.append(
            f"category {coupon.category!r} is not one of {space.categories}"
        )
    if coupon.valid_days not in space.valid_days:
        problems.append(
            f"valid_days {coupon.valid_days} is not one of {space.valid_days}"
        )
    if coupon.value <= 0:
        problems.append(f"value must be > 0, got {coupon.value}")
    if coupon.kind == "percent_off":
        if coupon.value > space.max_percent_bp:
            problems.append(
                f"{coupon.value} bp is above max_percent_bp={space.max_percent_bp}"
            )
        if coupon.value > space.max_discount_bp:
            problems.append(
                f"{coupon.value} bp breaks margin_floor={space.margin_floor}"
            )
        return problems
    if coupon.value > space.max_face_value_cents:
        problems.append(
            f"value {coupon.value} cents is above max_face_value_cents="
            f"{space.max_face_value_cents}"
        )
    if coupon.value * BASIS_POINTS > space.max_discount_bp * coupon.min_spend_cents:
        problems.append(
            f"value {coupon.value} cents on min_spend_cents="
            f"{coupon.min_spend_cents} breaks margin_floor={space.margin_floor}"
        )
    return problems


def _check_search_arguments(
    n_coupons: int,
    generations: int,
    population_size: int,
    elite: int,
    tournament_size: int,
    space: DesignSpace,
) -> None:
    if n_coupons < 1:
        raise ValueError(f"n_coupons must be >= 1, got {n_coupons}")
    if n_coupons > space.size():
        raise ValueError(
            f"n_coupons={n_coupons} exceeds the {space.size()} distinct coupons of "
            "the design space; widen the space or ask for fewer coupons"
        )
    if generations < 0:
        raise ValueError(f"generations must be >= 0, got {generations}")
    if population_size < 2:
        raise ValueError(f"population_size must be >= 2, got {population_size}")
    if not 0 <= elite < population_size:
        raise ValueError(
            f"elite must be in [0, population_size), got {elite} for "
            f"population_size={population_size}"
        )
    if tournament_size < 1:
        raise ValueError(f"tournament_size must be >= 1, got {tournament_size}")


def _catalogue_start(users: pd.DataFrame, starts_at: datetime | None) -> pd.Timestamp:
    if starts_at is None:
        if "event_timestamp" not in users.columns or users.empty:
            raise ValueError(
                "starts_at is missing and users has no event_timestamp to take it "
                "from; pass the time the designed coupons become valid"
            )
        return pd.Timestamp(pd.to_datetime(users["event_timestamp"], utc=True).max())
    stamp = pd.Timestamp(starts_at)
    if stamp.tzinfo is None:
        raise ValueError(
            f"starts_at must be timezone-aware (UTC), got naive {starts_at}"
        )
    return stamp.tz_convert("UTC")


def _sample_users(
    users: pd.DataFrame,
    budget_cents: int,
    max_users: int | None,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, int]:
    if users.empty:
        raise ValueError("users is empty; the design needs users to allocate to")
    if max_users is None or len(users) <= max_users:
        return users.reset_index(drop=True), budget_cents
    if max_users < 1:
        raise ValueError(f"max_users must be >= 1 or None, got {max_users}")
    rows = np.sort(rng.choice(len(users), size=max_users, replace=False))
    budget = budget_cents * max_users // len(users)
    log.info(
        "searching on %d of %d users with the budget scaled to %d cents",
        max_users,
        len(users),
        budget,
    )
    return users.iloc[rows].reset_index(drop=True), budget


def _design_dir(settings: Settings, design_id: str) -> Path:
    if not _DESIGN_ID_PATTERN.fullmatch(design_id):
        raise ValueError(
            f"invalid design_id {design_id!r}: use 1-60 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return settings.home / "designs" / design_id
