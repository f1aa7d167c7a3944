"""Drift: PSI by hand, OOV shares and label rates on encoded frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dynamic_ctr.data.drift import PSI_FLOOR, drift_table, population_stability_index
from dynamic_ctr.spec import FeatureSpec, FieldSpec


def test_psi_against_its_formula() -> None:
    assert population_stability_index(np.array([10, 20, 70]), np.array([1, 2, 7])) == pytest.approx(0.0, abs=1e-15)
    e, a = np.array([0.5, 0.5]), np.array([0.8, 0.2])
    assert population_stability_index(e, a) == pytest.approx(0.3 * math.log(0.8 / 0.5) - 0.3 * math.log(0.2 / 0.5))
    # an empty bin is floored, so the index stays finite
    got = population_stability_index(np.array([5, 5, 0]), np.array([4, 4, 2]))
    floor = PSI_FLOOR
    assert got == pytest.approx(2 * (0.4 - 0.5) * math.log(0.4 / 0.5) + (0.2 - floor) * math.log(0.2 / floor))
    with pytest.raises(ValueError, match="at least one count"):
        population_stability_index(np.zeros(2), np.ones(2))


def test_drift_table_counts_oov_rows_and_label_rates() -> None:
    spec = FeatureSpec((FieldSpec("user", "categorical", 6), FieldSpec("genres", "sequence", 5, max_len=2)))
    window = pd.DataFrame({"user": [2, 3, 4, 5], "genres__0": [2, 3, 2, 1], "genres__1": [0, 4, 0, 0], "label": [0, 1, 0, 1]})
    new = pd.DataFrame({"user": [1, 1, 2, 3], "genres__0": [2, 2, 2, 2], "genres__1": [1, 0, 0, 0], "label": [1, 1, 1, 0]})
    table = drift_table(window, new, spec).set_index("field")
    assert table.loc["user", "oov_share_window"] == 0 and table.loc["user", "oov_share_new"] == 0.5
    assert table.loc["genres", "oov_share_window"] == 0.25 and table.loc["genres", "oov_share_new"] == 0.25
    assert table.loc["label", "label_rate_window"] == 0.5 and table.loc["label", "label_rate_new"] == 0.75
    # user bins: values 2..5 (top), OOV, other: window (1,1,1,1,0,0), new (1,1,0,0,2,0)
    assert table.loc["user", "psi"] == pytest.approx(population_stability_index(np.array([1, 1, 1, 1, 0, 0]), np.array([1, 1, 0, 0, 2, 0])))
    assert table.loc["label", "psi"] == pytest.approx(population_stability_index(np.array([2, 2]), np.array([1, 3])))
    same = drift_table(window, window, spec)
    assert np.allclose(same["psi"], 0.0)
