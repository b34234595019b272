"""Dask client: a LocalCluster by default, a remote scheduler when one is configured."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from couponflow.settings import Settings

log = logging.getLogger(__name__)


@contextmanager
def dask_client(settings: Settings) -> Iterator[Client]:
    """Yield a client of the configured scheduler, or of a new LocalCluster."""
    if settings.dask_scheduler_address:
        log.info("connecting to Dask scheduler %s", settings.dask_scheduler_address)
        with Client(settings.dask_scheduler_address) as client:
            yield client
        return
    # Threads, not processes: the feature computation is pandas and pyarrow work
    # that releases the GIL, and threads start in well under a second.
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=max(1, settings.dask_workers),
            processes=False,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        log.info("started local Dask cluster with %d threads", settings.dask_workers)
        yield client
