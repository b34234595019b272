"""Tests of the Hillstrom adapter against the published figures of the experiment."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from couponflow.schemas import CONTROL_ARM, TABLES
from couponflow.settings import Settings
from couponflow.sources.hillstrom import (
    CAMPAIGN_ID,
    COLUMNS,
    FEATURE_COLUMNS,
    HillstromData,
    hillstrom_path,
    load_hillstrom,
)

# Figures of the original file: arm sizes and two-week visit rates per arm.
EXPECTED_ROWS = 64_000
EXPECTED_ARM_SIZES = {"mens_email": 21_307, "womens_email": 21_387, CONTROL_ARM: 21_306}
EXPECTED_VISIT_RATES = {
    "mens_email": 0.1828,
    "womens_email": 0.1514,
    CONTROL_ARM: 0.1062,
}

HEADER = ",".join(COLUMNS)
SAMPLE_ROWS = (
    "10,2) $100 - $200,142.44,1,0,Surburban,0,Phone,Womens E-Mail,0,0,0",
    "6,3) $200 - $350,329.08,1,1,Rural,1,Web,No E-Mail,1,1,1.005",
    "2,1) $0 - $100,45.5,0,1,Urban,1,Multichannel,Mens E-Mail,1,1,29.99",
)


@pytest.fixture(scope="module")
def hillstrom(data_dir: Path) -> HillstromData:
    path = data_dir / "hillstrom" / "hillstrom.csv"
    if not path.is_file():
        pytest.skip(f"Hillstrom data not found at {path} (set COUPONFLOW_DATA_DIR)")
    return load_hillstrom(path)


def _write_sample(folder: Path, header: str = HEADER) -> Path:
    path = folder / "hillstrom.csv"
    path.write_text("\n".join([header, *SAMPLE_ROWS]) + "\n")
    return path


@pytest.mark.realdata
def test_row_count(hillstrom: HillstromData) -> None:
    for frame in (
        hillstrom.users,
        hillstrom.features,
        hillstrom.exposures,
        hillstrom.outcomes,
    ):
        assert len(frame) == EXPECTED_ROWS
    assert hillstrom.users["user_id"].iloc[0] == "0"
    assert hillstrom.users["user_id"].iloc[-1] == str(EXPECTED_ROWS - 1)
    assert hillstrom.users["user_id"].is_unique


@pytest.mark.realdata
def test_arm_sizes(hillstrom: HillstromData) -> None:
    sizes = hillstrom.exposures["arm"].value_counts().to_dict()
    assert sizes == EXPECTED_ARM_SIZES


@pytest.mark.realdata
def test_visit_rates_per_arm(hillstrom: HillstromData) -> None:
    arm = hillstrom.exposures["arm"].to_numpy()
    rates = hillstrom.outcomes.groupby(arm)["visited"].mean()
    for name, expected in EXPECTED_VISIT_RATES.items():
        assert round(float(rates[name]), 4) == expected, name


@pytest.mark.realdata
def test_tables_match_contracts(hillstrom: HillstromData) -> None:
    for name in ("users", "exposures", "outcomes"):
        frame = getattr(hillstrom, name)
        dtypes = {column: str(dtype) for column, dtype in frame.dtypes.items()}
        assert dtypes == TABLES[name].columns, name
    assert hillstrom.outcomes["revenue_cents"].dtype == "int64"
    assert (hillstrom.outcomes["discount_cents"] == 0).all()
    assert (hillstrom.exposures["campaign_id"] == CAMPAIGN_ID).all()
    assert hillstrom.exposures["propensity"].tolist() == [1 / 3] * EXPECTED_ROWS
    window = hillstrom.outcomes["observed_at"] - hillstrom.exposures["send_at"]
    assert (window == pd.Timedelta(days=14)).all()


@pytest.mark.realdata
def test_features_are_numeric(hillstrom: HillstromData) -> None:
    features = hillstrom.features
    assert list(features.columns) == ["user_id", *FEATURE_COLUMNS]
    for column in FEATURE_COLUMNS:
        assert features[column].dtype == "int64", column
    zip_columns = [c for c in FEATURE_COLUMNS if c.startswith("zip_code_")]
    assert (features[zip_columns].sum(axis=1) == 1).all()
    assert features["history_segment"].between(1, 7).all()


def test_sample_conversion(tmp_path: Path) -> None:
    data = load_hillstrom(_write_sample(tmp_path))
    assert data.outcomes["revenue_cents"].tolist() == [0, 101, 2999]
    assert data.features["history_cents"].tolist() == [14244, 32908, 4550]
    assert data.exposures["arm"].tolist() == ["womens_email", CONTROL_ARM, "mens_email"]
    assert data.features["zip_code_suburban"].tolist() == [1, 0, 0]
    assert data.users["region"].tolist() == ["suburban", "rural", "urban"]
    assert data.outcomes["converted"].tolist() == [False, True, True]
    assert not data.outcomes["opened"].any()


def test_default_path_from_settings(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, data_dir=tmp_path / "data")
    assert hillstrom_path(settings) == tmp_path / "data" / "hillstrom" / "hillstrom.csv"
    folder = tmp_path / "data" / "hillstrom"
    folder.mkdir(parents=True)
    _write_sample(folder)
    assert len(load_hillstrom(settings=settings).users) == len(SAMPLE_ROWS)


def test_missing_file_names_path(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, data_dir=tmp_path / "absent")
    with pytest.raises(FileNotFoundError) as error:
        load_hillstrom(settings=settings)
    assert str(hillstrom_path(settings)) in str(error.value)
    assert "COUPONFLOW_DATA_DIR" in str(error.value)


def test_missing_column_rejected(tmp_path: Path) -> None:
    header = HEADER.replace("spend", "amount")
    with pytest.raises(ValueError, match=r"missing columns \['spend'\]"):
        load_hillstrom(_write_sample(tmp_path, header))


def test_unknown_segment_rejected(tmp_path: Path) -> None:
    path = _write_sample(tmp_path)
    path.write_text(path.read_text().replace("No E-Mail", "SMS"))
    with pytest.raises(ValueError, match="segment has unknown values"):
        load_hillstrom(path)
