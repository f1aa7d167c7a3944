"""Project settings: the config loader, and the hook that locks the retraining champion."""

from kedro.config import OmegaConfigLoader
from omegaconf.resolvers import oc

from dynamic_ctr.hooks import ChampionLock

HOOKS = (ChampionLock(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # `${oc.env:DYNAMIC_CTR_DATA_ROOT,data/external}` locates the data sets that may not be
    # shipped (MovieLens-100K, Criteo, Avazu); see conf/README.md.
    "custom_resolvers": {"oc.env": oc.env},
    # An environment overrides single nested parameters (e.g. training.study.n_trials)
    # instead of replacing a whole top-level key.
    "merge_strategy": {"parameters": "soft"},
}
