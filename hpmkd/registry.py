"""Name -> class registries with helpful errors.

Every pluggable piece of hpmkd (models, losses, aggregators, temperature schedules, pipelines, stage kinds) is
looked up by the name a YAML file gives. A :class:`Registry` maps names to factories, offers close names when a
name is unknown, and checks the keyword options a YAML entry passes against the factory's signature *before* any
expensive work starts, so a typo such as ``temprature`` is reported with its key path and the allowed keys.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import types
import typing
from typing import Any, Callable, Generic, Iterable, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key path and what is allowed."""


def close_names(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` entries of ``choices`` that look like ``name`` (difflib ratio >= 0.5)."""
    choices = list(choices)
    hits = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    lowered = [c for c in choices if name.lower() in c.lower() and c not in hits]
    return (hits + lowered)[:n]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    hits = close_names(name, choices)
    return f" Did you mean {', '.join(repr(h) for h in hits)}?" if hits else ""


class Registry(Generic[T]):
    """A named collection of factories (classes or functions).

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("kd")
    ... class KD: ...
    """

    def __init__(self, kind: str, context: Iterable[str] = ()):
        self.kind = kind
        #: keyword arguments hpmkd itself passes to every factory (the build context); never user options
        self.context = tuple(context)
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def get(self, name: str, path: str = "") -> Callable[..., T]:
        """The factory registered as ``name``; a :class:`ConfigError` naming ``path`` and close names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            where = f"{path}: " if path else ""
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)} "
                f"Known {self.kind}s: {', '.join(self.names())}."
            ) from None

    def check_options(self, name: str, options: dict[str, Any], path: str = "") -> None:
        """Raise :class:`ConfigError` if ``options`` has a key the factory does not accept, a value of another type
        than the factory's annotation of that keyword says (``bool``, ``int``, ``float``, ``str``, ``Literal``,
        optional and list forms of them; other annotations are not checked here), or a NaN or infinite number.

        The registry's :attr:`context` (keyword arguments hpmkd itself supplies, for instance ``num_teachers``) may not
        be set by the user and is not listed as allowed.
        """
        from hpmkd.config_schema import convert  # config_schema imports this module

        factory = self.get(name, path)
        allowed = user_options(factory, self.context)
        annotated = option_types(factory)
        for key, value in options.items():
            where = f"{path}.{key}" if path else key
            if allowed is not None and key not in allowed:  # None: the factory takes **kwargs, anything goes
                raise ConfigError(
                    f"{where}: unknown option for {self.kind} {name!r}.{did_you_mean(key, allowed)} "
                    f"Allowed: {', '.join(sorted(allowed)) or '(none)'}."
                )
            check_finite(value, where)
            if key in annotated:
                convert(annotated[key], value, where)

    def build(self, name: str, options: dict[str, Any] | None = None, path: str = "", **context: Any) -> T:
        """Check ``options`` and call the factory with ``context`` and ``options`` as keyword arguments."""
        options = dict(options or {})
        self.check_options(name, options, path)
        factory = self.get(name, path)
        accepted = user_options(factory, ())
        if accepted is not None:  # pass only the context keys the factory takes
            context = {k: v for k, v in context.items() if k in accepted}
        try:
            return factory(**context, **options)
        except (TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            where = f"{path}: " if path else ""
            raise ConfigError(f"{where}{self.kind} {name!r} rejected its options {options}: {err}") from err


def user_options(factory: Callable[..., Any], context: Iterable[str]) -> set[str] | None:
    """Keyword names ``factory`` accepts, minus ``context``; ``None`` when anything is accepted.

    A class whose ``__init__`` ends in ``**kwargs`` is taken to forward them to its base class (``super().__init__
    (**kwargs)``), so the base's keywords are accepted too, and only a base that itself takes ``**kwargs`` (or a
    plain function that does) accepts anything.
    """
    names: set[str] = set()
    targets = [c.__init__ for c in factory.__mro__ if "__init__" in vars(c)] if inspect.isclass(factory) else [factory]
    for target in targets:
        params = list(inspect.signature(target).parameters.values())
        names |= {
            p.name
            for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return names - set(context) - {"self"}
        if target is object.__init__ or not inspect.isclass(factory):
            return None
    return None


def init_targets(factory: Callable[..., Any]) -> list[Callable[..., Any]]:
    """The callables whose keywords a factory accepts: a class's ``__init__`` methods along its MRO, the function
    inside a :func:`functools.partial`, or the function itself."""
    if inspect.isclass(factory):
        return [c.__init__ for c in factory.__mro__ if "__init__" in vars(c) and c is not object]
    if isinstance(factory, functools.partial):
        return [factory.func]
    return [factory]


def option_types(factory: Callable[..., Any]) -> dict[str, Any]:
    """Keyword name -> its annotation, for the annotations :func:`checkable` can check against a YAML value."""
    found: dict[str, Any] = {}
    for target in reversed(init_targets(factory)):
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # an annotation that does not resolve here: not checked
            continue
        found.update({k: v for k, v in hints.items() if k != "return" and checkable(v)})
    return found


def checkable(tp: Any) -> bool:
    """Whether ``tp`` is made only of ``bool``/``int``/``float``/``str``/``None``, ``Literal``, unions and lists."""
    origin = typing.get_origin(tp)
    if tp in (bool, int, float, str, type(None)) or origin is Literal:
        return True
    if origin in (Union, types.UnionType, list):
        return all(checkable(a) for a in typing.get_args(tp))
    return False


def check_finite(value: Any, path: str) -> None:
    """Refuse NaN and infinite numbers anywhere in an option's value (a NaN temperature or weight fails training
    steps later, not here)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value}.")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, f"{path}.{i}")
