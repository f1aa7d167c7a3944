"""The variant list: the keys of ``variants`` in ``conf/base/parameters_variants.yml``.

Kedro builds pipelines before it resolves an environment's parameters, so the *names*
of the variants come from the base configuration file; an environment may change any
variant's settings (parameters merge softly) but not add or remove variants.
"""

from __future__ import annotations

from pathlib import Path

import yaml

VARIANTS_FILE = Path("conf") / "base" / "parameters_variants.yml"


def variant_names(project_path: Path | None = None) -> list[str]:
    """Variant names, in file order, from the project at ``project_path`` (default: cwd,
    else the source checkout this package sits in)."""
    candidates = [project_path] if project_path else [Path.cwd(), Path(__file__).resolve().parents[3]]
    for root in candidates:
        path = root / VARIANTS_FILE
        if path.is_file():
            variants = (yaml.safe_load(path.read_text()) or {}).get("variants") or {}
            if not variants:
                raise ValueError(f"{path}: 'variants' is empty; define at least one model variant")
            return list(variants)
    raise FileNotFoundError(f"{VARIANTS_FILE} not found under {[str(c) for c in candidates]}")


def namespaced(name: str, dataset: str) -> str:
    return f"{name}.{dataset}"
