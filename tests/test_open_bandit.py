"""Tests of the Open Bandit Dataset loader and of the off-policy check of bts.

Tests marked realdata skip when the dataset folder is absent. The others build a
small folder of the same layout in tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from couponflow.settings import Settings
from couponflow.sources.open_bandit import (
    N_POSITIONS,
    estimate_position_probabilities,
    evaluate_bts_from_random,
    load_item_context,
    load_open_bandit_logs,
    open_bandit_dir,
    position_reward_model,
)

# The off-policy estimate of the bts click rate must lie within this many standard
# errors of the difference from the rate observed in the bts logs. Measured on the
# "all" campaign: IPS 0.6, SNIPS 0.7, DR 0.7.
MAX_STANDARD_ERRORS_APART = 3.0
ALL_CAMPAIGN_ITEMS = 80


@pytest.fixture(scope="module")
def real_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = Settings(home=tmp_path_factory.mktemp("open_bandit"))
    folder = open_bandit_dir(settings)
    for policy in ("random", "bts"):
        path = folder / policy / "all" / "all.csv"
        if not path.is_file():
            pytest.skip(f"Open Bandit Dataset not found: {path} is missing")
    return settings


def write_small_dataset(data_dir: Path, n_items: int = 4, n_rows: int = 60) -> None:
    rng = np.random.default_rng(3)
    for policy in ("random", "bts"):
        folder = data_dir / "open_bandit_dataset_obd" / policy / "all"
        folder.mkdir(parents=True)
        items = pd.DataFrame(
            {"item_id": np.arange(n_items), "item_feature_0": rng.random(n_items)}
        )
        items.to_csv(folder / "item_context.csv")
        logs = pd.DataFrame(
            {
                "timestamp": pd.date_range(
                    "2019-11-24", periods=n_rows, freq="min", tz="UTC"
                ).astype(str),
                "item_id": rng.integers(0, n_items, n_rows),
                "position": np.arange(n_rows) % N_POSITIONS + 1,
                "click": (rng.random(n_rows) < 0.2).astype(int),
                "propensity_score": 1.0 / n_items,
                "user_feature_0": "abc",
            }
        )
        logs.to_csv(folder / "all.csv")


@pytest.mark.realdata
def test_bts_estimate_matches_on_policy_rate(real_settings: Settings) -> None:
    comparison = evaluate_bts_from_random(real_settings, "all")
    assert comparison.random_rows == 10_000
    assert comparison.bts_rows == 10_000
    assert comparison.n_items == ALL_CAMPAIGN_ITEMS
    assert set(comparison.estimates) == {"ips", "snips", "dr"}
    for method in ("ips", "snips", "dr"):
        apart = comparison.standard_errors_apart(method)
        assert apart < MAX_STANDARD_ERRORS_APART, (method, comparison.to_dict())
        assert comparison.intervals_overlap(method), method
    assert comparison.on_policy.value == pytest.approx(0.0042)


@pytest.mark.realdata
def test_real_logs_have_contract_types(real_settings: Settings) -> None:
    logs = load_open_bandit_logs(real_settings, "bts", "all")
    assert len(logs) == 10_000
    assert str(logs["timestamp"].dt.tz) == "UTC"
    assert logs["position"].between(1, N_POSITIONS).all()
    assert logs["item_id"].between(0, ALL_CAMPAIGN_ITEMS - 1).all()
    assert set(logs["click"].unique()) <= {0, 1}
    random_logs = load_open_bandit_logs(real_settings, "random", "all")
    assert np.allclose(random_logs["propensity_score"], 1.0 / ALL_CAMPAIGN_ITEMS)


def test_position_probabilities_are_frequencies(tmp_path: Path) -> None:
    write_small_dataset(tmp_path)
    settings = Settings(home=tmp_path / "home", data_dir=tmp_path)
    logs = load_open_bandit_logs(settings, "bts")
    probabilities = estimate_position_probabilities(logs, 4)
    assert probabilities.shape == (N_POSITIONS, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    first = logs[logs["position"] == 1]["item_id"]
    expected = first.value_counts(normalize=True).reindex(range(4), fill_value=0.0)
    np.testing.assert_allclose(probabilities[0], expected.to_numpy())


def test_position_probabilities_need_every_position(tmp_path: Path) -> None:
    write_small_dataset(tmp_path)
    settings = Settings(home=tmp_path / "home", data_dir=tmp_path)
    logs = load_open_bandit_logs(settings, "bts")
    with pytest.raises(ValueError, match="no logged row at position 3"):
        estimate_position_probabilities(logs[logs["position"] < 3], 4)


def test_reward_model_is_cross_fitted(tmp_path: Path) -> None:
    write_small_dataset(tmp_path)
    settings = Settings(home=tmp_path / "home", data_dir=tmp_path)
    logs = load_open_bandit_logs(settings, "random")
    predictions = position_reward_model(logs, 4, seed=1)
    assert predictions.shape == (len(logs), 4)
    assert ((predictions >= 0) & (predictions <= 1)).all()
    # Flipping one row's click must not change that row's own prediction.
    flipped = logs.copy()
    clicks = flipped["click"].to_numpy().copy()
    clicks[0] = 1 - clicks[0]
    flipped["click"] = clicks
    np.testing.assert_array_equal(
        position_reward_model(flipped, 4, seed=1)[0], predictions[0]
    )


def test_small_dataset_comparison_runs(tmp_path: Path) -> None:
    write_small_dataset(tmp_path)
    settings = Settings(home=tmp_path / "home", data_dir=tmp_path)
    comparison = evaluate_bts_from_random(settings)
    assert comparison.n_items == 4
    assert comparison.on_policy.n == 60
    payload = comparison.to_dict()
    assert set(payload["estimates"]) == {"ips", "snips", "dr"}
    assert payload["on_policy"]["value"] == comparison.on_policy.value


def test_missing_dataset_names_path(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", data_dir=tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="random/all/all.csv not found"):
        load_open_bandit_logs(settings, "random")


def test_unknown_policy_is_rejected(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", data_dir=tmp_path)
    with pytest.raises(ValueError, match="policy must be one of"):
        load_open_bandit_logs(settings, "greedy")
    with pytest.raises(ValueError, match="campaign must be one of"):
        load_open_bandit_logs(settings, "bts", "kids")


def test_out_of_range_position_is_rejected(tmp_path: Path) -> None:
    write_small_dataset(tmp_path)
    path = tmp_path / "open_bandit_dataset_obd" / "bts" / "all" / "all.csv"
    frame = pd.read_csv(path, index_col=0)
    frame.loc[5, "position"] = 4
    frame.to_csv(path)
    settings = Settings(home=tmp_path / "home", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"position must be in \[1, 3\], got 4"):
        load_open_bandit_logs(settings, "bts")


def test_item_context_must_cover_ids(tmp_path: Path) -> None:
    write_small_dataset(tmp_path)
    path = tmp_path / "open_bandit_dataset_obd" / "bts" / "all" / "item_context.csv"
    items = pd.read_csv(path, index_col=0)
    items.loc[0, "item_id"] = 9
    items.to_csv(path)
    settings = Settings(home=tmp_path / "home", data_dir=tmp_path)
    with pytest.raises(ValueError, match="item_id must be 0 to 3"):
        load_item_context(settings, "bts")
