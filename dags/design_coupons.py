"""Design a coupon catalogue with a genetic search scored by the champion model.

Each candidate catalogue is scored by the expected incremental profit of its best
allocation under the budget, on the latest user features. The winner is logged to
MLflow ("couponflow-design") and written as a raw coupons batch, which the next
ingest_events run checks like any catalogue. Trigger it from the UI.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param, dag, task
from couponflow_airflow.defaults import DEFAULT_ARGS, START_DATE, TAGS


@task
def search_catalogue(
    params: dict[str, Any] | None = None, run_id: str | None = None
) -> dict[str, Any]:
    from couponflow import design

    assert params is not None
    return design.search_designed_catalogue(
        design_id=design.design_id_from_run(run_id),
        budget_cents=int(params["budget_cents"]),
        n_coupons=int(params["n_coupons"]),
        generations=int(params["generations"]),
        seed=int(params["seed"]),
        max_face_value_cents=int(params["max_face_value_cents"]),
        margin_floor=float(params["margin_floor"]),
        max_users=int(params["max_users"]),
    )


@task
def write_coupons_batch(summary: dict[str, Any]) -> dict[str, Any]:
    from couponflow import design

    return design.write_designed_batch(summary)


@dag(
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=TAGS,
    doc_md=__doc__,
    params={
        "budget_cents": Param(
            50_000_00,
            type="integer",
            minimum=0,
            description="Budget for expected discount cost, in cents.",
        ),
        "n_coupons": Param(
            6, type="integer", minimum=1, description="Coupons in the catalogue."
        ),
        "generations": Param(
            20,
            type="integer",
            minimum=0,
            description="Generations of the genetic search after the initial one.",
        ),
        "seed": Param(
            13, type="integer", description="Seed of the search and user sample."
        ),
        "max_face_value_cents": Param(
            3_000,
            type="integer",
            minimum=1,
            description="Largest amount_off value and free shipping fee, in cents.",
        ),
        "margin_floor": Param(
            0.5,
            type="number",
            minimum=0,
            exclusiveMaximum=1,
            description=(
                "Share of the smallest accepted basket the store keeps after the "
                "discount."
            ),
        ),
        "max_users": Param(
            5_000,
            type="integer",
            minimum=1,
            description="Users sampled for the search; the budget scales with them.",
        ),
    },
)
def design_coupons() -> None:
    write_coupons_batch(search_catalogue())


design_coupons()
