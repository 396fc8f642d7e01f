"""What a stored config may make tlunet build: the allow-list of ``_target_`` names.

A checkpoint (its ``hyper_parameters.config``) and a run folder's ``config.yaml`` hold the
config a run was composed from, ``_target_`` nodes included: ``tlunet.evaluate``,
``tlunet.predict``, ``tlunet.export`` and ``tlunet.train resume=`` build the model and the data
from it with ``hydra.utils.instantiate``, which calls whatever a ``_target_`` names. So before
anything read from such a file is instantiated, :func:`check_targets` walks the whole config
(every node, unused keys, ``_args_`` lists and ``_partial_`` nodes included) and admits a
``_target_`` only when it names

- one of tlunet's functions that build something (:data:`TRUSTED_FUNCTIONS`), or
- a class of a kind a run is made of (:func:`trusted_kinds`: networks and losses
  (``torch.nn.Module``), optimisers, LR schedulers, albumentations transforms, Lightning
  callbacks, loggers, strategies, trainers, data and training modules) defined in tlunet or in a
  library tlunet builds from (:data:`TRUSTED_PACKAGES`: torch.nn, torch.optim, smp, timm,
  albumentations, Lightning); a module outside these packages is never imported to find out,
- or a name the user trusts (:func:`user_trusted`: the ``TLUNET_TRUSTED_TARGETS`` environment
  variable, or the ``tlunet.trusted_targets`` entry points of an installed package).

Anything else (``builtins.open``, ``os.system``, ``subprocess.run``, ``importlib.import_module``,
one of tlunet's file writers, a misspelled class) is a :class:`UntrustedTarget`: one line naming
the file, the key and the target, raised before anything is called.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tlunet.errors import ConfigError

#: tlunet's functions that build a part of a run (conf/: ``model.net``, ``logger.mlflow``...).
TRUSTED_FUNCTIONS = frozenset(
    {
        "tlunet.models.build_model",
        "tlunet.tracking.mlflow_logger",
        "tlunet.tracking.wandb_logger",
    }
)
#: Packages whose classes of a trusted kind (:func:`trusted_kinds`) a stored config may name.
TRUSTED_PACKAGES = (
    "tlunet",
    "torch.nn",
    "torch.optim",
    "segmentation_models_pytorch",
    "timm",
    "albumentations",
    "pytorch_lightning",
)
#: Comma-separated names (``mylab.nets.MyUNet``) or package prefixes ending in a dot
#: (``mylab.``) the user trusts as well.
ENV_VAR = "TLUNET_TRUSTED_TARGETS"
#: Entry-point group through which an installed package declares its names trusted
#: (each entry's value: a name or a prefix ending in a dot, as in :data:`ENV_VAR`).
ENTRY_POINT_GROUP = "tlunet.trusted_targets"


class UntrustedTarget(ConfigError):
    """A stored config names a ``_target_`` that is not on the allow-list."""


@cache
def trusted_kinds() -> tuple[type, ...]:
    """The base classes of what a run is made of: a class of a :data:`TRUSTED_PACKAGES`
    package is admitted when it derives from one of them."""
    import albumentations as A
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import Logger
    from pytorch_lightning.strategies import Strategy

    return (
        torch.nn.Module,
        torch.optim.Optimizer,
        torch.optim.lr_scheduler.LRScheduler,
        torch.optim.lr_scheduler.ReduceLROnPlateau,
        A.BasicTransform,
        A.BaseCompose,
        pl.Callback,
        Logger,
        Strategy,
        pl.Trainer,
        pl.LightningDataModule,
        pl.LightningModule,
    )


@cache
def _entry_point_names() -> tuple[str, ...]:
    try:
        return tuple(ep.value.strip() for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # a broken distribution's metadata must not stop every command
        return ()


def user_trusted() -> tuple[str, ...]:
    """The names and prefixes the user trusts: :data:`ENV_VAR`, then the values of the
    :data:`ENTRY_POINT_GROUP` entry points of installed packages."""
    names = [n.strip() for n in os.environ.get(ENV_VAR, "").split(",")]
    return tuple(n for n in (*names, *_entry_point_names()) if n)


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def is_trusted(name: str) -> bool:
    """Whether ``_target_: name`` may be instantiated from a stored config (see the module
    docstring). Imports a module only when ``name`` lies in a trusted package."""
    for trusted in user_trusted():
        if name == trusted or (trusted.endswith(".") and name.startswith(trusted)):
            return True
    if name in TRUSTED_FUNCTIONS:
        return True
    if not any(_in_package(name, p) for p in TRUSTED_PACKAGES):
        return False
    from hydra.utils import get_object

    try:
        found = get_object(name)
    except Exception:  # no such name (a typo, a library version without it)
        return False
    return isinstance(found, type) and issubclass(found, trusted_kinds())


def _walk(node: Any, key: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, _target_ value)`` of every node of ``node`` that has a ``_target_``."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield key or "<top level>", node["_target_"]
        for k, value in node.items():
            yield from _walk(value, f"{key}.{k}" if key else str(k))
    elif isinstance(node, Sequence) and not isinstance(node, str | bytes):
        for i, value in enumerate(node):
            yield from _walk(value, f"{key}[{i}]")


def check_targets(config: Any, source: str | Path) -> None:
    """Raise :class:`UntrustedTarget` naming ``source``, the key and the target when any node
    of ``config`` (a dict/list, or an OmegaConf config, read without resolving it) names a
    ``_target_`` that :func:`is_trusted` does not admit. Nothing of ``config`` is called."""
    if isinstance(config, DictConfig | ListConfig):
        config = OmegaConf.to_container(config, resolve=False)
    for key, target in _walk(config, ""):
        if not isinstance(target, str) or not is_trusted(target):
            raise UntrustedTarget(
                f"'{source}' asks to build _target_: {target!r} (key {key}), which tlunet does "
                "not build from a stored file: it is not one of tlunet's models, losses, "
                "optimisers, schedulers, transforms, callbacks or loggers. Nothing was run. If "
                f"it is your own class, trust it with {ENV_VAR}={target} "
                "(docs/reliability.md)."
            )
