"""The ``couponflow`` command line: simulate, ingest, run DAGs, the demo, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from couponflow.settings import get_settings

log = logging.getLogger("couponflow")


def _add_world_options(parser: argparse.ArgumentParser) -> None:
    from couponflow.demo import DEFAULT_DAYS, DEFAULT_SEED, DEFAULT_USERS

    parser.add_argument(
        "--users", type=int, default=DEFAULT_USERS, help="number of simulated users"
    )
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help="days of behaviour events"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="couponflow",
        description=(
            "Decide which coupon each shopper gets under a budget, and measure what "
            "the coupons caused. Stores live under COUPONFLOW_HOME."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser(
        "simulate", help="write a simulated world as raw batches (truth kept apart)"
    )
    _add_world_options(simulate)

    commands.add_parser("ingest", help="check and ingest every pending raw batch")

    run = commands.add_parser("run-dag", help="run one DAG now, as a real DAG run")
    run.add_argument("dag_id", help="DAG id, for example allocate_campaign")
    run.add_argument(
        "--conf", default="{}", help="DAG params as JSON, e.g. '{\"budget_cents\": 0}'"
    )

    demo = commands.add_parser(
        "demo",
        help="simulate a world and carry one campaign through every DAG to its report",
    )
    _add_world_options(demo)
    demo.add_argument(
        "--budget-cents",
        type=int,
        default=None,
        help="campaign budget in cents (default: a share of the unconstrained spend)",
    )
    demo.add_argument(
        "--keep", action="store_true", help="keep an existing COUPONFLOW_HOME"
    )

    hillstrom = commands.add_parser(
        "hillstrom",
        help="train on 70%% of the Hillstrom e-mail test, evaluate targeting on 30%%",
    )
    hillstrom.add_argument(
        "--path", default=None, help="hillstrom.csv (default: COUPONFLOW_DATA_DIR)"
    )
    hillstrom.add_argument(
        "--target-fraction",
        type=float,
        default=0.3,
        help="share of customers the policy may e-mail",
    )
    hillstrom.add_argument("--seed", type=int, default=7, help="random seed")
    hillstrom.add_argument(
        "--objective",
        choices=("visited", "converted", "revenue_cents"),
        default="visited",
        help="outcome whose predicted uplift ranks the customers",
    )

    serve = commands.add_parser("serve", help="start the offers HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")

    commands.add_parser(
        "airflow-env", help="print the AIRFLOW_* exports for the Airflow UI"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = get_settings()

    try:
        if args.command == "simulate":
            from couponflow.demo import simulate_to_raw

            summary = simulate_to_raw(settings, args.users, args.days, args.seed)
            print(json.dumps(summary, indent=2, default=str))
        elif args.command == "ingest":
            from couponflow import pipeline

            for table in pipeline.INGEST_ORDER:
                print(json.dumps(pipeline.ingest_table(table), default=str))
        elif args.command == "run-dag":
            from couponflow.dagrun import run_dag, task_results

            dag_run = run_dag(settings, args.dag_id, json.loads(args.conf))
            print(json.dumps(task_results(dag_run), indent=2, default=str))
        elif args.command == "demo":
            from couponflow.demo import run_demo

            result = run_demo(
                settings,
                n_users=args.users,
                days=args.days,
                seed=args.seed,
                budget_cents=args.budget_cents,
                fresh=not args.keep,
            )
            print(result.format())
        elif args.command == "hillstrom":
            from couponflow.hillstrom_study import run_hillstrom_study

            study = run_hillstrom_study(
                settings,
                path=args.path,
                target_fraction=args.target_fraction,
                seed=args.seed,
                objective=args.objective,
            )
            print(study.format())
        elif args.command == "serve":
            import uvicorn

            from serving.app import create_app

            uvicorn.run(create_app(settings), host=args.host, port=args.port)
        elif args.command == "airflow-env":
            from couponflow.airflow_env import airflow_environ

            for key, value in airflow_environ(settings).items():
                print(f"export {key}={value}")
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as error:
        log.error("%s failed: %s", args.command, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
