"""Weekly partitions of a raw log and the partitions one retraining cycle reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dynamic_ctr.data.partitions import plan_cycle, weekly_partitions
from dynamic_ctr.data.raw import RawFileConfig, read_raw

TINY = Path(__file__).resolve().parents[2] / "data/01_raw/ml-latest-tiny/ratings.csv"


@pytest.fixture(scope="module")
def ratings():
    return read_raw(RawFileConfig(filepath=str(TINY)))


@pytest.mark.parametrize("min_rows", [1, 300])
def test_every_row_lands_in_one_whole_week_partition(ratings, min_rows: int) -> None:
    parts = weekly_partitions(ratings, "timestamp", "s", min_rows)
    assert list(parts) == sorted(parts)
    assert sum(len(p) for p in parts.values()) == ratings.table.num_rows
    joined = pd.concat(parts.values(), ignore_index=True).sort_values(["userId", "movieId"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(joined, ratings.table.to_pandas().sort_values(["userId", "movieId"]).reset_index(drop=True))
    previous_end = None
    for name, part in parts.items():
        times = pd.to_datetime(part["timestamp"].astype("int64"), unit="s", utc=True)
        monday = pd.Timestamp(name, tz="UTC")
        assert monday.weekday() == 0 and times.max() < monday + pd.Timedelta(days=7)  # named by its last week
        assert monday <= times.max()
        if previous_end is not None:
            assert times.min() >= previous_end  # consecutive, never overlapping
        previous_end = monday + pd.Timedelta(days=7)
        assert len(part) >= min_rows
    if min_rows == 1:  # no merging: one partition per week with rows
        weeks = pd.to_datetime(ratings.table.column("timestamp").to_pandas().astype("int64"), unit="s").dt.to_period("W").nunique()
        assert len(parts) == weeks


def test_a_time_that_does_not_parse_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n1,2,4.0,964982703\n1,3,4.0,yesterday\n")
    with pytest.raises(ValueError, match=r"ratings.csv: line 3: timestamp='yesterday' is not a time"):
        weekly_partitions(read_raw(RawFileConfig(filepath=str(path))), "timestamp")
    with pytest.raises(ValueError, match=r"no column 'ts' to partition by"):
        weekly_partitions(read_raw(RawFileConfig(filepath=str(path))), "ts")


NAMES = ["2018-01-01", "2018-01-08", "2018-01-15", "2018-01-22", "2018-01-29"]


def test_plan_cycle_picks_the_holdout_and_the_window_before_it() -> None:
    plan = plan_cycle(list(reversed(NAMES)), None, 3, bootstrap=False)
    assert (plan.holdout, plan.train, plan.valid) == ("2018-01-29", ("2018-01-08", "2018-01-15"), "2018-01-22")
    backfill = plan_cycle(NAMES, "2018-01-22", 2, bootstrap=False)
    assert (backfill.holdout, backfill.train, backfill.valid) == ("2018-01-22", ("2018-01-08",), "2018-01-15")
    first = plan_cycle(NAMES, None, 2, bootstrap=True)  # every earlier partition
    assert first.train == ("2018-01-01", "2018-01-08", "2018-01-15") and first.bootstrap


@pytest.mark.parametrize(
    ("names", "as_of", "window", "message"),
    [
        (NAMES, "2018-02-05", 2, r"retrain.as_of='2018-02-05' is not a partition"),
        (NAMES, None, 1, r"a training window of 1 partition\(s\): it needs >= 2"),
        (NAMES, "2018-01-15", 3, r"holdout 2018-01-15 has 2 partition\(s\) before it; the window needs 3"),
        ([*NAMES, "week-6"], None, 2, r"\['week-6'\] are not dates"),
        ([], None, 2, "there are no partitions"),
    ],
)
def test_plan_cycle_refuses_what_cannot_run(names, as_of, window, message) -> None:
    with pytest.raises(ValueError, match=message):
        plan_cycle(names, as_of, window, bootstrap=False)
