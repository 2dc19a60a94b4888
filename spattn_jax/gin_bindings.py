"""Gin at the edge: the configurables ``train.py`` and ``eval.py`` bind, and nothing else imports gin.

Configurable names (what gin files write):

* ``model.preset`` and ``model.<field>`` for every :class:`~spattn_jax.config.ModelConfig` field: the
  preset's values with the bound fields replaced.
* ``data.<field>`` -- :class:`~spattn_jax.data.DataConfig`.
* ``optim.<field>`` -- :class:`~spattn_jax.optim.OptimConfig`.
* ``train.<field>`` -- :class:`~spattn_jax.train_loop.TrainConfig`.

Unknown names fail when the gin file is parsed, with gin's message naming the parameter.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import gin

from spattn_jax import data, optim, train_loop
from spattn_jax.config import ModelConfig, get_preset

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_UNSET = object()


def _model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """The preset ``preset`` with the bound fields replaced."""
    base = get_preset(preset)
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not _UNSET})


# An explicit keyword signature (rather than **overrides) lets gin reject misspelt fields at parse time.
_model_config.__signature__ = inspect.Signature(
    [inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, default="tiny")]
    + [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_UNSET)
        for f in dataclasses.fields(ModelConfig)
    ]
)

model_config = gin.external_configurable(_model_config, name="model")
data_config = gin.external_configurable(data.DataConfig, name="data")
optim_config = gin.external_configurable(optim.OptimConfig, name="optim")
train_config = gin.external_configurable(train_loop.TrainConfig, name="train")


def resolve_gin_file(path: str) -> str:
    """An absolute path for ``path``: as given (relative to the working directory), else under ``configs/``."""
    for candidate in (path, os.path.join(CONFIG_DIR, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f"gin file not found: {path} (looked in . and {CONFIG_DIR})")


def parse(gin_files: list[str], gin_params: list[str]) -> None:
    """Parse files then single bindings; ``include`` paths resolve under ``configs/`` first."""
    prefixes = gin.config._LOCATION_PREFIXES  # noqa: SLF001 -- gin has no public API to order them
    if CONFIG_DIR not in prefixes:
        # First, so that gin finds our includes without probing (and logging about) other places.
        prefixes.insert(0, CONFIG_DIR)
    files = [resolve_gin_file(p) for p in gin_files]
    gin.parse_config_files_and_bindings(files, gin_params, finalize_config=True)
