"""Custom Kedro datasets: raw click logs in, models out (no pickle anywhere)."""
