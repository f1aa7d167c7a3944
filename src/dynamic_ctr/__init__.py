"""dynamic-ctr: dynamic-parameter CTR models (APG, DynInt, AdaSparse) as Kedro pipelines.

Importing the package imports nothing heavy: ``models/`` and ``training/`` need torch
only, the pipelines need Kedro.
"""

__version__ = "0.1.0"
