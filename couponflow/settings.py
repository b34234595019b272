"""One typed settings object; every store location derives from the couponflow home.

Each field can be overridden by an environment variable named ``COUPONFLOW_<FIELD>``
(for example ``COUPONFLOW_CAMPAIGN_DB_URL=postgresql+psycopg://...``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Locations of every store, plus the defaults of a campaign."""

    model_config = SettingsConfigDict(env_prefix="COUPONFLOW_", extra="ignore")

    home: Path = Field(
        default=REPO_ROOT / ".couponflow",
        description="Folder under which every embedded store lives.",
    )
    data_dir: Path = Field(
        default=REPO_ROOT.parent / "shared" / "data",
        description="Folder of the public data sets (hillstrom/, ...), read only.",
    )

    # Derived from home when left empty.
    raw_dir: Path | None = None
    lake_dir: Path | None = None
    feature_dir: Path | None = None
    model_dir: Path | None = None
    reports_dir: Path | None = None
    truth_dir: Path | None = None
    campaign_db_url: str = ""
    mlflow_tracking_uri: str = ""
    mlflow_artifact_root: str = ""

    # Feast: SQLite registry and online store by default; production sets a
    # PostgreSQL registry and a Redis online store.
    feast_registry: str = ""
    feast_online_store: str = Field(
        default="sqlite", description="'sqlite' or 'redis'."
    )
    feast_redis_url: str = "127.0.0.1:6379"

    dask_scheduler_address: str = Field(
        default="",
        description="Address of a Dask scheduler; empty starts a LocalCluster.",
    )
    dask_workers: int = 2

    response_model_name: str = "couponflow-response"
    profile_model_name: str = "couponflow-profile"
    margin_rate: float = Field(
        default=0.30, ge=0, le=1, description="Gross margin as a share of revenue."
    )

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        home = self.home
        self.raw_dir = self.raw_dir or home / "raw"
        self.lake_dir = self.lake_dir or home / "lake"
        self.feature_dir = self.feature_dir or home / "features"
        self.model_dir = self.model_dir or home / "models"
        self.reports_dir = self.reports_dir or home / "reports"
        self.truth_dir = self.truth_dir or home / "truth"
        self.campaign_db_url = (
            self.campaign_db_url or f"sqlite:///{home / 'campaign.db'}"
        )
        self.mlflow_tracking_uri = (
            self.mlflow_tracking_uri or f"sqlite:///{home / 'mlflow.db'}"
        )
        self.mlflow_artifact_root = self.mlflow_artifact_root or str(
            home / "mlartifacts"
        )
        self.feast_registry = self.feast_registry or str(home / "feast" / "registry.db")
        return self

    @property
    def feast_online_path(self) -> Path:
        return self.home / "feast" / "online.db"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    def ensure_dirs(self) -> None:
        """Create the folders of the embedded stores."""
        for path in (
            self.home,
            self.raw_dir,
            self.lake_dir,
            self.feature_dir,
            self.model_dir,
            self.reports_dir,
            self.truth_dir,
            self.home / "feast",
        ):
            assert path is not None
            path.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings, so that the next call reads the environment again."""
    get_settings.cache_clear()
