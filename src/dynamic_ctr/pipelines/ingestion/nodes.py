"""Ingestion nodes: raw files -> one clean, typed table, a quarantine and a report."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from dynamic_ctr.data.adapters import get_adapter
from dynamic_ctr.data.raw import RawTable

logger = logging.getLogger(__name__)


class QuarantineLimitError(RuntimeError):
    """Too many rows were quarantined for the run to go on."""


def ingest(raw_source: dict[str, RawTable | None], params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """Type, check and join the raw files with the adapter named in ``params``.

    Args:
        raw_source: raw files by role, as the catalog's ``RawSourceDataset`` loads them.
        params: ``ingestion`` parameters: ``adapter``, ``options``, ``max_quarantine_share``.

    Returns:
        The clean table, the quarantine (file, line, reason, row), the table schema
        and the ingestion report (per file: rows read, kept, quarantined by reason).
    """
    result = get_adapter(params["adapter"])(raw_source, dict(params.get("options") or {}))
    quarantine = result.quarantine
    files: dict[str, dict[str, Any]] = {}
    for raw in (r for r in raw_source.values() if r is not None):
        quarantined = quarantine.total(raw.path)
        kept = len(result.table) if raw.path == result.main_file else raw.rows_read - quarantined
        files[raw.path] = file_report(raw.rows_read, int(kept), quarantine.counts(raw.path), quarantine.set_missing.get(raw.path, {}), raw.path == result.main_file)
    positive_rate = float(result.table["label"].astype("float64").mean()) if len(result.table) else None
    report = ingestion_report(params, files, len(result.table), positive_rate, result.notes)
    return result.table, quarantine.frame(), result.schema.to_dict(), report


def file_report(rows_read: int, rows_kept: int, by_reason: dict[str, int], set_missing: dict[str, int], main: bool) -> dict[str, Any]:
    """One file's line of the ingestion report."""
    return {
        "rows_read": int(rows_read),
        "rows_kept": int(rows_kept),
        "rows_quarantined": int(sum(by_reason.values())),
        "quarantined_by_reason": dict(by_reason),
        "values_set_missing": dict(set_missing),
        "main": main,
    }


def ingestion_report(
    params: dict[str, Any], files: dict[str, dict[str, Any]], rows: int, positive_rate: float | None, notes: dict[str, Any]
) -> dict[str, Any]:
    """The ingestion report (the same for the in-memory and the streaming ingestion)."""
    shares = {p: f["rows_quarantined"] / f["rows_read"] for p, f in files.items() if f["rows_read"]}
    report = {
        "adapter": params["adapter"],
        "rows": int(rows),
        "positive_rate": positive_rate,
        "files": files,
        "notes": notes,
        "max_quarantined_share": max(shares.values(), default=0.0),
        "max_quarantine_share_allowed": float(params.get("max_quarantine_share", 0.01)),
    }
    for path, f in files.items():
        logger.info("%s: %d rows read, %d kept, %d quarantined %s", path, f["rows_read"], f["rows_kept"], f["rows_quarantined"], f["quarantined_by_reason"] or "")
    return report


def check_quarantine(clean: pd.DataFrame, report: dict[str, Any]) -> dict[str, Any]:
    """Stop the run when a file lost too many rows; otherwise record that it passed.

    A separate node from :func:`ingest` so that the quarantine and the report are saved
    before the run stops: nothing is lost, and the report says what went wrong. Its
    output (``ingestion_check``) is what the ``features`` pipeline waits for.
    """
    return quarantine_verdict(len(clean), report)


def quarantine_verdict(rows: int, report: dict[str, Any]) -> dict[str, Any]:
    """The gate's verdict on a report and the rows kept (raises when over the limit)."""
    allowed = report["max_quarantine_share_allowed"]
    over = {p: f for p, f in report["files"].items() if f["rows_read"] and f["rows_quarantined"] / f["rows_read"] > allowed}
    if over:
        details = "; ".join(
            f"{p}: {f['rows_quarantined']} of {f['rows_read']} rows ({f['rows_quarantined'] / f['rows_read']:.2%}) {f['quarantined_by_reason']}"
            for p, f in over.items()
        )
        raise QuarantineLimitError(
            f"quarantined share above ingestion.max_quarantine_share={allowed:.2%}: {details}. "
            "The rows are in the ingestion_quarantine dataset."
        )
    if rows == 0:
        raise QuarantineLimitError("no rows left after ingestion; see the ingestion_report dataset")
    return {"passed": True, "rows": int(rows), "max_quarantined_share": report["max_quarantined_share"], "allowed": allowed}
