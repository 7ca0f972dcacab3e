"""Registries of components (encoders, losses, miners, datasets, optimizers, samplers, transforms, schedulers).

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

Entry points are imported when a registry is first looked up. One named after a kind (``encoders``,
``losses``, ``datasets.images``: the kind's plural, alone or before a dot) is imported only when that kind is
looked up, so rebuilding a trained encoder does not import the losses' libraries; the built-ins are
registered this way, one entry point per module. Only installed entry points and modules or files the user
names explicitly are imported.
"""

from __future__ import annotations

import contextvars
import fnmatch
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import itertools
import json
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from metriclab.errors import MetricLabError, did_you_mean

ENTRY_POINT_GROUP = "metriclab.plugins"
BUILTIN_PACKAGE = "metriclab_plugins"  # metriclab's own components: they keep their names whatever the load order

# The package whose plugin module is being imported, so registrations know their origin.
_current_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("source", default=None)
_entry_points: list[_EntryPoint] | None = None  # the group's entry points, read once per process
_imported: set[tuple[str, str]] = set()  # (package, name) of the entry points imported so far
# True while installed entry points are imported: a name clash between packages is then recorded, not raised.
_loading_entry_points: contextvars.ContextVar[bool] = contextvars.ContextVar("loading", default=False)


@dataclass(frozen=True)
class Entry:
    """One registered component: its name, the callable that builds it, and its origin."""

    name: str
    kind: str
    factory: Callable[..., Any]
    source: str

    @property
    def description(self) -> str:
        """The first paragraph of the factory's own docstring ('' without one; a base class's is not its own)."""
        factory = self.factory.func if isinstance(self.factory, functools.partial) else self.factory
        lines = inspect.cleandoc(factory.__doc__ or "").split("\n\n")[0].splitlines()
        sections = ("Args:", "Arguments:", "Parameters", "Returns")  # Google/NumPy sections are not the summary
        summary = itertools.takewhile(lambda line: not line.strip().startswith(sections), lines)
        return " ".join(" ".join(summary).split())

    @property
    def arguments(self) -> dict[str, Any]:
        """The options a recipe can give it, with their defaults (None for required ones, repr for objects)."""
        found = keyword_parameters(self.factory, follow_kwargs=True)
        if found is None:
            return {}
        return {
            name: None if default is _NO_DEFAULT else default if _plain(default) else repr(default)
            for name, default in found[0].items()
            if name not in SUPPLIED.get(self.kind, ())
        }


@dataclass(frozen=True)
class Family:
    """Components named ``prefix:member`` (``timm:convnext_tiny``), built by one factory ``(member, **kwargs)``.

    ``members()`` lists the names a library knows (``timm.list_models``); a member may carry a tag after
    a dot (``timm:vit_small_patch16_224.augreg_in21k``), which only the factory interprets.
    """

    prefix: str
    kind: str
    factory: Callable[..., Any]
    members: Callable[[], list[str]]
    source: str

    def entry(self, member: str) -> Entry:
        """The entry of one member: the family's factory with the member's name bound."""
        return Entry(f"{self.prefix}:{member}", self.kind, functools.partial(self.factory, member), self.source)


class Registry:
    """Name -> factory for one kind of component, filled by decorators and entry points.

    Besides single names it holds families (:class:`Family`): ``prefix:member`` names resolved by a
    library's own model list, so thousands of models are one registration and not a thousand rows.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self.families: dict[str, Family] = {}
        # name -> the packages that registered it; the name is kept by the built-in or refused (see get).
        self._clashes: dict[str, list[str]] = {}

    def register_family(self, prefix: str, members: Callable[[], list[str]]):
        """Register a decorated ``factory(member, **kwargs)`` for every ``prefix:member`` name ``members()`` lists."""

        def add(factory: Callable) -> Callable:
            source = _current_source.get() or _top_package(factory)
            self.families[prefix] = Family(prefix, self.kind, factory, members, source)
            return factory

        return add

    def _family_entry(self, name: str) -> Entry | None:
        """The entry of ``prefix:member`` if ``prefix`` is a family; a did-you-mean error for an unknown member."""
        prefix, _, member = name.partition(":")
        family = self.families.get(prefix) if member else None
        if family is None:
            return None
        known = family.members()
        if member.split(".")[0] not in known:
            raise MetricLabError(
                f"unknown {self.kind} '{name}': {family.source} has no model '{member}'."
                f"{did_you_mean(member, known, n=3)} Run `metriclab plugins '{prefix}:*{member[:3]}*'` to list "
                "matching names."
            )
        return family.entry(member)

    def register(self, name: str | None = None, factory: Callable | None = None, *, overwrite: bool = False):
        """Register ``factory`` under ``name``; usable as ``@registry.register("name")``."""

        def add(obj: Callable) -> Callable:
            key = name or obj.__name__
            source = _current_source.get() or _top_package(obj)
            held = self._entries.get(key)
            if _loading_entry_points.get() and (key in self._clashes or held is not None and held.source != source):
                # Two installed packages: record it and go on, so every other component of both still loads
                # (load_plugins settles it). The built-in keeps its name, whichever entry point was imported first.
                self._clashes.setdefault(key, [held.source] if held is not None else []).append(source)
                if source in _builtin_sources():
                    self._entries[key] = Entry(key, self.kind, obj, source)
                return obj
            if held is not None and not overwrite and held.factory is not obj:
                raise MetricLabError(
                    f"{self.kind} '{key}' is already registered by {held.source}; "
                    "choose another name or pass overwrite=True"
                )
            self._entries[key] = Entry(key, self.kind, obj, source)
            return obj

        return add(factory) if factory is not None else add

    def get(self, name: str) -> Callable[..., Any]:
        """Return the factory registered as ``name`` or raise a did-you-mean error."""
        entry = self._find(name)
        if entry is not None:
            return entry.factory
        names = sorted(self._entries)
        hint = did_you_mean(name, names, n=3)
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
                _raise_unknown(
                    self.kind, name, unknown.group(1), list((keyword_parameters(factory, True) or ({}, False))[0])
                )
            # Only the user's plain values: engine-supplied objects (parameters, tensors) are noise here.
            shown = {k: v for k, v in kwargs.items() if _plain(v)}
            if shown and not _raised_in(err, factory):
                # Raised by the code the factory handed the values to (torch checking weight_decay, ...).
                raise MetricLabError(
                    f"{self.kind} '{name}' rejected its arguments {shown}: {err}; check each value's type "
                    "(numbers unquoted, lists as [1,2], true/false)"
                ) from err
            # Raised by the factory's own code: its real cause, not a guess about the user's values.
            raise MetricLabError(
                f"{self.kind} '{name}' from {self.source(name)} failed while being built: "
                f"{type(err).__name__}: {err}. If its arguments {shown} are right, this is an error in that "
                "package's code; --debug shows where"
            ) from err

    def _find(self, name: str) -> Entry | None:
        """The entry of ``name`` (this kind's entry points imported first; every one if it is not found there),
        None if no package registers it; a MetricLabError if two do."""
        for kind in (self.kind, None):
            load_plugins(kind)
            if name in self._entries:
                return self._entries[name]
            if name in self._clashes:
                raise MetricLabError(self.clash_message(name))
            member = self._family_entry(name)
            if member is not None:
                return member
        return None

    def source(self, name: str) -> str:
        """The package that registered ``name`` (MetricLabError if none did)."""
        self.get(name)
        return self._find(name).source

    def clash_message(self, name: str) -> str:
        """What a user reads about ``name`` being registered by more than one installed package."""
        builtin = _builtin_sources()
        sources = sorted(set(self._clashes[name]), key=lambda s: (s not in builtin, s))  # not the import order
        both = " and ".join(sources)
        if name in self._entries:
            kept = self._entries[name].source
            others = ", ".join(s for s in sources if s != kept)
            return (
                f"{self.kind} '{name}' is registered by both {both}; the built-in one from {kept} is used and "
                f"{others}'s is ignored (its other components work); rename it in {others} to use it"
            )
        return (
            f"{self.kind} '{name}' is registered by both {both}, so the name is ambiguous and neither is used "
            f"(their other components work); uninstall one of them (pip uninstall ...) or rename it in one"
        )

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard pattern (``'pml.*Loss'``)."""
        return [e.name for e in self.entries(pattern)]

    def entries(self, pattern: str = "*") -> list[Entry]:
        """Sorted entries matching ``pattern``, with the package each came from.

        A family's members are listed only by a pattern that names the family (``'timm:*resnet*'``).
        """
        load_plugins()
        found = [self._entries[n] for n in sorted(self._entries) if fnmatch.fnmatchcase(n, pattern)]
        prefix, colon, rest = pattern.partition(":")
        if colon and prefix in self.families:
            family = self.families[prefix]
            if not any(c in rest for c in "*?["):  # one member, perhaps with a tag ('resnet18.a1_in1k')
                return [family.entry(rest)] if rest.split(".")[0] in family.members() else []
            found += [family.entry(m) for m in sorted(family.members()) if fnmatch.fnmatchcase(m, rest)]
        return found

    def __contains__(self, name: str) -> bool:
        try:
            return self._find(name) is not None
        except MetricLabError:
            return False


def _raised_in(err: BaseException, factory: Callable) -> bool:
    """Whether ``err`` was raised by code in the file that defines ``factory`` (not in a library it called)."""
    target = getattr(factory, "__init__", factory) if inspect.isclass(factory) else factory
    try:
        home = inspect.getsourcefile(inspect.unwrap(target)) or inspect.getsourcefile(factory)
    except TypeError:  # a builtin or C extension
        return False
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and home is not None and Path(frame.tb_frame.f_code.co_filename) == Path(home)


def _plural(kind: str) -> str:
    return "losses" if kind == "loss" else f"{kind}s"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    # Reads every installed distribution's file list (~0.2 s in an environment with torch): once per process,
    # not once per component a module registers.
    return importlib.metadata.packages_distributions()


def _top_package(obj: Callable) -> str:
    """The distribution that provides ``obj``'s module (its top-level package name if none)."""
    top = (getattr(obj, "__module__", None) or "?").split(".")[0]
    return _distributions().get(top, [top])[0]


def _raise_unknown(kind: str, name: str, key: str, accepted: list[str]) -> None:
    raise MetricLabError(
        f"{kind} '{name}' has no argument '{key}'.{did_you_mean(key, accepted)} "
        f"Accepted arguments: {', '.join(accepted) or 'none'}."
    )


_NO_DEFAULT = inspect.Parameter.empty


def keyword_parameters(factory: Callable, follow_kwargs: bool = False) -> tuple[dict[str, Any], bool] | None:
    """``({name: default or inspect.Parameter.empty}, takes **kwargs)`` of ``factory``; None without a signature.

    With ``follow_kwargs``, a class's ``*args``/``**kwargs`` are followed up its ``__init__`` chain (pml's losses
    pass theirs to their base classes: CosFaceLoss's ``num_classes`` is ArcFaceLoss's), so the names cover
    everything the class accepts.
    """
    chain = [c.__init__ for c in inspect.getmro(factory) if "__init__" in vars(c)] if inspect.isclass(factory) else []
    if not follow_kwargs:
        chain = []
    params: dict[str, Any] = {}
    var_keyword = False
    for function in chain or [factory]:
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):  # builtins without a signature
            if not params:
                return None
            break
        found = signature.parameters.values()
        for p in found:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                params.setdefault(p.name, p.default)
        var_keyword = any(p.kind is p.VAR_KEYWORD for p in found)
        if not var_keyword and not any(p.kind is p.VAR_POSITIONAL for p in found):
            break
    return params, var_keyword


def accepted_arguments(factory: Callable, offered: dict[str, Any]) -> dict[str, Any]:
    """The items of ``offered`` that ``factory`` names as parameters (context a component may take, e.g. a seed).

    A class's base classes count where its ``__init__`` passes its arguments on to theirs.
    """
    found = keyword_parameters(factory, follow_kwargs=True)
    return {k: v for k, v in offered.items() if found is not None and k in found[0]}


def resolved_arguments(factory: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with the factory's defaults, as recorded in config.json."""
    found = keyword_parameters(factory)
    if found is None:
        return dict(kwargs)
    full = {name: default for name, default in found[0].items() if default is not _NO_DEFAULT}
    full.update(kwargs)
    return {k: v for k, v in full.items() if _plain(v)}


def _check_arguments(kind: str, name: str, factory: Callable, kwargs: dict[str, Any]) -> None:
    found = keyword_parameters(factory)
    if found is None:
        return
    params, var_keyword = found
    for key, value in kwargs.items():
        if key in params and not _fits_default(value, params[key]):
            default = params[key]
            raise MetricLabError(
                f"{kind} '{name}': argument '{key}' must be {_KINDS[type(default)]} like its default, got {value!r}; "
                f"pass e.g. {key}={json.dumps(default)}"
            )
    missing = [key for key, default in params.items() if default is _NO_DEFAULT and key not in kwargs]
    if missing:
        flag = "--train-transform-args / --test-transform-args" if kind == "transform" else f"--{kind}-args"
        raise MetricLabError(
            f"{kind} '{name}' needs the argument{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}, "
            f"which {'have' if len(missing) > 1 else 'has'} no default: pass {flag} "
            f"{' '.join(f'{key}=VALUE' for key in missing)}"
        )
    if var_keyword:
        return
    for key in kwargs:
        if key not in params and key in SUPPLIED.get(kind, ()):
            raise MetricLabError(
                f"{kind} '{name}' from {registry(kind).source(name)} breaks the {kind} contract: metriclab gives "
                f"every {kind} factory the arguments {', '.join(SUPPLIED[kind])}, and it takes no '{key}'; add it to "
                "the factory's signature"
            )
        if key not in params:
            _raise_unknown(kind, name, key, list(params))


# What metriclab passes every factory of a kind (the kind's contract, docs/components.md).
SUPPLIED = {"encoder": ("embedding_dim", "input_shape"), "scheduler": ("optimizer", "total_steps")}


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
samplers = Registry("sampler")
transforms = Registry("transform")
schedulers = Registry("scheduler")
REGISTRIES: dict[str, Registry] = {
    "encoder": encoders,
    "loss": losses,
    "miner": miners,
    "dataset": datasets,
    "optimizer": optimizers,
    "sampler": samplers,
    "transform": transforms,
    "scheduler": schedulers,
}

register_encoder = encoders.register
register_encoder_family = encoders.register_family
register_loss = losses.register
register_miner = miners.register
register_dataset = datasets.register
register_optimizer = optimizers.register
register_sampler = samplers.register
register_transform = transforms.register
register_scheduler = schedulers.register


def kind_of(word: str) -> str | None:
    """The component kind ``word`` names, singular or plural ('loss', 'losses', 'Encoders'), else None."""
    word = word.lower()
    return next((k for k in REGISTRIES if word in (k, _plural(k))), None)


def registry(kind: str) -> Registry:
    """The registry for ``kind`` (singular or plural: 'loss' or 'losses')."""
    key = kind_of(kind) or kind
    if key not in REGISTRIES:
        raise MetricLabError(f"unknown component kind '{kind}'; choose one of {', '.join(REGISTRIES)}")
    return REGISTRIES[key]


def create(kind: str, name: str, **kwargs: Any) -> Any:
    """Build a registered component: ``create('loss', 'triplet', margin=0.2)``."""
    return registry(kind).create(name, **kwargs)


def list_components(kind: str, pattern: str = "*") -> list[str]:
    """Registered names of ``kind`` that match ``pattern``."""
    return registry(kind).list(pattern)


def require_component(where: Path, config: dict[str, Any], kind: str, name: str | None) -> None:
    """Raise a MetricLabError naming the package to install when a run's component is not registered here.

    ``config`` is the run's config.json (``where`` its folder), which records each component's package.
    """
    if not name or name in registry(kind):
        return
    source = config.get("components", {}).get(kind, {}).get("source")
    named = config.get("recipe", {}).get("plugins") or []
    if named:
        how = f"pass --plugins {' --plugins '.join(named)} if you trust that code, or install the package providing it"
    else:
        how = f"pip install {source}" if source else "install the plugin that provides it"
    origin = f"from '{source}'" if source else "from a plugin"
    raise MetricLabError(f"{where} was trained with {kind} '{name}' {origin}, which is not loaded here; {how}")


def load_plugins(kind: str | None = None) -> None:
    """Import the installed ``metriclab.plugins`` entry points that lookups of ``kind`` need (every one without
    a kind), each once per process, metriclab's built-ins first.

    An entry point named after another kind (module docstring) is left for that kind's first lookup. A plugin
    that fails to import is reported as a warning naming it, so one broken third-party package does not take
    the others down. A name registered by two packages is one warning naming both: the built-in keeps its name;
    between two other packages the name is refused (see :meth:`Registry.get`), so the order of the entry
    points never decides.
    """
    wanted = None if kind is None else kind_of(kind) or kind
    pending = [
        p for p in _plugin_entry_points() if p.id not in _imported and (wanted is None or p.kind in (None, wanted))
    ]
    if not pending:
        return
    _imported.update(p.id for p in pending)
    before = {(reg.kind, name): len(sources) for reg in REGISTRIES.values() for name, sources in reg._clashes.items()}
    loading = _loading_entry_points.set(True)
    try:
        for plugin in pending:
            token = _current_source.set(plugin.source)
            try:
                plugin.point.load()
            except Exception as err:  # noqa: BLE001 - a third-party plugin may fail in any way
                warnings.warn(
                    f"metriclab plugin '{plugin.point.name}' from {plugin.source} failed to load: {err!r}", stacklevel=2
                )
            finally:
                _current_source.reset(token)
    finally:
        _loading_entry_points.reset(loading)
    for reg in REGISTRIES.values():
        for name, sources in reg._clashes.items():
            if before.get((reg.kind, name)) == len(sources):
                continue  # settled and reported by an earlier import
            if name in reg._entries and reg._entries[name].source not in _builtin_sources():
                del reg._entries[name]  # two third-party packages: neither wins by load order
            warnings.warn(reg.clash_message(name), stacklevel=2)


class _EntryPoint(NamedTuple):
    """One ``metriclab.plugins`` entry point, with what loading it needs to know."""

    point: importlib.metadata.EntryPoint
    source: str  # the distribution that declares it
    kind: str | None  # the kind it is named after, None for any other name
    builtin: bool

    @property
    def id(self) -> tuple[str, str]:
        return self.source, self.point.name


def _plugin_entry_points() -> list[_EntryPoint]:
    """The group's entry points: built-ins first, then by package and name (the same order whatever the paths)."""
    global _entry_points
    if _entry_points is None:
        found = []
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            module = ep.value.split(":")[0].strip()
            source = ep.dist.name if ep.dist is not None else module
            builtin = module.split(".")[0] == BUILTIN_PACKAGE
            found.append(_EntryPoint(ep, source, kind_of(ep.name.split(".")[0]), builtin))
        _entry_points = sorted(found, key=lambda p: (not p.builtin, p.source, p.point.name))
    return _entry_points


def _builtin_sources() -> set[str]:
    """The package name metriclab's built-in components are registered under."""
    return {p.source for p in _plugin_entry_points() if p.builtin}


def load_plugin(spec: str) -> str:
    """Import a plugin the user names explicitly: a module name or a path to a ``.py`` file.

    Returns the spec as a run records it: a file as its absolute path (so the run can be evaluated or
    resumed from another folder), a module name as given.
    """
    load_plugins()
    is_file = spec.endswith(".py") or Path(spec).is_file()
    resolved = str(Path(spec).expanduser().resolve()) if is_file else spec
    token = _current_source.set(resolved)
    try:
        if is_file:
            path = Path(resolved)
            if not path.is_file():
                raise MetricLabError(f"plugin file {spec} does not exist; pass the path to a .py file")
            module_name = f"metriclab_user_plugin_{path.stem}"
            loaded = sys.modules.get(module_name)
            if loaded is not None and getattr(loaded, "__file__", None) == str(path):
                return resolved  # already imported (a second train() in one process): registering again would clash
            if path.suffix != ".py":
                raise MetricLabError(f"plugin file {spec} is not a Python file; name it with .py and pass that path")
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)
            except MetricLabError:
                del sys.modules[module_name]
                raise
            except Exception as err:  # noqa: BLE001 - a plugin's own code may fail in any way
                del sys.modules[module_name]
                raise MetricLabError(
                    f"plugin file {spec} failed to import: {type(err).__name__}: {err}; fix it (--debug shows where)"
                ) from err
        else:
            try:
                importlib.import_module(spec)
            except ModuleNotFoundError as err:
                raise MetricLabError(
                    f"plugin module '{spec}' cannot be imported ({err}); install it or pass a path to a .py file"
                ) from err
            except MetricLabError:
                raise
            except Exception as err:  # noqa: BLE001 - a plugin's own code may fail in any way
                raise MetricLabError(
                    f"plugin module '{spec}' failed to import: {type(err).__name__}: {err}; fix it "
                    "(--debug shows where)"
                ) from err
    finally:
        _current_source.reset(token)
    return resolved
