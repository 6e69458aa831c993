"""The whole config tree (`Config`), built once from a ConfigDict at the entry point.

    config = config_lib.from_dict(config_dict)     # typed, validated; ConfigError otherwise
    config = config_lib.resolve(config_or_dict)    # the same; a Config passes through
    config = config_lib.override(config, "sft.num_steps", "600")   # a changed copy
"""
import ast
import dataclasses
import difflib
import json
import typing

from safecrs_jax.config.fields import ConfigError, Section
from safecrs_jax.config.sections import Checkpoint, Data, Eval, Log, Mesh, Model, Tokenizer
from safecrs_jax.config.stages import Gdpo, Optim, Sft

STAGES = ("sft", "gdpo")


def _section(cls):
  return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class Config(Section):
  """A run's settings; fields in the order config.json has always listed them."""
  PATH = ""
  stage: str = "sft"             # which training stage this config launches
  seed: int = 0                  # root seed: init, data order, dropout, sampling
  model: Model = _section(Model)
  mesh: Mesh = _section(Mesh)
  data: Data = _section(Data)
  tokenizer: Tokenizer = _section(Tokenizer)
  optim: Optim = _section(Optim)
  checkpoint: Checkpoint = _section(Checkpoint)
  log: Log = _section(Log)
  sft: Sft = _section(Sft)
  gdpo: Gdpo = _section(Gdpo)
  eval: Eval = _section(Eval)

  def validate(self):
    if self.stage not in STAGES:
      raise ConfigError(f"config field stage must be one of {STAGES}, got {self.stage!r}")

  def to_json(self, **kwargs) -> str:
    """JSON of to_dict() (json.dumps kwargs): the text ConfigDict.to_json_best_effort gave."""
    return json.dumps(self.to_dict(), **kwargs)


def from_dict(values) -> Config:
  """The typed config of a ConfigDict or a plain nested dict; ConfigError names any field
  that is unknown (with the nearest known name) or of the wrong type. Absent fields take
  their defaults."""
  if hasattr(values, "to_dict") and not isinstance(values, Section):
    values = values.to_dict()      # ml_collections: resolves FieldReferences
  return Config.from_mapping(values)


def resolve(config) -> Config:
  """`config` as a Config: returned as is when it is one, else built by from_dict."""
  return config if isinstance(config, Config) else from_dict(config)


def field_type(dotted):
  """The declared type of the config field at `dotted` (e.g. "gdpo.rewards")."""
  cls, *path, last = [Config] + dotted.split(".")
  for name in path:
    kind = _known(cls, name, dotted)
    if not (isinstance(kind, type) and issubclass(kind, Section)):
      raise ConfigError(f"unknown config field {dotted}: {name} is not a section")
    cls = kind
  return _known(cls, last, dotted)


def _known(cls, name, dotted):
  hints = typing.get_type_hints(cls)
  if name not in hints or name == "PATH":
    near = difflib.get_close_matches(name, [n for n in hints if n != "PATH"], n=1)
    hint = f"; did you mean {'.'.join(filter(None, (cls.PATH, near[0])))}?" if near else ""
    raise ConfigError(f"unknown config field {dotted}{hint}")
  return hints[name]


def parse(dotted, text):
  """A command-line string as the value of the field at `dotted` (bool: 1/true/yes)."""
  kind = field_type(dotted)
  if kind is str:
    return text
  if kind is bool:
    return text.lower() in ("1", "true", "yes")
  if kind in (int, float):
    return kind(text)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"config field {dotted}: cannot parse {text!r} ({e})") from None


def override(config, dotted, value) -> Config:
  """A copy of `config` with the field at `dotted` set to `value` (a string is parsed after
  the field's type, as a command-line --set gives it)."""
  kind = field_type(dotted)
  if isinstance(value, str) and kind is not str:
    value = parse(dotted, value)
  return _replace(config, dotted.split("."), value)


def _replace(section, names, value):
  head, *rest = names
  if rest:
    value = _replace(getattr(section, head), rest, value)
  return section.replace(**{head: value})
