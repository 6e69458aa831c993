"""The machinery of the typed config: `Section`, type checks, building from dicts.

A section is a frozen dataclass whose fields carry Python type annotations
(str, int, float, bool, tuple[X, ...], tuple[X, Y], X | None, Any) and one
default each. Every construction (direct, `from_mapping`, `dataclasses.replace`)
checks the types: an int is accepted for a float (and stored as a float, as
ml_collections does), a list for a tuple (stored as a tuple, so sections stay
hashable), a bool never for an int or a float.
"""
import dataclasses
import difflib
import typing
from collections.abc import Mapping
from types import UnionType
from typing import Any, ClassVar


class ConfigError(ValueError):
  """A config field that is unknown, of the wrong type or out of range (message names its path)."""


def _name(kind) -> str:
  if isinstance(kind, type):
    return kind.__name__
  return str(kind).replace("typing.", "")


def _fail(path, kind, value):
  raise ConfigError(f"config field {path} must be {_name(kind)}, got {type(value).__name__} "
                    f"{value!r}")


def check(value, kind, path):
  """`value` as a `kind` (int -> float, list -> tuple), or ConfigError naming `path`."""
  if kind is Any:
    return _freeze(value)
  origin = typing.get_origin(kind)
  if origin in (UnionType, typing.Union):
    for option in typing.get_args(kind):
      try:
        return check(value, option, path)
      except ConfigError:
        pass
    _fail(path, kind, value)
  if kind is type(None):
    if value is not None:
      _fail(path, kind, value)
    return None
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      _fail(path, kind, value)
    args = typing.get_args(kind)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(check(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
      raise ConfigError(f"config field {path} must have {len(args)} entries "
                        f"({_name(kind)}), got {value!r}")
    pairs = enumerate(zip(args, value, strict=True))
    return tuple(check(v, a, f"{path}[{i}]") for i, (a, v) in pairs)
  if kind is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      _fail(path, kind, value)
    return float(value)
  if kind is int and isinstance(value, bool):
    _fail(path, kind, value)
  if isinstance(kind, type) and isinstance(value, kind):
    return value
  _fail(path, kind, value)


def _freeze(value):
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class Section:
  """Base of every config section: typed fields checked on construction.

  PATH: where the section sits in the config tree ("" for the root, "sft.lora").
  """
  PATH: ClassVar[str] = ""

  def __post_init__(self):
    hints = typing.get_type_hints(type(self))
    for f in dataclasses.fields(self):
      value, kind = getattr(self, f.name), hints[f.name]
      where = f"{self.PATH}.{f.name}" if self.PATH else f.name
      if isinstance(kind, type) and issubclass(kind, Section):
        if not isinstance(value, kind):
          raise ConfigError(f"config section {where} must be a {kind.__name__}, got "
                            f"{type(value).__name__}")
        continue
      object.__setattr__(self, f.name, check(value, kind, where))
    self.validate()

  def validate(self):
    """Checks across fields of the section (none by default)."""

  @classmethod
  def from_mapping(cls, values):
    """The section from a dict / ConfigDict; absent fields take their defaults."""
    if not isinstance(values, Mapping) and not hasattr(values, "items"):
      where = cls.PATH or "the config"
      raise ConfigError(f"config section {where} must be a mapping, got "
                        f"{type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
      where = f"{cls.PATH}.{key}" if cls.PATH else str(key)
      if key not in names:
        near = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {cls.PATH + '.' if cls.PATH else ''}{near[0]}?" if near else ""
        raise ConfigError(f"unknown config field {where}{hint}")
      kind = hints[key]
      if isinstance(kind, type) and issubclass(kind, Section):
        value = value if isinstance(value, kind) else kind.from_mapping(value)
      kwargs[key] = value
    return cls(**kwargs)

  def to_dict(self) -> dict:
    """Plain nested dict in field order (tuples stay tuples), as ConfigDict.to_dict gives."""
    return {f.name: (v.to_dict() if isinstance(v, Section) else v)
            for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

  def replace(self, **changes):
    """A copy with `changes` (checked like any construction)."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def field_type(cls, name):
    return typing.get_type_hints(cls)[name]
