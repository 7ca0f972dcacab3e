"""Registries of components (encoders, losses, miners, datasets, optimizers).

Modelled on timm's ``register_model``/``create_model``/``list_models``: a component is
registered where it is defined, built from keyword arguments by name, and listed with
wildcard patterns. Third-party packages (and metriclab's own ``plugins/``) extend the
registries through the Python entry-point group ``metriclab.plugins``: each entry point
names a module whose import registers its components with the decorators below::

    # pyproject.toml of a plugin package
    [project.entry-points."metriclab.plugins"]
    my_plugin = "my_package.metriclab_plugin"

    # my_package/metriclab_plugin.py
    from metriclab.registry import register_loss

    @register_loss("my-loss")
    class MyLoss(torch.nn.Module): ...

Only installed entry points and modules or files the user names explicitly are imported.
"""

from __future__ import annotations

import contextvars
import difflib
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metriclab.errors import MetricLabError

ENTRY_POINT_GROUP = "metriclab.plugins"

# The package whose plugin module is being imported, so registrations know their origin.
_current_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("source", default=None)
_plugins_loaded = False


@dataclass(frozen=True)
class Entry:
    """One registered component: its name, the callable that builds it, and its origin."""

    name: str
    kind: str
    factory: Callable[..., Any]
    source: str


class Registry:
    """Name -> factory for one kind of component, filled by decorators and entry points."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str | None = None, factory: Callable | None = None, *, overwrite: bool = False):
        """Register ``factory`` under ``name``; usable as ``@registry.register("name")``."""

        def add(obj: Callable) -> Callable:
            key = name or obj.__name__
            if key in self._entries and not overwrite and self._entries[key].factory is not obj:
                raise MetricLabError(
                    f"{self.kind} '{key}' is already registered by {self._entries[key].source}; "
                    "choose another name or pass overwrite=True"
                )
            source = _current_source.get() or _top_package(obj)
            self._entries[key] = Entry(key, self.kind, obj, source)
            return obj

        return add(factory) if factory is not None else add

    def get(self, name: str) -> Callable[..., Any]:
        """Return the factory registered as ``name`` or raise a did-you-mean error."""
        load_plugins()
        if name in self._entries:
            return self._entries[name].factory
        names = sorted(self._entries)
        lowered = {n.lower(): n for n in names}
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        if name.lower() in lowered and lowered[name.lower()] not in close:
            close.insert(0, lowered[name.lower()])
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise MetricLabError(
            f"unknown {self.kind} '{name}'.{hint} "
            f"Run `metriclab plugins {_plural(self.kind)}` to list all {len(names)} registered {_plural(self.kind)}."
        )

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build the component ``name`` from keyword arguments, with readable argument errors."""
        factory = self.get(name)
        _check_arguments(self.kind, name, factory, kwargs)
        try:
            return factory(**kwargs)
        except (TypeError, ValueError) as err:
            unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
            if unknown and unknown.group(1) in kwargs:  # hidden behind **kwargs: name the accepted ones
                _raise_unknown(self.kind, name, unknown.group(1), _accepted_names(factory))
            # Only the user's plain values: engine-supplied objects (parameters, tensors) are noise here.
            shown = {k: v for k, v in kwargs.items() if _plain(v)}
            raise MetricLabError(
                f"{self.kind} '{name}' rejected its arguments {shown}: {err}; check each value's type "
                "(numbers unquoted, lists as [1,2], true/false)"
            ) from err

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard pattern (``'pml.*Loss'``)."""
        load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def entries(self, pattern: str = "*") -> list[Entry]:
        """Sorted entries matching ``pattern``, with the package each came from."""
        return [self._entries[n] for n in self.list(pattern)]

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries


def _plural(kind: str) -> str:
    return "losses" if kind == "loss" else f"{kind}s"


def _top_package(obj: Callable) -> str:
    """The distribution that provides ``obj``'s module (its top-level package name if none)."""
    top = (getattr(obj, "__module__", None) or "?").split(".")[0]
    return importlib.metadata.packages_distributions().get(top, [top])[0]


def _raise_unknown(kind: str, name: str, key: str, accepted: list[str]) -> None:
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise MetricLabError(
        f"{kind} '{name}' has no argument '{key}'.{hint} Accepted arguments: {', '.join(accepted) or 'none'}."
    )


def _accepted_names(factory: Callable) -> list[str]:
    """Keyword names ``factory`` accepts, following ``**kwargs`` up a class's ``__init__`` chain."""
    names: list[str] = []
    chain = [c.__init__ for c in inspect.getmro(factory) if "__init__" in vars(c)] if inspect.isclass(factory) else []
    for function in chain or [factory]:
        try:
            params = inspect.signature(function).parameters
        except (TypeError, ValueError):
            break
        names += [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return list(dict.fromkeys(names))


def _check_arguments(kind: str, name: str, factory: Callable, kwargs: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature
        return
    params = signature.parameters
    for key, value in kwargs.items():
        if key in params and not _fits_default(value, params[key].default):
            default = params[key].default
            raise MetricLabError(
                f"{kind} '{name}': argument '{key}' must be {_KINDS[type(default)]} like its default, got {value!r}; "
                f"pass e.g. {key}={json.dumps(default)}"
            )
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in accepted:
            _raise_unknown(kind, name, key, accepted)


# What a default value says about the values an argument takes; None and other defaults say nothing.
_KINDS = {
    bool: "true or false",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    tuple: "a list",
    dict: "a dict",
}


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain JSON-like data (what a user passes), not an object such as a tensor list."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, dict) and all(_plain(v) for v in value.values())


def _fits_default(value: Any, default: Any) -> bool:
    """Whether ``value`` has the kind of ``default`` (numbers mix, lists and tuples mix, None always fits)."""
    if value is None or type(default) not in _KINDS:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


encoders = Registry("encoder")
losses = Registry("loss")
miners = Registry("miner")
datasets = Registry("dataset")
optimizers = Registry("optimizer")
REGISTRIES: dict[str, Registry] = {
    "encoder": encoders,
    "loss": losses,
    "miner": miners,
    "dataset": datasets,
    "optimizer": optimizers,
}

register_encoder = encoders.register
register_loss = losses.register
register_miner = miners.register
register_dataset = datasets.register
register_optimizer = optimizers.register


def registry(kind: str) -> Registry:
    """The registry for ``kind`` (singular or plural: 'loss' or 'losses')."""
    key = {_plural(k): k for k in REGISTRIES}.get(kind, kind)
    if key not in REGISTRIES:
        raise MetricLabError(f"unknown component kind '{kind}'; choose one of {', '.join(REGISTRIES)}")
    return REGISTRIES[key]


def create(kind: str, name: str, **kwargs: Any) -> Any:
    """Build a registered component: ``create('loss', 'triplet', margin=0.2)``."""
    return registry(kind).create(name, **kwargs)


def list_components(kind: str, pattern: str = "*") -> list[str]:
    """Registered names of ``kind`` that match ``pattern``."""
    return registry(kind).list(pattern)


def load_plugins() -> None:
    """Import every installed ``metriclab.plugins`` entry point once.

    A plugin that fails to import is reported as a warning naming it, so one broken
    third-party package does not take the others down.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = ep.dist.name if ep.dist is not None else ep.value.split(":")[0]
        token = _current_source.set(source)
        try:
            ep.load()
        except Exception as err:  # noqa: BLE001 - a third-party plugin may fail in any way
            warnings.warn(f"metriclab plugin '{ep.name}' from {source} failed to load: {err!r}", stacklevel=2)
        finally:
            _current_source.reset(token)


def load_plugin(spec: str) -> None:
    """Import a plugin the user names explicitly: a module name or a path to a ``.py`` file."""
    load_plugins()
    token = _current_source.set(spec)
    try:
        if spec.endswith(".py") or Path(spec).is_file():
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise MetricLabError(f"plugin file {spec} does not exist; pass the path to a .py file")
            module_name = f"metriclab_user_plugin_{path.stem}"
            loaded = sys.modules.get(module_name)
            if loaded is not None and getattr(loaded, "__file__", None) == str(path):
                return  # already imported (a second train() in one process): registering again would clash
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(spec)
            except ModuleNotFoundError as err:
                raise MetricLabError(
                    f"plugin module '{spec}' cannot be imported ({err}); install it or pass a path to a .py file"
                ) from err
    finally:
        _current_source.reset(token)
