"""Task bodies of the DAGs: each reads its inputs from the stores, writes its outputs
back, and returns a small JSON-safe summary (the XCom).

Every function reads the settings from the environment, so that an Airflow worker
configured with ``COUPONFLOW_*`` variables finds the same stores as the command line.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from couponflow import lake
from couponflow.schemas import CHANNELS, CONTROL_ARM
from couponflow.settings import Settings, get_settings
from couponflow.store import get_engine

log = logging.getLogger(__name__)

INGEST_ORDER = ("users", "coupons", "events", "exposures", "outcomes")
# Campaigns whose exposures were assigned uniformly at random; the response model
# trains on these only, because their arms are independent of the user.
RANDOMIZED_POLICY = "uniform"


def campaign_dir(settings: Settings, campaign_id: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", campaign_id):
        raise ValueError(
            f"invalid campaign_id {campaign_id!r}: use 1-100 letters, digits, '.', '_'"
            " or '-', starting with a letter or digit"
        )
    return settings.home / "campaigns" / campaign_id


def campaign_id_or_default(campaign_id: str, run_id: str | None) -> str:
    """Return ``campaign_id``, or one derived from the Airflow run id if empty."""
    if campaign_id:
        return campaign_id
    # Down to the second, so that two runs in one minute get two campaigns.
    stamp = re.sub(r"[^0-9]", "", run_id or "")[:14] or datetime.now(UTC).strftime(
        "%Y%m%d%H%M%S"
    )
    return f"cmp-{stamp}"


# --- ingest_events --------------------------------------------------------------


def ingest_table(table: str) -> dict[str, Any]:
    """Check and ingest every pending raw batch of ``table``; return the counts."""
    from couponflow.ingest import ingest_pending

    settings = get_settings()
    reports = ingest_pending(settings, tables=[table])
    fresh = [r for r in reports if not r.skipped]
    summary = {
        "table": table,
        "batches": len(reports),
        "batches_skipped": len(reports) - len(fresh),
        "rows_in": sum(r.rows_in for r in fresh),
        "rows_accepted": sum(r.rows_accepted for r in fresh),
        "rows_quarantined": sum(r.rows_quarantined for r in fresh),
    }
    log.info(
        "ingested %s: %d batches (%d already done), rows in %d, accepted %d, "
        "quarantined %d",
        table,
        summary["batches"],
        summary["batches_skipped"],
        summary["rows_in"],
        summary["rows_accepted"],
        summary["rows_quarantined"],
    )
    return summary


# --- build_features -------------------------------------------------------------


def snapshot_times(last_event: pd.Timestamp, snapshot_days: int) -> list[datetime]:
    """Return daily as-of times (UTC midnights), the last one after ``last_event``."""
    if snapshot_days < 1:
        raise ValueError(f"snapshot_days must be >= 1, got {snapshot_days}")
    latest = last_event.tz_convert("UTC").floor("D") + pd.Timedelta(days=1)
    return [
        (latest - pd.Timedelta(days=k)).to_pydatetime()
        for k in reversed(range(snapshot_days))
    ]


def compute_features(snapshot_days: int) -> dict[str, Any]:
    """Compute daily feature and interest snapshots into the Feast offline sources.

    The behaviour features run on Dask; the interest scores fit one matrix
    factorization per snapshot on the events before it.
    """
    from couponflow.features import (
        compute_user_features,
        compute_user_interest,
        write_user_features,
        write_user_interest,
    )

    settings = get_settings()
    events = lake.lake_files(settings, "events")
    if not events:
        raise FileNotFoundError(
            f"no accepted events under {lake.lake_table_dir(settings, 'events')}; "
            "run the ingest_events DAG first"
        )
    last_event = _last_event_time(settings)
    as_of = snapshot_times(last_event, snapshot_days)
    frame = compute_user_features(settings, as_of)
    path = write_user_features(settings, frame)
    interest = compute_user_interest(settings, as_of)
    interest_path = write_user_interest(settings, interest)
    return {
        "rows": len(frame),
        "users": int(frame["user_id"].nunique()),
        "snapshots": len(as_of),
        "first_as_of": as_of[0].isoformat(),
        "latest_as_of": as_of[-1].isoformat(),
        "path": str(path),
        "interest_rows": len(interest),
        "interest_path": str(interest_path),
    }


def _last_event_time(settings: Settings) -> pd.Timestamp:
    files = lake.lake_files(settings, "events")
    # Partitions are named by UTC date, so the newest partition contains the last event.
    newest_day = max(f.parent.name for f in files)
    newest = [f for f in files if f.parent.name == newest_day]
    times = pd.concat(pd.read_parquet(f, columns=["event_ts"]) for f in newest)
    return pd.Timestamp(pd.to_datetime(times["event_ts"], utc=True).max())


def apply_feature_repo() -> dict[str, Any]:
    """Register the Feast definitions (``feast apply``)."""
    from couponflow.feature_store import apply_definitions

    settings = get_settings()
    apply_definitions(settings)
    return {"registry": settings.feast_registry}


def materialize_online(latest_as_of: str) -> dict[str, Any]:
    """Materialize every feature view into the online store up to ``latest_as_of``."""
    from couponflow.feature_store import materialize

    settings = get_settings()
    end = datetime.fromisoformat(latest_as_of) + timedelta(seconds=1)
    materialize(settings, end)
    return {"materialized_until": end.isoformat()}


# --- train_models ---------------------------------------------------------------


def _latest_features(settings: Settings) -> pd.DataFrame:
    assert settings.feature_dir is not None
    path = settings.feature_dir / "user_features.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run the build_features DAG first")
    frame = pd.read_parquet(path)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    latest = frame["event_timestamp"].max()
    return frame[frame["event_timestamp"] == latest].reset_index(drop=True)


def train_profiles(epochs: int) -> dict[str, Any]:
    """Train the TensorFlow profile model on recent events and log it to MLflow."""
    from training.profile import log_profile_model, train_profile_model

    settings = get_settings()
    as_of = _latest_features(settings)["event_timestamp"].max().to_pydatetime()
    events = lake.read_lake_table(settings, "events")
    users = lake.read_lake_table(settings, "users")
    result = train_profile_model(
        events, users, as_of=as_of, settings=settings, epochs=epochs, seed=7
    )
    registration = log_profile_model(result, settings)
    from couponflow.feature_store import materialize

    materialize(settings, as_of + timedelta(seconds=1))
    return {
        **asdict(registration),
        "users": len(result.profiles),
        "device": result.device,
        **_floats(result.metrics),
    }


def randomized_training_rows(settings: Settings) -> pd.DataFrame:
    """Return exposures of randomized campaigns joined with their outcomes.

    One row per exposure, ``event_timestamp`` = send time, so that Feast joins the
    features as they were when the coupon was sent.
    """
    exposures = lake.read_lake_table(settings, "exposures")
    exposures = exposures[exposures["policy"] == RANDOMIZED_POLICY]
    if exposures.empty:
        raise ValueError(
            f"no exposures with policy {RANDOMIZED_POLICY!r} in the offline store; "
            "the response model trains on randomized campaigns only"
        )
    outcomes = lake.read_lake_table(settings, "outcomes")
    rows = exposures.merge(
        outcomes[
            ["campaign_id", "user_id", "converted", "revenue_cents", "discount_cents"]
        ],
        on=["campaign_id", "user_id"],
        how="left",
        validate="one_to_one",
    )
    # An exposure with no outcome row is a user who did nothing in the window.
    rows["converted"] = rows["converted"].fillna(False).astype(bool)
    rows["revenue_cents"] = rows["revenue_cents"].fillna(0).astype("int64")
    rows["discount_cents"] = rows["discount_cents"].fillna(0).astype("int64")
    rows = rows.rename(columns={"send_at": "event_timestamp"})
    return rows.reset_index(drop=True)


def train_response(seed: int) -> dict[str, Any]:
    """Train the uplift model on randomized campaigns and register it in MLflow."""
    from couponflow.feature_store import training_frame
    from training.registry import log_and_register
    from training.response import evaluate, split_holdout, train_response_model

    settings = get_settings()
    rows = randomized_training_rows(settings)
    frame = training_frame(settings, rows)
    coupons = lake.read_lake_table(settings, "coupons")
    holdout = split_holdout(frame["user_id"])
    train, test = frame[~holdout], frame[holdout]
    log.info("response model: %d training rows, %d holdout rows", len(train), len(test))
    model = train_response_model(train, coupons, seed=seed, params=None)
    metrics = evaluate(model, test, coupons)
    registration = log_and_register(model, metrics, settings, test, coupons)
    return {
        "train_rows": len(train),
        "holdout_rows": len(test),
        **_jsonable(
            asdict(registration)
            if hasattr(registration, "__dataclass_fields__")
            else registration
        ),
    }


# --- allocate_campaign ----------------------------------------------------------


# Largest budget the campaign store keeps exactly (ten trillion currency units).
MAX_BUDGET_CENTS = 10**15
# Scored files wait here until their allocation is stored, so that a failed run
# leaves the current version's files in the campaign folder untouched.
PENDING = "pending"
SCORE_FILES = ("scores.npz", "users.parquet", "offers.parquet")


def check_request(params: dict[str, Any], run_id: str | None) -> dict[str, Any]:
    """Validate allocate_campaign's Params before any work; return them normalized.

    Raises ``ValueError`` naming the bad value: fractions whose sum is not below 1,
    an unknown channel, a negative or too large amount, a send time without a time
    zone, or a campaign that already has grants. Such a campaign is rejected because
    a new version would move users who hold a coupon to another arm or into the
    holdout.
    """
    from couponflow.allocation import ChannelRules
    from couponflow.allocation.policy import validate_fractions
    from couponflow.store import grants

    campaign_id = campaign_id_or_default(str(params.get("campaign_id") or ""), run_id)
    settings = get_settings()
    campaign_dir(settings, campaign_id)
    budget = params.get("budget_cents")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(
            f"budget_cents must be a whole number of cents, got {budget!r}"
        )
    if not 0 <= budget <= MAX_BUDGET_CENTS:
        raise ValueError(
            f"budget_cents must be between 0 and {MAX_BUDGET_CENTS}, got {budget}"
        )
    holdout = float(params.get("holdout_fraction", 0.0))
    explore = float(params.get("explore_fraction", 0.0))
    validate_fractions(holdout, explore)
    defaults = ChannelRules()
    rules = ChannelRules(
        message_cost_cents={
            **defaults.message_cost_cents,
            **dict(params.get("message_cost_cents") or {}),
        },
        capacity=dict(params.get("channel_capacity") or {}),
    )
    send_after = _send_after(str(params.get("send_after") or ""))
    with get_engine(settings.campaign_db_url).connect() as connection:
        import sqlalchemy as sa

        granted = connection.execute(
            sa.select(sa.func.count())
            .select_from(grants)
            .where(grants.c.campaign_id == campaign_id)
        ).scalar_one()
    if granted:
        raise ValueError(
            f"campaign {campaign_id!r} already has {granted} grants; a new allocation "
            "version would move users who hold a coupon to another arm or into the "
            "holdout, so allocate a new campaign_id instead"
        )
    return {
        "campaign_id": campaign_id,
        "budget_cents": budget,
        "offers": [str(o) for o in params.get("offers") or []],
        "holdout_fraction": holdout,
        "explore_fraction": explore,
        "message_cost_cents": dict(rules.message_cost_cents),
        "channel_capacity": dict(rules.capacity),
        "send_after": send_after.isoformat() if send_after is not None else None,
        "seed": int(params.get("seed", 0)),
    }


def _send_after(text: str) -> pd.Timestamp | None:
    if not text:
        return None
    try:
        stamp = pd.Timestamp(text)
    except ValueError as error:
        raise ValueError(
            f"send_after must be an ISO 8601 time, got {text!r}"
        ) from error
    if stamp.tzinfo is None:
        raise ValueError(
            f"send_after must name its time zone, got {text!r}; for example "
            "2026-12-05T09:00:00+00:00"
        )
    return stamp.tz_convert("UTC")


def active_offers(
    coupons: pd.DataFrame, offers: list[str], at: pd.Timestamp
) -> tuple[pd.DataFrame, list[str]]:
    """Return the coupons valid at ``at``, in catalogue order, and the ids skipped.

    With ``offers`` given, every requested coupon must exist and be valid at ``at``;
    otherwise ``ValueError`` names each one that is not, with its validity window.
    With no ``offers``, coupons not valid at ``at`` are skipped and their ids
    returned.
    """
    coupons = coupons.drop_duplicates("coupon_id", keep="last")
    if offers:
        unknown = sorted(set(offers) - set(coupons["coupon_id"]))
        if unknown:
            raise ValueError(
                f"unknown offers {unknown}; the catalogue has "
                f"{sorted(coupons['coupon_id'])}"
            )
        coupons = coupons[coupons["coupon_id"].isin(offers)]
    is_valid = (coupons["starts_at"] <= at) & (coupons["ends_at"] > at)
    invalid = coupons[~is_valid]
    if offers and not invalid.empty:
        windows = ", ".join(
            f"{coupon} ({pd.Timestamp(start).isoformat()} to "
            f"{pd.Timestamp(end).isoformat()})"
            for coupon, start, end in zip(
                invalid["coupon_id"],
                invalid["starts_at"],
                invalid["ends_at"],
                strict=True,
            )
        )
        raise ValueError(
            f"requested offers not valid at the send time {at.isoformat()}: {windows}"
        )
    valid = coupons[is_valid]
    if valid.empty:
        raise ValueError(
            f"no coupon of the catalogue is valid at the send time {at.isoformat()}"
        )
    return valid.reset_index(drop=True), sorted(invalid["coupon_id"].astype(str))


def score_campaign(request: dict[str, Any]) -> dict[str, Any]:
    """Score every user x offer x channel with the champion model; save the scores.

    ``request`` comes from :func:`check_request`. The campaign folder's pending
    folder gets ``scores.npz`` (probabilities, expected profit, cost and uplift per
    user, offer and channel), the users' feature rows, which eligibility and send
    hours read, and the offers. The send time is ``send_after``, or the time of the
    latest feature snapshot when it is empty.
    """
    from couponflow.allocation import score_channels
    from couponflow.feature_store import training_frame
    from training.registry import load_champion

    settings = get_settings()
    campaign_id = request["campaign_id"]
    folder = campaign_dir(settings, campaign_id)
    model = load_champion(settings)
    latest = _latest_features(settings)
    as_of = latest["event_timestamp"].max()
    send_after = pd.Timestamp(request["send_after"] or as_of)
    if send_after < as_of:
        raise ValueError(
            f"send_after {send_after.isoformat()} is before the latest feature "
            f"snapshot, {as_of.isoformat()}; send at or after it"
        )
    age = pd.Timestamp.now(tz="UTC") - send_after
    if age > pd.Timedelta(days=1):
        log.warning(
            "the campaign's send time %s is %s before now: the features end then. "
            "Run build_features on newer events, or set send_after",
            send_after.isoformat(),
            age.floor("h"),
        )
    entity = latest[["user_id", "event_timestamp"]]
    users = training_frame(settings, entity)
    offers = request["offers"]
    coupons, skipped = active_offers(
        lake.read_lake_table(settings, "coupons"), offers, send_after
    )
    if skipped:
        log.info("skipping coupons not valid at %s: %s", send_after, skipped)
    dropped: list[str] = []
    if not offers:
        coupons, dropped = drop_losing_offers(settings, coupons)

    scores = score_channels(model, users, coupons, settings.margin_rate, CHANNELS)
    pending = folder / PENDING
    pending.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        pending / "scores.npz",
        p=scores.p,
        profit=scores.profit_cents,
        cost=scores.cost_cents,
        uplift=scores.uplift,
    )
    users.to_parquet(pending / "users.parquet", index=False)
    coupons.to_parquet(pending / "offers.parquet", index=False)
    return {
        "campaign_id": campaign_id,
        "request": request,
        "users": len(users),
        "offers": coupons["coupon_id"].tolist(),
        "channels": list(CHANNELS),
        "skipped_offers": skipped,
        "dropped_offers": dropped,
        "as_of": as_of.isoformat(),
        "send_after": send_after.isoformat(),
        "model_uri": getattr(model, "model_uri", "champion"),
        "folder": str(pending),
    }


def latest_campaign_summary(settings: Settings) -> dict[str, Any] | None:
    """Return the newest trustworthy experiment summary, or None when there is none."""
    from couponflow.analysis import load_campaign_summary

    assert settings.reports_dir is not None
    summaries = []
    for path in settings.reports_dir.glob("*/summary.json"):
        summary = load_campaign_summary(path)
        if summary.get("trustworthy"):
            # Reports live in a folder named after their campaign.
            summaries.append({**summary, "campaign_id": path.parent.name})
    if not summaries:
        return None
    return max(summaries, key=lambda summary: str(summary.get("generated_at", "")))


def drop_losing_offers(
    settings: Settings, coupons: pd.DataFrame
) -> tuple[pd.DataFrame, list[str]]:
    """Remove the coupons whose incremental profit the last experiment found negative.

    This is how an experiment's result feeds the next campaign when its Params name
    no offers. Offers the experiment did not test stay in the catalogue.
    """
    from couponflow.analysis import offers_to_drop

    summary = latest_campaign_summary(settings)
    if summary is None:
        return coupons, []
    dropped = sorted(set(offers_to_drop(summary)) & set(coupons["coupon_id"]))
    if dropped:
        log.info(
            "dropping offers %s: campaign %s found their incremental profit negative",
            dropped,
            summary.get("campaign_id"),
        )
    kept = coupons[~coupons["coupon_id"].isin(dropped)].reset_index(drop=True)
    if kept.empty:
        campaign = summary.get("campaign_id")
        raise ValueError(
            f"the experiment of campaign {campaign} dropped every offer; name the "
            "offers in the Params to override it"
        )
    return kept, dropped


def solve_campaign(scores: dict[str, Any]) -> dict[str, Any]:
    """Choose at most one (offer, channel, send hour) per user; store it atomically.

    ``scores`` is the output of :func:`score_campaign`, which carries the checked
    request. Each user's send hour per channel comes from their active hours,
    eligibility from the offer rules and the user's past exposures, and the solver
    keeps the budget, each offer's stock and each channel's capacity, net of
    message costs. A holdout and an exploration share are drawn, and every choice
    is stored with its propensity. ``explore_fraction`` is lowered (halved until
    it fits, possibly to 0) when its random draws would use more than a fifth of a
    limit; the log names the limit, and the fraction used is in the summary and
    the stored params. Once stored, the scored files move from the pending folder
    into the campaign folder.
    """
    from couponflow.allocation import (
        UNLIMITED,
        AllocationSpec,
        ChannelRules,
        ChannelScores,
        EligibilityRules,
        UserOptions,
        allocate_campaign,
        at_send_hours,
        build_eligibility,
        exposure_history,
        fit_explore_fraction,
        plan_rows,
        send_hours_for,
        write_allocation,
    )

    settings = get_settings()
    request = scores["request"]
    budget_cents = int(request["budget_cents"])
    holdout_fraction = float(request["holdout_fraction"])
    explore_fraction = float(request["explore_fraction"])
    seed = int(request["seed"])
    pending = Path(scores["folder"])
    channels = tuple(scores["channels"])
    rules = ChannelRules(
        channels=channels,
        message_cost_cents=request["message_cost_cents"],
        capacity=request["channel_capacity"],
    )
    matrices = np.load(pending / "scores.npz")
    users = pd.read_parquet(pending / "users.parquet")
    coupons = pd.read_parquet(pending / "offers.parquet")
    user_ids = users["user_id"].astype(str)
    send_after = pd.Timestamp(scores["send_after"])

    hours = send_hours_for(users, rules)
    timed = at_send_hours(
        ChannelScores(
            offer_ids=tuple(coupons["coupon_id"].astype(str)),
            channels=channels,
            p=matrices["p"],
            profit_cents=matrices["profit"],
            cost_cents=matrices["cost"],
            uplift=matrices["uplift"],
        ),
        hours.reach,
    )
    eligibility_rules = EligibilityRules()
    history = exposure_history(
        lake.read_lake_table(settings, "exposures"),
        user_ids,
        send_after,
        eligibility_rules.frequency_window_days,
    )
    offers = coupons.assign(
        channels=coupons["channels"]
        .fillna(",".join(channels))
        .replace("", ",".join(channels))
    )
    eligible = build_eligibility(
        pd.concat([users, history], axis=1),
        offers,
        hours.send_times(send_after),
        eligibility_rules,
        channels,
    )
    spec = AllocationSpec(
        offer_ids=tuple(coupons["coupon_id"].astype(str)),
        budget_cents=budget_cents,
        stock=coupons["stock"].fillna(UNLIMITED).to_numpy(dtype=np.int64),
        channels=channels,
        capacity=np.array(
            [rules.capacity.get(c, UNLIMITED) for c in channels], dtype=np.int64
        ),
        message_cost_cents=rules.cost_array(),
    )
    options = UserOptions(
        timed.profit_cents.astype(np.float32),
        timed.cost_cents.astype(np.float32),
        eligible,
    )
    explore = fit_explore_fraction(
        options, spec, user_ids, holdout_fraction, explore_fraction, seed
    )
    if explore < explore_fraction:
        log.warning(
            "explore_fraction lowered from %s to %s: at a higher fraction the "
            "exploration draws would use more than a fifth of a limit (the lines "
            "above name it)",
            explore_fraction,
            explore,
        )
    randomized = allocate_campaign(
        options, spec, user_ids, holdout_fraction, explore, seed
    )
    plan = plan_rows(
        randomized, options, user_ids, hours, send_after, uplift=timed.uplift
    )

    engine = get_engine(settings.campaign_db_url)
    params = {
        **request,
        "explore_fraction": explore,
        "explore_fraction_requested": explore_fraction,
        "offers": scores["offers"],
        "send_after": send_after.isoformat(),
    }
    campaign_id = scores["campaign_id"]
    version = write_allocation(
        engine, campaign_id, plan, scores["model_uri"], budget_cents, params
    )
    folder = pending.parent
    for name in SCORE_FILES:
        os.replace(pending / name, folder / name)
    plan.to_parquet(folder / f"allocation-v{version}.parquet", index=False)
    summary = allocation_summary(plan, randomized.solution, eligible, spec)
    summary.update(
        campaign_id=campaign_id,
        version=version,
        explore_fraction=explore,
        send_after=send_after.isoformat(),
        features_as_of=scores["as_of"],
    )
    if summary["offers_granted"] == 0 and budget_cents > 0:
        reason = (
            "no user has an eligible option with stock and channel capacity left"
            if not summary["users_with_an_open_option"]
            else "no option's predicted profit, net of message cost, is positive "
            "within the limits"
        )
        summary["warnings"] = [f"the allocation sends nothing: {reason}"]
        log.warning("campaign %s: %s", campaign_id, summary["warnings"][0])
    log.info("allocation %s", summary)
    return summary


def allocation_summary(
    plan: pd.DataFrame, solution: Any, eligible: np.ndarray, spec: Any
) -> dict[str, Any]:
    """Return the counts a reviewer checks: who is sent what, by which channel, when.

    Sends are planned messages, not grants: a user is granted the coupon when the
    serving API records it. ``solver_objective_cents`` is the solver's predicted
    net profit over every user, holdout and exploring users included, whose
    choices are not sent; ``expected_profit_cents`` covers the planned sends only.
    """
    sent = plan[plan["arm"] != CONTROL_ARM]
    cost = int(plan["expected_cost_cents"].sum())
    budget_cents = int(spec.budget_cents)
    channel_cost = {
        c: int(v) for c, v in zip(spec.channels, spec.message_cost_cents, strict=True)
    }
    is_open = (spec.stock[spec.option_offer] > 0) & (
        spec.capacity[spec.option_channel] > 0
    )
    open_options = eligible.reshape(len(plan), spec.n_options) & is_open
    return {
        "users": len(plan),
        "users_with_an_open_option": int(open_options.any(axis=1).sum()),
        "holdout_users": int((plan["group_name"] == "holdout").sum()),
        "exploring_users": int((plan["assignment"] == "explore").sum()),
        "offers_granted": len(sent),
        "sends_by_offer": _counts(sent["arm"]),
        "sends_by_channel": _counts(sent["channel"]),
        "sends_by_utc_hour": _counts(sent["send_at"].dt.hour),
        "expected_cost_cents": cost,
        "message_cost_cents": int(sent["channel"].map(channel_cost).sum()),
        "budget_cents": budget_cents,
        "budget_used_fraction": cost / budget_cents if budget_cents else None,
        "expected_profit_cents": int(plan["expected_profit_cents"].sum()),
        "solver_objective_cents": float(solution.objective_cents),
        "solver_dual_bound_cents": float(solution.dual_bound_cents),
    }


def _counts(column: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in column.value_counts().sort_index().items()}


# --- analyze_experiment ---------------------------------------------------------


def campaigns_to_analyze(campaign_id: str | None) -> list[str]:
    """Return ``[campaign_id]``, or every campaign with outcomes in the lake."""
    settings = get_settings()
    outcomes = lake.read_lake_table(settings, "outcomes")
    known = sorted(outcomes["campaign_id"].astype(str).unique())
    if campaign_id is None:
        return known
    if campaign_id not in known:
        raise ValueError(
            f"campaign {campaign_id!r} has no outcomes in the offline store; "
            f"campaigns with outcomes: {known}"
        )
    return [campaign_id]


def allocation_for_analysis(settings: Settings, campaign_id: str) -> pd.DataFrame:
    """Return the campaign's current allocation, or its logged exposures as one.

    A randomized campaign logged outside couponflow has no allocation; its control
    arm is then the holdout.
    """
    from couponflow.allocation import read_current_allocation

    engine = get_engine(settings.campaign_db_url)
    allocation = read_current_allocation(engine, campaign_id)
    if allocation is not None and not allocation.empty:
        return allocation
    exposures = lake.read_lake_table(settings, "exposures")
    exposures = exposures[exposures["campaign_id"] == campaign_id]
    if exposures.empty:
        raise ValueError(f"campaign {campaign_id!r} has no allocation and no exposures")
    frame = exposures[["user_id", "arm", "channel", "send_at", "propensity"]].copy()
    frame["group_name"] = np.where(frame["arm"] == CONTROL_ARM, "holdout", "treatment")
    frame["score_uplift"] = 0.0
    frame["expected_cost_cents"] = 0
    frame["expected_profit_cents"] = 0
    return frame.reset_index(drop=True)


def analyze_campaign(campaign_id: str) -> dict[str, Any]:
    """Compare each arm with the holdout; write the HTML report, log it to MLflow."""
    from couponflow.analysis import analyze_experiment
    from couponflow.report import log_report_to_mlflow, write_report

    settings = get_settings()
    allocation = allocation_for_analysis(settings, campaign_id)
    outcomes = lake.read_lake_table(settings, "outcomes")
    outcomes = outcomes[outcomes["campaign_id"] == campaign_id]
    holdout_share = float((allocation["group_name"] == "holdout").mean())
    design = _design_holdout_fraction(settings, campaign_id, holdout_share)
    result = analyze_experiment(
        allocation,
        outcomes,
        margin_rate=settings.margin_rate,
        expected_holdout_fraction=design,
        covariates=pre_period_spend(settings, allocation),
    )
    assert settings.reports_dir is not None
    path = settings.reports_dir / campaign_id / "report.html"
    write_report(result, path, title=f"Campaign {campaign_id}")
    models = record_models(settings, campaign_id, path.parent / "summary.json")
    run_id = log_report_to_mlflow(result, path, settings, campaign_id)
    return {
        **models,
        "campaign_id": campaign_id,
        "report": str(path),
        "mlflow_run_id": run_id,
        "trustworthy": bool(result.trustworthy),
    }


def record_models(
    settings: Settings, campaign_id: str, summary_path: Path
) -> dict[str, str | None]:
    """Add to the summary the model that allocated the campaign and today's champion.

    The next allocate_campaign run loads the champion by its alias; the summary
    records both, so a reviewer can check whether the experiment judged the champion.
    """
    import sqlalchemy as sa
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from couponflow.store import allocation_versions

    with get_engine(settings.campaign_db_url).connect() as connection:
        allocated_by = connection.execute(
            sa.select(allocation_versions.c.model_uri).where(
                allocation_versions.c.campaign_id == campaign_id,
                allocation_versions.c.is_current.is_(True),
            )
        ).scalar()
    client = MlflowClient(
        tracking_uri=settings.mlflow_tracking_uri,
        registry_uri=settings.mlflow_tracking_uri,
    )
    try:
        version = client.get_model_version_by_alias(
            settings.response_model_name, "champion"
        )
        champion: str | None = (
            f"models:/{settings.response_model_name}/{version.version}"
        )
    except MlflowException:
        champion = None
    models = {"allocation_model_uri": allocated_by, "champion_model_uri": champion}
    summary = json.loads(summary_path.read_text())
    summary.update(models)
    summary_path.write_text(json.dumps(summary, indent=2))
    return models


def pre_period_spend(
    settings: Settings, allocation: pd.DataFrame
) -> pd.DataFrame | None:
    """Return each user's 30-day spend before the send time, the CUPED covariate.

    Taken from the latest feature snapshot at or before the user's send time, so it
    cannot be affected by the campaign. None when there are no features.
    """
    assert settings.feature_dir is not None
    path = settings.feature_dir / "user_features.parquet"
    if not path.exists() or "send_at" not in allocation.columns:
        return None
    features = pd.read_parquet(
        path, columns=["user_id", "event_timestamp", "spend_30d_cents"]
    )
    features["event_timestamp"] = pd.to_datetime(features["event_timestamp"], utc=True)
    users = allocation[["user_id", "send_at"]].dropna().copy()
    users["send_at"] = pd.to_datetime(users["send_at"], utc=True)
    users["user_id"] = users["user_id"].astype(str)
    features["user_id"] = features["user_id"].astype(str)
    joined = pd.merge_asof(
        users.sort_values("send_at"),
        features.sort_values("event_timestamp"),
        left_on="send_at",
        right_on="event_timestamp",
        by="user_id",
        direction="backward",
    )
    joined = joined.dropna(subset=["spend_30d_cents"])
    return pd.DataFrame(
        {
            "user_id": joined["user_id"],
            "pre_spend_cents": joined["spend_30d_cents"].astype("int64"),
        }
    )


def _design_holdout_fraction(
    settings: Settings, campaign_id: str, observed: float
) -> float:
    """Return the designed holdout fraction of a couponflow allocation.

    For a campaign logged outside couponflow the design is read from propensities:
    the control arm's logged propensity.
    """
    engine = get_engine(settings.campaign_db_url)
    import sqlalchemy as sa

    from couponflow.store import allocation_versions

    with engine.connect() as connection:
        row = connection.execute(
            sa.select(allocation_versions.c.params_json).where(
                allocation_versions.c.campaign_id == campaign_id,
                allocation_versions.c.is_current.is_(True),
            )
        ).first()
    if row is not None:
        return float(json.loads(row[0])["holdout_fraction"])
    exposures = lake.read_lake_table(settings, "exposures")
    control = exposures[
        (exposures["campaign_id"] == campaign_id) & (exposures["arm"] == CONTROL_ARM)
    ]
    return float(control["propensity"].iloc[0]) if not control.empty else observed


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Return the finite numbers of ``metrics`` (XComs are JSON, which has no NaN)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and np.isfinite(v)
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
