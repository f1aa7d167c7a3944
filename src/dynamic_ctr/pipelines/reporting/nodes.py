"""Reporting nodes: test metrics per variant, then one report over all variants.

Every number comes from catalog inputs; the only figures typed in are the paper's own,
in ``conf/base/parameters_reporting.yml``, labelled with their table.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # reports are written headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dynamic_ctr.models import build_model, count_parameters, generated_cores  # noqa: E402
from dynamic_ctr.pipelines.training.nodes import frame_to_tensors  # noqa: E402
from dynamic_ctr.significance import delong_test, paired_delta, verdict  # noqa: E402
from dynamic_ctr.spec import FeatureSpec  # noqa: E402
from dynamic_ctr.training.metrics import auc, evaluate, gauc, log_loss  # noqa: E402

GROUP_COLUMN = "frequency_group"


def score_metrics(y: np.ndarray, p: np.ndarray, frame: pd.DataFrame, spec: FeatureSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"auc": auc(y, p), "logloss": log_loss(y, p)}
    if spec.user_field:
        users = frame[spec.user_field].to_numpy()
        known = users != 1  # users unseen in training share the OOV index: not one group
        out["gauc_user"], out["gauc_user_groups"] = gauc(y[known], p[known], users[known])
    if spec.domain_field:
        out["gauc_domain"], out["gauc_domain_groups"] = gauc(y, p, frame[spec.domain_field].to_numpy())
    return out


def _by_group(y: np.ndarray, p: np.ndarray, keys: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for key in np.unique(keys):
        mask = keys == key
        if mask.sum() and 0 < y[mask].sum() < mask.sum():
            out[str(int(key))] = {"auc": auc(y[mask], p[mask]), "samples": int(mask.sum())}
    return out


EMPTY_PROJECTION = {"pc1": [], "pc2": [], GROUP_COLUMN: [], "domain": []}


def evaluate_variant(
    models: dict[str, nn.Module], test_frame: pd.DataFrame, feature_spec: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Test metrics and predictions of every seed's deployable model, and the generated
    ``S_i`` of the first seed projected by PCA (empty for models without APG).

    Returns:
        ``{"seeds": {seed: {auc, logloss, gauc_user, gauc_domain, by_domain,
        by_frequency_group}}}``; the test predictions (``label`` and one float64
        probability column per seed, in test-row order: what the report's paired tests
        read); and a frame of 2-d projections with the rows' activity group and domain.
        A variant not applicable to the data set (no models) gives
        ``{"status": "not_applicable"}`` and empty frames.
    """
    if not models:
        return {"status": "not_applicable"}, pd.DataFrame(), pd.DataFrame(EMPTY_PROJECTION)
    spec = FeatureSpec.from_dict(feature_spec)
    test = frame_to_tensors(test_frame, spec, "cpu")
    y = test.y.numpy()
    seeds: dict[str, Any] = {}
    predictions = pd.DataFrame({"label": y.astype(np.int8)})
    for name, model in models.items():
        p = evaluate(model, test)
        predictions[name] = p.astype(np.float64)  # float32 would add ties and move the AUC
        m = score_metrics(y, p, test_frame, spec)
        if spec.domain_field:
            m["by_domain"] = _by_group(y, p, test_frame[spec.domain_field].to_numpy())
        if GROUP_COLUMN in test_frame:
            m["by_frequency_group"] = _by_group(y, p, test_frame[GROUP_COLUMN].to_numpy())
        seeds[name] = m
    summary = {"status": "evaluated", "seeds": seeds, "test_rows": len(test_frame)}
    for key in ("auc", "logloss", "gauc_user", "gauc_domain"):
        values = [s[key] for s in seeds.values() if key in s and s[key] is not None and not math.isnan(s[key])]
        if values:
            std = float(np.std(values, ddof=1)) if len(values) > 1 else None  # one seed: no spread
            summary[key] = {"mean": float(np.mean(values)), "std": std, "n": len(values)}

    first = next(iter(models.values()))
    rows = min(params["pca_rows"], len(test))
    try:
        cores = generated_cores(first, test.x[:rows]).numpy()
    except ValueError:  # no APG layer
        return summary, predictions, pd.DataFrame(EMPTY_PROJECTION)
    # v1's "cores" are whole W_i (tens of thousands of columns): a randomized SVD keeps
    # the two leading components cheap, and float32 avoids a float64 copy of them all.
    coords = PCA(n_components=2, svd_solver="randomized", random_state=0).fit_transform(cores)
    projection = pd.DataFrame({"pc1": coords[:, 0], "pc2": coords[:, 1]})
    projection[GROUP_COLUMN] = test_frame[GROUP_COLUMN].to_numpy()[:rows] if GROUP_COLUMN in test_frame else -1
    projection["domain"] = test_frame[spec.domain_field].to_numpy()[:rows] if spec.domain_field else -1
    return summary, predictions, projection


# ------------------------------------------------------------------ the report


def _describe(config: dict[str, Any]) -> dict[str, Any]:
    """Model family, backbone and condition of a model config, for the summary."""
    apg, dynint, adasparse = config.get("apg"), config.get("dynint"), config.get("adasparse")
    if config["family"] in ("star", "mmoe", "maml"):  # domain-specific parameters
        return {"model_family": "multidomain", "backbone": config["family"],
                "condition": f"domain({config.get('domain_field')})", "apg_version": None}
    if adasparse:
        return {"model_family": "adasparse", "backbone": config["family"], "apg_version": None,
                "condition": f"{adasparse['formulation']}({','.join(adasparse.get('fields') or [])})"}
    if dynint:  # xDeepInt (static) or a DynInt form; the "condition" is what drives W
        mode = dynint["mode"]
        condition = None if mode == "static" else f"{mode}(sg(X_0))"
        return {"model_family": "base" if mode == "static" else "dynint", "backbone": "xdeepint",
                "condition": condition, "apg_version": None, "dynint_mode": mode}
    if not apg:
        backbone = config["family"] if config.get("dnn", True) else f"{config['family']} (no DNN)"
        return {"model_family": "base", "backbone": backbone, "condition": None, "apg_version": None}
    cond = apg.get("condition") or {}
    mode = cond.get("mode", "self")
    text = mode if mode == "self" else f"{mode}({','.join(cond.get('fields') or [])})"
    if mode == "mix":
        text += f"/{cond.get('aggregation') or 'input'}-{cond.get('combine') or 'attention'}"
    return {"model_family": "apg", "backbone": config["family"], "condition": text, "apg_version": apg.get("version")}


def compare_pair(variant: pd.DataFrame, base: pd.DataFrame, alpha: float) -> dict[str, Any]:
    """``variant`` against ``base`` on the same test rows, seeds paired by name.

    Gives the mean paired AUC delta over seeds with its 95% interval and the paired
    t-test p-value (seed-to-seed variation), DeLong's test per seed (test-set noise,
    the two models scored on the same rows) and the verdict from them
    (:func:`dynamic_ctr.significance.verdict`). Deltas are in AUC (not % points).
    """
    if not np.array_equal(variant["label"].to_numpy(), base["label"].to_numpy()):
        raise ValueError("the variant and its base were not evaluated on the same test rows")
    seeds = [c for c in variant.columns if c != "label" and c in base.columns]
    if not seeds:
        return {"seeds": 0, "verdict": "no common seed"}
    y = variant["label"].to_numpy()
    tests = [delong_test(y, variant[s].to_numpy(np.float64), base[s].to_numpy(np.float64)) for s in seeds]
    paired = paired_delta([t.delta for t in tests])
    return {
        "seeds": paired.n,
        "delta": paired.mean,
        **{key: _number(getattr(paired, attr)) for key, attr in
           (("delta_std", "std"), ("ci_low", "ci_low"), ("ci_high", "ci_high"), ("t_test_p", "p_value"))},
        "delong_p": [t.p_value for t in tests],
        "delong_significant": sum(t.p_value < alpha for t in tests),
        "verdict": verdict(paired, [t.p_value for t in tests], alpha),
    }


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined statistic (one seed) is null."""
    return None if value is None or math.isnan(value) else float(value)


def _pct(result: dict[str, Any], key: str) -> float:
    value = result.get(key)
    return math.nan if value is None else 100 * value


DEFAULT_TABLES = [{"title": "Every variant on the same split"}]
PAPER_METRICS = ("auc", "logloss", "gauc_domain")  # what a table's `paper` figures may give


def _seed_interval(values: list[float]) -> tuple[float, float | None, float | None]:
    """Mean over seeds and its 95% t interval (none from one seed)."""
    summary = paired_delta(values)  # the one-sample t summary of the per-seed values
    return summary.mean, _number(summary.ci_low), _number(summary.ci_high)


def model_tables(tables: list[dict[str, Any]], metrics: dict[str, dict[str, Any]], described: dict[str, dict[str, Any]],
                 skipped: dict[str, str | None]) -> pd.DataFrame:
    """One row per (table, variant): test AUC, LogLoss and GAUC over domains (when the
    data has domains), mean over seeds with 95% t intervals, beside the paper's figures
    where the table gives them (DynInt Tables 1-2, AdaSparse Table 1 style; every
    variant on the same split). ``variants`` absent: every trained variant. A listed
    variant that did not run keeps its row, with the reason."""
    rows = []
    for table in tables:
        paper = table.get("paper") or {}
        names = table.get("variants") or list(metrics)
        for name in names:
            figures = paper.get(name) or {}
            row: dict[str, Any] = {"table": table["title"], "variant": name, **{
                k: described.get(name, {}).get(k) for k in ("model_family", "backbone", "condition")}}
            if name in metrics:
                seeds = metrics[name]["seeds"].values()
                for key in ("auc", "logloss", "gauc_domain"):
                    values = [m[key] for m in seeds if m.get(key) is not None and math.isfinite(m[key])]
                    mean, low, high = _seed_interval(values) if values else (None, None, None)
                    row |= {f"{key}_mean": mean, f"{key}_ci95_low": low, f"{key}_ci95_high": high}
                row |= {"seeds": len(metrics[name]["seeds"]), "status": "trained"}
            else:
                row |= {"seeds": 0, "status": f"not applicable: {skipped[name]}" if name in skipped else "not run"}
            row |= {f"paper_{key}": figures.get(key) for key in PAPER_METRICS}
            rows.append(row)
    columns = ["table", "variant", "model_family", "backbone", "condition",
               *(f"{key}_{part}" for key in ("auc", "logloss", "gauc_domain") for part in ("mean", "ci95_low", "ci95_high")),
               "seeds", "status", *(f"paper_{key}" for key in PAPER_METRICS)]
    return pd.DataFrame(rows, columns=columns)


def _budget_text(budget: dict[str, Any] | None) -> str | None:
    if not budget:
        return None
    own = f" + {len(budget['own_dimensions'])} own dim(s)" if budget["own_dimensions"] else ""
    return (f"{budget.get('finished_trials', '?')}/{budget['n_trials']} trials ({budget['common_trials']} shared{own}), "
            f"<= {budget['max_epochs']} epochs, {budget['seeds']} seed(s)")


def _equal_budget(variant: dict[str, Any] | None, base: dict[str, Any] | None) -> bool | None:
    """Whether a variant and its base got the same tuning budget on the shared space
    (trials planned and finished, epochs, seeds); None when either did not train."""
    if not variant or not base:
        return None
    same_plan = all(variant[k] == base[k] for k in ("common_trials", "max_epochs", "seeds"))
    finished = variant.get("finished_trials") == variant["n_trials"] and base.get("finished_trials") == base["n_trials"]
    return same_plan and finished


def figure_html(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _gain_plot(gains: pd.DataFrame, x: str, xlabel: str, title: str, empty: str) -> plt.Figure:
    """Each variant's test-AUC gain over its base (% points) against ``gains[x]``."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if gains.empty:
        ax.text(0.5, 0.5, empty, ha="center", va="center")
    for variant, rows in gains.groupby("variant", sort=False):
        ax.plot(rows[x], rows["auc_gain_pct"], marker="o", label=variant)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test AUC gain vs base (% points)")
    ax.set_title(title)
    if not gains.empty:
        ax.legend(fontsize=7, ncol=2)
    return fig


def _frequency_plot(gains: pd.DataFrame) -> plt.Figure:
    return _gain_plot(gains, "group", "activity group (0 = least active users)", "Gain per activity group (cf. APG Figure 8)",
                      "no activity groups (frequency_key is null)")


def _pca_plot(projections: dict[str, pd.DataFrame]) -> plt.Figure:
    shown = {k: v for k, v in projections.items() if len(v)}
    cols = max(1, min(3, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (name, frame) in zip(axes.flat, shown.items()):
        ax.set_axis_on()
        points = ax.scatter(frame["pc1"], frame["pc2"], c=frame[GROUP_COLUMN], cmap="viridis", s=4, alpha=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if shown:
        fig.colorbar(points, ax=axes.ravel().tolist(), label="activity group")
    fig.suptitle("Generated S_i of the first APG layer, PCA (cf. APG Figures 6 and 9)", y=1.0)
    return fig


DOMAIN_BINS = 5  # AdaSparse Figure 3b: domains ranked by size, 5 bins of equal samples


def domain_gains(metrics: dict[str, dict[str, Any]], bases: dict[str, str | None]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Each variant's test-AUC gain over its base per domain-size bin (AdaSparse Figure
    3b), and its uplifted-domains ratio.

    Per domain, the gain is the mean over the seeds both trained of the per-domain AUC
    difference. Domains are ranked by test rows (largest first) and cut into
    :data:`DOMAIN_BINS` bins of about equal rows (bin 1: the few largest domains, bin 5:
    the long tail); a bin's gain is the row-weighted mean of its domains' gains. The
    uplifted-domains ratio is the share of domains whose gain is positive.

    Returns:
        The table (variant, base, bin, domains, samples, auc_gain_pct) and
        ``{variant: ratio}``.
    """
    rows, ratios = [], {}
    for name, base in bases.items():
        if not base or base not in metrics:
            continue
        base_seeds = metrics[base]["seeds"]
        deltas: dict[str, list[float]] = {}
        samples: dict[str, int] = {}
        for seed, m in metrics[name]["seeds"].items():
            theirs = (base_seeds.get(seed) or {}).get("by_domain") or {}
            for d, stats in (m.get("by_domain") or {}).items():
                if d in theirs:
                    deltas.setdefault(d, []).append(stats["auc"] - theirs[d]["auc"])
                    samples[d] = stats["samples"]
        if not deltas:
            continue
        gain = {d: float(np.mean(v)) for d, v in deltas.items()}
        ratios[name] = float(np.mean([g > 0 for g in gain.values()]))
        ranked = sorted(gain, key=lambda d: (-samples[d], int(d)))
        total, before = sum(samples.values()), 0
        bins: dict[int, list[str]] = {}
        for d in ranked:  # a domain's bin is where its first row falls in the ranked rows
            bins.setdefault(min(DOMAIN_BINS, 1 + DOMAIN_BINS * before // total), []).append(d)
            before += samples[d]
        for b, members in sorted(bins.items()):
            n = sum(samples[d] for d in members)
            rows.append({"variant": name, "base": base, "bin": b, "domains": len(members), "samples": n,
                         "auc_gain_pct": 100 * sum(gain[d] * samples[d] for d in members) / n})
    return pd.DataFrame(rows, columns=["variant", "base", "bin", "domains", "samples", "auc_gain_pct"]), ratios


def _domain_gain_plot(gains: pd.DataFrame) -> plt.Figure:
    fig = _gain_plot(gains, "bin", "domain-size bin (equal test rows; 1 = largest domains, 5 = long tail)",
                     "Gain per domain-size bin (cf. AdaSparse Figure 3b)", "no domains, or no variant with a base")
    fig.axes[0].set_xticks(range(1, DOMAIN_BINS + 1))
    return fig


def _regrained(config: dict[str, Any], coarse: str | None, fine: str) -> dict[str, Any]:
    """``config`` with every use of the ``coarse`` domain field switched to ``fine``."""
    def swap(names: list[str] | None) -> list[str] | None:
        return None if names is None else [fine if n == coarse else n for n in names]

    out = copy.deepcopy(config)
    if out.get("domain_field") == coarse:
        out["domain_field"] = fine
    if out.get("adasparse"):
        out["adasparse"]["fields"] = swap(out["adasparse"].get("fields"))
    condition = (out.get("apg") or {}).get("condition") or {}
    if condition.get("fields"):
        condition["fields"] = swap(condition["fields"])
    return out


def parameters_by_grain(configs: dict[str, dict[str, Any]], spec: FeatureSpec) -> pd.DataFrame:
    """Each variant's parameter count with its domain parameters per domain (coarse, as
    trained) and per item (fine, APG Table 6), built on the meta device (no memory).
    Variants that do not read the domain have the same count at both grains."""
    rows = []
    for name, config in configs.items():
        counts = {}
        for grain, cfg in (("coarse", config), ("fine", _regrained(config, spec.domain_field, spec.item_field))):
            if grain == "fine" and spec.item_field is None:
                counts[grain] = None
                continue
            with torch.device("meta"):
                counts[grain] = count_parameters(build_model({**cfg, "folded": False}, spec))
        rows.append({"variant": name, "domain_field": config.get("domain_field"), "parameters_coarse": counts["coarse"],
                     "parameters_fine": counts["fine"],
                     "mb_fine": None if counts["fine"] is None else 4 * counts["fine"] / 2**20})
    return pd.DataFrame(rows, columns=["variant", "domain_field", "parameters_coarse", "parameters_fine", "mb_fine"])


def _config_value(config: dict[str, Any], path: str) -> Any:
    """The value at dotted ``path`` (``model.adasparse.r_max``) of a trained config, or None."""
    value: Any = config
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _sweep_plot(sweeps: list[dict[str, Any]], tables: pd.DataFrame, configs: dict[str, dict[str, Any]]) -> plt.Figure:
    """Test AUC (mean over seeds, 95% t interval) against one configured parameter, per
    sweep (e.g. AdaSparse Figure 3d: AUC against the sparsity boundary). A listed variant
    without the parameter (the backbone) is drawn as a horizontal reference line."""
    cols = max(1, len(sweeps))
    fig, axes = plt.subplots(1, cols, figsize=(6 * cols, 4), squeeze=False)
    if not sweeps:
        axes[0, 0].text(0.5, 0.5, "no sweeps configured", ha="center", va="center")
        axes[0, 0].set_axis_off()
    stats = tables.drop_duplicates("variant").set_index("variant")
    for ax, sweep in zip(axes.flat, sweeps):
        points = []
        for name in sweep["variants"]:
            if name not in configs or name not in stats.index or pd.isna(stats.loc[name, "auc_mean"]):
                continue
            row, x = stats.loc[name], _config_value(configs[name], sweep["parameter"])
            if x is None:
                ax.axhline(row["auc_mean"], color="grey", ls="--", lw=1, label=f"{name} (no {sweep['parameter'].split('.')[-1]})")
                continue
            points.append((float(x), row["auc_mean"], row["auc_ci95_low"], row["auc_ci95_high"], name))
        points.sort()
        if points:
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            low = [p[1] - p[2] if pd.notna(p[2]) else 0.0 for p in points]
            high = [p[3] - p[1] if pd.notna(p[3]) else 0.0 for p in points]
            ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=4, label="test AUC, 95% interval")
            for x, y, *_, name in points:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(sweep["parameter"])
        ax.set_ylabel("test AUC")
        ax.set_title(sweep["title"], fontsize=9)
        ax.legend(fontsize=7)
    return fig


def _masks_plot(records: dict[str, dict[str, Any]], domain_names: list[str]) -> plt.Figure:
    """AdaSparse Figure 3a: the mean factors of the first hidden layer's neurons for the
    two most similar and the most different of the ten largest test domains, from the
    AdaSparse variant that prunes that layer most."""
    fig, ax = plt.subplots(figsize=(9, 2.6))
    if not records:
        ax.text(0.5, 0.5, "no AdaSparse variant in this suite", ha="center", va="center")
        ax.set_axis_off()
        return fig
    # the variant that prunes its first hidden layer most: the most telling picture
    variant = max(records, key=lambda n: records[n]["sparsity_by_layer"][min(1, len(records[n]["sparsity_by_layer"]) - 1)])
    pick = records[variant]
    layer = min(1, len(pick["sparsity_by_layer"]) - 1)  # the first hidden layer's neurons
    largest = sorted(pick["domains"], key=lambda d: -pick["domains"][d]["rows"])[:10]
    vectors = np.array([pick["domains"][d]["mean_factors"][layer] for d in largest])
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    a, b = np.unravel_index(np.argmax(similarity), similarity.shape) if len(largest) > 1 else (0, 0)
    np.fill_diagonal(similarity, np.inf)
    c = int(np.argmin(similarity[a] + similarity[b])) if len(largest) > 2 else b
    chosen = [largest[i] for i in dict.fromkeys([a, b, c])]
    def name(d: str) -> str:
        return domain_names[int(d) - 1] if 0 < int(d) <= len(domain_names) else d

    image = ax.imshow([pick["domains"][d]["mean_factors"][layer] for d in chosen], aspect="auto", cmap="Greys",
                      interpolation="nearest")
    ax.set_yticks(range(len(chosen)), [f"{name(d)} ({pick['domains'][d]['rows']} rows)" for d in chosen], fontsize=7)
    ax.set_xlabel(f"neuron of layer {layer} (mean factor over the domain's test rows)")
    fig.colorbar(image, ax=ax)
    ax.set_title(f"Learned masks of {variant} ({pick['formulation']}, pruner on {pick['pruner_input']}): two similar "
                 "domains and a different one (cf. AdaSparse Figure 3a)", fontsize=9)
    return fig


def build_report(
    params: dict[str, Any], plan: dict[str, Any], feature_spec: dict[str, Any], domain_stats: pd.DataFrame,
    deployment: dict[str, Any], **artifacts: Any,
) -> tuple[dict[str, Any], str, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, plt.Figure, plt.Figure]:
    """The suite's JSON summary, HTML report, paper comparison, model tables, efficiency, per-domain
    and activity-group-gain tables and the two figures, from the suite plan and every
    variant's ``<variant>__metrics``, ``__predictions``, ``__folding``, ``__summary``,
    ``__history`` and ``__projection``. Variants not applicable to the data set are
    listed with their reason and left out of every table."""
    every = [k[: -len("__metrics")] for k in artifacts if k.endswith("__metrics")]
    names = [n for n in every if artifacts[f"{n}__summary"].get("status") == "trained"]
    skipped = {n: artifacts[f"{n}__summary"].get("reason") for n in every if n not in names}
    kinds = ("metrics", "predictions", "folding", "summary", "history", "projection", "trials", "trained")
    get = {kind: {n: artifacts[f"{n}__{kind}"] for n in names} for kind in kinds}
    spec = FeatureSpec.from_dict(feature_spec)
    alpha = float(params.get("alpha", 0.05))
    report_params = plan.get("report") or {}

    pairs: dict[tuple[str, str], dict[str, Any]] = {}

    def compared(variant: str, base: str) -> dict[str, Any] | None:
        if variant not in names or base not in names:
            return None
        if (variant, base) not in pairs:
            pairs[variant, base] = compare_pair(get["predictions"][variant], get["predictions"][base], alpha)
        return pairs[variant, base]

    variants = []
    for n in names:
        m, f, s = get["metrics"][n], get["folding"][n], get["summary"][n]
        entry = {"name": n, "suite": plan["suite"], **_describe(s["best_config"]["model"])}
        base = s.get("compare_to")
        entry.update({
            "test_auc": m["auc"]["mean"], "test_auc_std": m["auc"]["std"], "test_logloss": m["logloss"]["mean"],
            "test_gauc_user": m.get("gauc_user", {}).get("mean"), "test_gauc_domain": m.get("gauc_domain", {}).get("mean"),
            "seeds": len(m["seeds"]), "validation_auc": s["best_value"], "best_params": s["best_params"],
            "parameter_count": f["parameters"], "folded_parameter_count": f["folded_parameters"],
            "folding_check": {"max_abs_diff": f["max_abs_diff"], "tolerance": f["tolerance"], "passed": f["max_abs_diff"] <= f["tolerance"]},
            "compare_to": base, "budget": s.get("budget"),
            "vs_base": compared(n, base) if base else None,
        })
        variants.append(entry)
    by_name = {v["name"]: v for v in variants}

    # Paper delta vs our delta (AUC in % points), with the paired evidence.
    comparison_rows = []
    for row in report_params.get("paper_rows") or []:
        variant, base = row["variant"], row["base"]
        result = compared(variant, base) or {}
        paper_delta = row["paper_variant"] - row["paper_base"]
        if variant in skipped or base in skipped:
            outcome = f"not applicable: {skipped.get(variant) or skipped.get(base)}"
        elif not result:
            outcome = "not run"
        else:
            outcome = result["verdict"]
        budgets = (get["summary"].get(variant, {}).get("budget"), get["summary"].get(base, {}).get("budget"))
        comparison_rows.append({
            "paper_table": row["table"], "paper_row": row["row"], "variant": variant, "base": base,
            "paper_base_auc_pct": row["paper_base"], "paper_variant_auc_pct": row["paper_variant"],
            "paper_delta_pct": round(paper_delta, 4), "our_delta_pct": _pct(result, "delta"), "our_delta_std_pct": _pct(result, "delta_std"),
            "ci95_low_pct": _pct(result, "ci_low"), "ci95_high_pct": _pct(result, "ci_high"), "t_test_p": result.get("t_test_p") if result.get("t_test_p") is not None else math.nan,
            "delong_p_per_seed": " ".join(f"{p:.3g}" for p in result.get("delong_p", [])),
            "delong_significant_seeds": f"{result['delong_significant']}/{result['seeds']}" if result.get("delong_p") else "",
            "seeds": result.get("seeds", 0), "equal_budget": _equal_budget(*budgets), "verdict": outcome,
        })
    comparison = pd.DataFrame(comparison_rows)
    tables = model_tables(report_params.get("tables") or DEFAULT_TABLES, get["metrics"], by_name, skipped)

    efficiency_rows = []
    for n in names:
        f, h = get["folding"][n], get["history"][n]
        base = get["summary"][n].get("compare_to")
        base_f = get["folding"].get(base) if base else None
        throughput = float(h["samples_per_s"].median()) if len(h) else math.nan
        base_tp = float(get["history"][base]["samples_per_s"].median()) if base in get["history"] else math.nan
        efficiency_rows.append({
            "variant": n, "parameters": f["parameters"], "folded_parameters": f["folded_parameters"],
            "hidden_memory_mb": f["hidden_memory_mb"], "folded_hidden_memory_mb": f["folded_hidden_memory_mb"],
            "latency_ms": f["latency_ms"], "folded_latency_ms": f["folded_latency_ms"],
            "folded_latency_vs_base": f["folded_latency_ms"] / base_f["folded_latency_ms"] if base_f else math.nan,
            "train_samples_per_s": throughput, "train_time_vs_base": base_tp / throughput if base else math.nan,
        })
    efficiency = pd.DataFrame(efficiency_rows)

    domain_names = (spec.metadata or {}).get("domain_names") or []
    domain_rows = []
    for n in names:
        for seed, m in get["metrics"][n]["seeds"].items():
            for d, stats in (m.get("by_domain") or {}).items():
                name = domain_names[int(d) - 1] if 0 < int(d) <= len(domain_names) else d
                domain_rows.append({"variant": n, "seed": seed, "domain": int(d), "name": name, **stats})
    per_domain = pd.DataFrame(domain_rows, columns=["variant", "seed", "domain", "name", "auc", "samples"])
    per_domain_mean = per_domain.groupby(["variant", "domain", "name"], as_index=False).agg(auc=("auc", "mean"), samples=("samples", "first"))

    gain_rows = []
    for n in names:
        base = get["summary"][n].get("compare_to")
        if not base or base not in get["metrics"]:
            continue
        base_seeds = get["metrics"][base]["seeds"]
        seed_pairs = [(m, base_seeds[k]) for k, m in get["metrics"][n]["seeds"].items() if k in base_seeds]
        per_group: dict[int, list[float]] = {}
        for mv, mb in seed_pairs:
            for g, stats in (mv.get("by_frequency_group") or {}).items():
                if g in (mb.get("by_frequency_group") or {}) and int(g) >= 0:
                    per_group.setdefault(int(g), []).append(stats["auc"] - mb["by_frequency_group"][g]["auc"])
        for g in sorted(per_group):
            gain_rows.append({"variant": n, "base": base, "group": g, "auc_gain_pct": 100 * float(np.mean(per_group[g]))})
    gains = pd.DataFrame(gain_rows, columns=["variant", "base", "group", "auc_gain_pct"])
    domain_gain_table, uplift = domain_gains(get["metrics"], {n: get["summary"][n].get("compare_to") for n in names})
    for entry in variants:
        entry["uplifted_domains_ratio"] = uplift.get(entry["name"])
    by_grain = parameters_by_grain({n: get["summary"][n]["best_config"]["model"] for n in names}, spec)
    masks_fig = _masks_plot({n: get["folding"][n]["adasparse"] for n in names if "adasparse" in get["folding"][n]},
                            (spec.metadata or {}).get("domain_names") or [])
    plotted = report_params.get("frequency_plot_variants")
    frequency_fig = _frequency_plot(gains[gains["variant"].isin(plotted)] if plotted else gains)
    pca_fig = _pca_plot(get["projection"])

    summary = {
        "suite": plan["suite"],
        "suite_label": plan.get("label"),
        "protocol": plan.get("protocol", "default"),
        "dataset": params.get("dataset_label"),
        "test_rows": next(iter(get["metrics"].values()))["test_rows"] if names else 0,
        "alpha": alpha,
        "deployment": deployment,
        "variants": variants,
        "not_applicable": [{"name": n, "reason": r} for n, r in skipped.items()],
        "comparison": comparison.replace({np.nan: None}).to_dict("records"),
        "tables": tables.astype(object).where(tables.notna(), None).to_dict("records"),
        "parameters_by_grain": by_grain.astype(object).where(by_grain.notna(), None).to_dict("records"),
        "sweeps": report_params.get("sweeps") or [],
        "adasparse": {n: {k: v for k, v in get["folding"][n]["adasparse"].items() if k != "domains"}
                      for n in names if "adasparse" in get["folding"][n]},
    }
    study_fig = _hyperparameter_plot(get["trials"])
    sweep_fig = _sweep_plot(report_params.get("sweeps") or [], tables, {n: get["summary"][n]["best_config"] for n in names})
    spectrum_fig = _spectrum_plot({n: next(iter(get["trained"][n].values())) for n in names})
    domain_gain_fig = _domain_gain_plot(domain_gain_table)
    figures = {"frequency": frequency_fig, "pca": pca_fig, "study": study_fig, "spectrum": spectrum_fig, "sweep": sweep_fig,
               "domain_gain": domain_gain_fig, "masks": masks_fig}
    report_html = _html(summary, comparison, tables, efficiency, per_domain_mean, domain_stats, domain_gain_table, by_grain,
                        figures)
    return (summary, report_html, comparison, tables, efficiency, per_domain, gains, frequency_fig, pca_fig, study_fig,
            spectrum_fig, domain_gain_table, domain_gain_fig, masks_fig, sweep_fig)


def _numeric(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _hyperparameter_plot(trials: dict[str, pd.DataFrame]) -> plt.Figure:
    """Validation AUC of every finished trial against each numeric searched value, one
    panel per hyper-parameter, one colour per variant (DynInt §4.4, APG §4.5 style
    studies, from the Optuna trials)."""
    points: dict[str, list[tuple[str, float, float]]] = {}
    for variant, frame in trials.items():
        for params, value, state in zip(frame.get("params", []), frame.get("value", []), frame.get("state", [])):
            if state != "COMPLETE" or value is None or not math.isfinite(value):
                continue
            for name, raw in json.loads(params).items():
                x = _numeric(raw)
                if x is not None:
                    points.setdefault(name, []).append((variant, x, float(value)))
    names = sorted(points)
    cols = max(1, min(3, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    if not names:
        axes[0, 0].text(0.5, 0.5, "no finished trials with numeric parameters", ha="center", va="center")
    for ax, name in zip(axes.flat, names):
        ax.set_axis_on()
        for variant in dict.fromkeys(v for v, _, _ in points[name]):
            xs = [x for v, x, _ in points[name] if v == variant]
            ys = [y for v, _, y in points[name] if v == variant]
            ax.scatter(xs, ys, s=14, alpha=0.7, label=variant)
        if name.endswith(("lr", "rate", "weight_decay")) and min(x for _, x, _ in points[name]) > 0:
            ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("validation AUC", fontsize=8)
    if names:
        axes.flat[0].legend(fontsize=6)
    fig.suptitle("Hyper-parameter studies: validation AUC of every finished trial", y=1.0)
    return fig


def _spectrum_plot(models: dict[str, nn.Module]) -> plt.Figure:
    """Normalised singular values of each layer's static interaction kernel (DynInt
    Figure 4): a fast drop (an elbow) means the kernel is close to low rank."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for name, model in models.items():
        kernels = model.interaction_kernels() if hasattr(model, "interaction_kernels") else []
        for layer, kernel in enumerate(kernels):
            s = torch.linalg.svdvals(kernel.double()).numpy()
            ax.plot(np.arange(1, len(s) + 1), s / s[0], marker=".", label=f"{name} layer {layer + 1}")
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no interaction kernels in this suite", ha="center", va="center")
    else:
        ax.set_yscale("log")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("sigma_k / sigma_1")
        ax.legend(fontsize=6, ncol=2)
    ax.set_title("Spectrum of the PIN kernels, first seed (cf. DynInt Figure 4)")
    return fig


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="–", border=0, classes="t")


def _html(summary, comparison, tables, efficiency, per_domain, domain_stats, domain_gain_table, by_grain, figures) -> str:
    overview = pd.DataFrame([
        {k: v for k, v in entry.items() if k in ("name", "model_family", "backbone", "condition", "apg_version", "test_auc", "test_auc_std",
                                                   "test_logloss", "test_gauc_user", "test_gauc_domain", "uplifted_domains_ratio", "seeds",
                                                   "parameter_count")}
        | {"folding max abs diff": entry["folding_check"]["max_abs_diff"], "tuning budget": _budget_text(entry["budget"])}
        for entry in summary["variants"]
    ])
    skipped = pd.DataFrame(summary["not_applicable"], columns=["name", "reason"])
    pivot = per_domain.pivot_table(index=["domain", "name"], columns="variant", values="auc").reset_index() if len(per_domain) else per_domain
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table.t{border-collapse:collapse;font-size:12px;margin-bottom:1em}"
             "table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}"
             "img{max-width:100%}")
    dep = summary["deployment"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>dynamic-ctr report</title><style>{style}</style></head><body>",
        f"<h1>dynamic-ctr: {html.escape(str(summary['suite_label']))} ({html.escape(str(summary['dataset']))})</h1>",
        f"<p>Protocol <b>{html.escape(str(summary['protocol']))}</b>; {summary['test_rows']:,} test rows. "
        "Metrics are means over seeds (std where several). "
        f"Deployed: <b>{html.escape(dep['variant'])}</b> ({html.escape(dep['selected_by'])}).</p>",
        "<h2>Variants</h2>", _table(overview),
        "<h2>Not run here (not applicable on this data set, or in the full set only)</h2>"
        + (_table(skipped) if len(skipped) else "<p>None: every variant ran.</p>"),
        "<h2>Models on the same split (AUC, LogLoss)</h2>",
        ("<p>Test AUC and LogLoss: mean over seeds and its 95% t interval; the paper's own figures beside them "
         "(on the paper's data set, named in the title).</p>"),
        *(f"<h3>{html.escape(str(title))}</h3>" + _table(rows.drop(columns="table"))
          for title, rows in tables.groupby("table", sort=False)),
        "<h2>Paper delta vs our delta (AUC, % points)</h2>",
        "<p>Paper figures are the paper's own (for APG, the KDD version's, on ML-1M). Ours: the mean over seeds of the "
        "paired test-AUC difference to the base (each seed changes the initialisation and the batch order of both), "
        "its 95% t interval and the paired t-test p-value over seeds; then DeLong's test per seed (both models on the same "
        f"test rows). The verdict follows the paired t-test at alpha = {summary['alpha']}: one seed gives no verdict. "
        "<i>equal_budget</i> says whether the variant and its base had the same tuning budget on the shared search "
        "space (trials planned and finished, epochs, seeds).</p>",
        _table(comparison) if len(comparison) else "<p>No paper rows configured.</p>",
        "<h2>Gain per activity group</h2>", figure_html(figures["frequency"]),
        "<h2>Generated S_i (PCA)</h2>", figure_html(figures["pca"]),
        "<h2>Hyper-parameter studies (Optuna trials)</h2>", figure_html(figures["study"]),
        *(["<h2>Sweeps</h2>", figure_html(figures["sweep"])] if summary["sweeps"] else []),
        "<h2>Interaction kernel spectrum</h2>", figure_html(figures["spectrum"]),
        "<h2>Efficiency</h2><p>Latency: median CPU forward of one batch; hidden memory per batch, counted analytically.</p>",
        _table(efficiency),
        "<h2>Gain per domain-size bin</h2>",
        ("<p>Domains ranked by test rows into 5 bins of equal rows; each bin's test-AUC gain over the base, mean "
         "over seeds, row-weighted. The variants table gives each variant's uplifted-domains ratio (the share of "
         "domains whose AUC beats the base's).</p>"),
        figure_html(figures["domain_gain"]), _table(domain_gain_table),
        *(["<h2>AdaSparse: sparsity and learned masks</h2>",
            ("<p>Share of exactly-zero factors per layer on the test rows (first seed); with the pruner on the "
             "domain alone, each domain's pruned serving form was checked against the masked model, and both "
             "timed on the largest domain's rows.</p>"),
            _table(pd.DataFrame([{"variant": n, **{k: v for k, v in r.items() if k != "pruned_latency"},
                                  **{f"pruned_{k}": v for k, v in (r.get("pruned_latency") or {}).items()}}
                                 for n, r in summary["adasparse"].items()])),
            figure_html(figures["masks"])] if summary["adasparse"] else []),
        "<h2>Parameters at coarse and fine grain</h2>",
        ("<p>Each variant's parameter count with its domain parameters per domain (coarse: as trained) and per "
         "item (fine, APG Table 6), counted without allocating them.</p>"),
        _table(by_grain),
        "<h2>Test AUC per domain</h2>", _table(pivot),
        "<h2>Domains (samples, clicks, CTR per split)</h2>", _table(domain_stats),
        "</body></html>",
    ]
    return "\n".join(parts)
