"""What a stored config may make tlunet build: the allow-list of ``_target_`` names.

A checkpoint (its ``hyper_parameters.config``) and a run folder's ``config.yaml`` hold the
config a run was composed from, ``_target_`` nodes included: ``tlunet.evaluate``,
``tlunet.predict``, ``tlunet.export`` and ``tlunet.train resume=`` build the model and the data
from it with ``hydra.utils.instantiate``, which calls whatever a ``_target_`` names. So before
anything read from such a file is instantiated, :func:`check_stored_config` walks the whole
config (every node, unused keys, ``_args_`` lists and ``_partial_`` nodes included):

- it refuses an interpolation (``${...}``): tlunet stores its configs resolved, and a resolver
  such as ``oc.create`` would make a node the walk never saw;
- it admits a ``_target_`` only where a run config builds that kind of thing (:data:`PLACES`,
  by the top-level key the node sits under): networks, losses, optimisers and schedulers
  (``torch.nn.Module``, ``torch.optim``; and ``tlunet.models.build_model``) under ``module``,
  ``model``, ``loss``, ``optimizer``, ``scheduler``; the data module and albumentations
  transforms under ``data``; Lightning callbacks under ``callbacks``; loggers (and
  ``tlunet.tracking``'s builders) under ``logger``; the Trainer and its strategy under
  ``trainer``. A class is admitted when it is defined in tlunet or in a library tlunet builds
  from (:data:`TRUSTED_PACKAGES`: torch.nn, torch.optim, smp, timm, albumentations, Lightning)
  and derives from the kinds of its place; a module outside these packages is never imported
  to find out;
- or a name the user trusts (:func:`user_trusted`: the ``TLUNET_TRUSTED_TARGETS`` environment
  variable, or the ``tlunet.trusted_targets`` entry points of an installed package), anywhere.

Anything else (``builtins.open``, ``os.system``, ``subprocess.run``, ``importlib.import_module``,
one of tlunet's file writers, a logger under ``module``, a misspelled class) is an
:class:`UntrustedTarget`: one line naming the file, the key and the target, raised before
anything is called. :func:`check_checkpoint` applies this to a checkpoint's stored config and
refuses a ``_target_`` anywhere else in the file; :func:`check_write_paths` keeps the folders
a resumed run's callbacks, loggers, Trainer and cache write to where tlunet's own config puts
them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tlunet.errors import ConfigError

#: Packages whose classes (of the kinds their place admits) a stored config may name.
TRUSTED_PACKAGES = (
    "tlunet",
    "torch.nn",
    "torch.optim",
    "segmentation_models_pytorch",
    "timm",
    "albumentations",
    "pytorch_lightning",
)
#: Where a run config builds what: top-level key -> the kind of thing built under it.
PLACES = {
    "module": "network",
    "model": "network",
    "loss": "network",
    "optimizer": "network",
    "scheduler": "network",
    "data": "data",
    "callbacks": "callback",
    "logger": "logger",
    "trainer": "trainer",
}
#: tlunet's functions that build a part of a run, by the kind they build.
TRUSTED_FUNCTIONS = {
    "network": frozenset({"tlunet.models.build_model"}),
    "logger": frozenset({"tlunet.tracking.mlflow_logger", "tlunet.tracking.wandb_logger"}),
}
#: Comma-separated names (``mylab.nets.MyUNet``) or package prefixes ending in a dot
#: (``mylab.``) the user trusts as well.
ENV_VAR = "TLUNET_TRUSTED_TARGETS"
#: Entry-point group through which an installed package declares its names trusted
#: (each entry's value: a name or a prefix ending in a dot, as in :data:`ENV_VAR`).
ENTRY_POINT_GROUP = "tlunet.trusted_targets"


class UntrustedTarget(ConfigError):
    """A stored config names a ``_target_`` that is not on the allow-list."""


@cache
def trusted_kinds() -> dict[str, tuple[type, ...]]:
    """The base classes a class must derive from to be built at each kind of place of
    :data:`PLACES`."""
    import albumentations as A
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import Logger
    from pytorch_lightning.strategies import Strategy

    schedulers = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return {
        "network": (torch.nn.Module, torch.optim.Optimizer, *schedulers, pl.LightningModule),
        "data": (pl.LightningDataModule, A.BasicTransform, A.BaseCompose),
        "callback": (pl.Callback,),
        "logger": (Logger,),
        "trainer": (pl.Trainer, Strategy),
    }


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


def _in_trusted_package(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in TRUSTED_PACKAGES)


def is_trusted(name: str, place: str) -> bool:
    """Whether ``_target_: name`` may be instantiated from a stored config under the top-level
    key ``place`` (see the module docstring). Imports a module only when ``name`` lies in a
    trusted package."""
    for trusted in user_trusted():
        if name == trusted or (trusted.endswith(".") and name.startswith(trusted)):
            return True
    kind = PLACES.get(place)
    if kind is None:
        return False
    if name in TRUSTED_FUNCTIONS.get(kind, ()):
        return True
    if not _in_trusted_package(name):
        return False
    from hydra.utils import get_object

    try:
        found = get_object(name)
    except Exception:  # no such name (a typo, a library version without it)
        return False
    # Defined in a trusted package (not reached through one: torch.nn.modules.module.torch.fx...)
    return (
        isinstance(found, type)
        and _in_trusted_package(found.__module__)
        and issubclass(found, trusted_kinds()[kind])
    )


def _walk(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf and ``_target_`` of ``node`` (dicts and lists)."""
    if isinstance(node, Mapping):
        for k, value in node.items():
            yield from _walk(value, f"{key}.{k}" if key else str(k))
    elif isinstance(node, Sequence) and not isinstance(node, str | bytes):
        for i, value in enumerate(node):
            yield from _walk(value, f"{key}[{i}]")
    else:
        yield key, node


def _container(config: Any) -> Any:
    if isinstance(config, DictConfig | ListConfig):
        return OmegaConf.to_container(config, resolve=False)
    return config


def _refuse(source: str | Path, key: str, target: Any, where: str) -> UntrustedTarget:
    return UntrustedTarget(
        f"'{source}' asks to build _target_: {target!r} (key {key}), which tlunet does not "
        f"build from a stored file{where}. Nothing was run. If it is your own class, trust it "
        f"with {ENV_VAR}={target} (docs/reliability.md)."
    )


def check_targets(config: Any, source: str | Path) -> None:
    """Raise :class:`UntrustedTarget` naming ``source``, the key and the target when any node
    of the run config ``config`` (a dict, or an OmegaConf config, read without resolving it)
    names a ``_target_`` that :func:`is_trusted` does not admit where it sits. Nothing of
    ``config`` is called."""
    for key, value in _walk(_container(config)):
        if not (key == "_target_" or key.endswith("._target_")):
            continue
        place = key.split(".", 1)[0].split("[", 1)[0]
        node = key[: -len("._target_")] or "<top level>"
        if not isinstance(value, str) or not is_trusted(value, place):
            kind = PLACES.get(place)
            where = (
                f": under '{place}' it builds {kind}s of tlunet and the libraries it uses"
                if kind
                else f": it builds nothing under '{place}'"
            )
            raise _refuse(source, node, value, where)


def check_stored_config(config: Any, source: str | Path) -> None:
    """:func:`check_targets` for a config read from a file, which tlunet always stores
    resolved: an interpolation (``${...}``, which a resolver such as ``oc.create`` could turn
    into a node the check never saw) is refused too, naming the key."""
    config = _container(config)
    for key, value in _walk(config):
        if isinstance(value, str) and "${" in value:
            raise UntrustedTarget(
                f"'{source}' holds an interpolation at key {key} ({value[:80]!r}), which tlunet "
                "never stores (its configs are saved resolved): nothing was run."
            )
    check_targets(config, source)


def check_checkpoint(checkpoint: Mapping[str, Any], source: str | Path) -> None:
    """:func:`check_stored_config` on a checkpoint's ``hyper_parameters.config``, and no
    ``_target_`` anywhere else in the file (nothing else of it is ever built)."""
    rest = {k: v for k, v in checkpoint.items() if k not in ("hyper_parameters", "state_dict")}
    rest["hyper_parameters"] = {
        k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k != "config"
    }
    for key, value in _walk(rest):
        if key.endswith("._target_") or key == "_target_":
            raise _refuse(source, key[: -len("._target_")], value, " (outside its run config)")
    check_stored_config(checkpoint["hyper_parameters"]["config"], source)


#: Argument names by which a callback, logger or Trainer is told where to write.
_WRITE_KEYS = ("dirpath", "save_dir", "path", "default_root_dir", "log_dir", "run_dir", "root_dir")


def _local_path(value: str) -> Path | None:
    """The local file-system path a string names (``/...``, ``~...``, a relative path, taken
    from the working directory, ``file:`` and ``sqlite:`` URIs), or None (an empty string, a
    remote URI such as ``http://host``)."""
    for scheme in ("sqlite:///", "file://"):
        if value.startswith(scheme):
            return Path("/" + value[len(scheme) :].lstrip("/"))
    if not value.strip() or "://" in value:
        return None
    return Path(value).expanduser()


def check_write_paths(
    config: Any, source: str | Path, roots: Iterable[Path], cache_root: Path
) -> None:
    """Refuse a resumed run's config whose callbacks, loggers or Trainer would write outside
    ``roots`` (the run folder, this machine's outputs folder), or whose cache folders
    (``data.cache_dir``, ``data.synthetic_cache``) lie outside ``cache_root`` (this machine's
    cache): one line naming the key and the folder."""
    config = _container(config)
    roots = [Path(r).resolve() for r in roots]
    checks: list[tuple[str, Any, list[Path]]] = []
    for place in ("callbacks", "logger", "trainer"):
        for key, value in _walk(config.get(place) or {}, place):
            name = key.rsplit(".", 1)[-1]
            if name in _WRITE_KEYS or name == "tracking_uri":
                checks.append((key, value, roots))
    data = config.get("data") or {}
    for name in ("cache_dir", "synthetic_cache"):
        checks.append((f"data.{name}", data.get(name), [Path(cache_root).resolve()]))
    for key, value, allowed in checks:
        path = _local_path(value) if isinstance(value, str) else None
        if path is None:
            continue
        path = path.resolve()
        if not any(path == r or path.is_relative_to(r) for r in allowed):
            raise ConfigError(
                f"'{source}' has {key}={value}, which lies outside "
                + " and ".join(f"'{r}'" for r in allowed)
                + ": a resumed run writes only into its folder, this machine's outputs and its "
                "cache. Resume it where it was made (same working directory and "
                "TLUNET_OUTPUT_DIR/TLUNET_CACHE_DIR), or start a new run."
            )
