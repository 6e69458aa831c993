"""safecrs_jax/config: the typed schema of every config file, its checks, and no fallbacks left."""
import dataclasses
import glob
import importlib
import json
import os
import re

import pytest

from configs import common, demo
from safecrs_jax import config as config_lib
from safecrs_jax import demo as demo_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.basename(p)[:-3]
                      for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                      if not p.endswith(("__init__.py", "common.py")))
# Per-file args beyond stage= (a file that does not know one raises "unknown config arg").
EXTRA_ARGS = ("", "lora=1", "size=test", "relational=twins", "relational=on",
              "init=/run,data_dir=/d,model_dir=/m")


def _variants():
  out = []
  for name in CONFIG_FILES:
    mod = importlib.import_module(f"configs.{name}")
    for stage in ("sft", "gdpo"):
      for extra in EXTRA_ARGS:
        arg = ",".join(filter(None, (f"stage={stage}", extra)))
        try:
          out.append((f"{name}:{arg}", mod.get_config(arg)))
        except ValueError as e:
          assert "unknown config arg" in str(e)
  return out


VARIANTS = _variants()


def test_every_variant_is_enumerated():
  names = {v.split(":")[0] for v, _ in VARIANTS}
  assert names == set(CONFIG_FILES) and len(VARIANTS) >= 2 * (3 + 3 * 3)


@pytest.mark.parametrize("name,cd", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_typed_config_gives_back_the_config_dict(name, cd):
  """What fingerprints, config.json, reports and W&B see is what the ConfigDict gave."""
  c = config_lib.from_dict(cd)
  assert c.to_dict() == cd.to_dict()
  assert c.to_json(indent=2) == cd.to_json_best_effort(indent=2)   # the same text, key order
  want = json.loads(cd.to_json_best_effort())
  assert json.loads(c.to_json()) == want
  assert config_lib.resolve(c) is c and hash(c) == hash(config_lib.from_dict(cd))


def test_schema_defaults_are_the_safe_sft_paper_recipe():
  """common.build only adds what a stage and the file args change."""
  assert config_lib.from_dict(common.build(stage="sft")) == config_lib.Config()
  g = config_lib.from_dict(common.build(stage="gdpo"))
  assert g.replace(stage="sft", optim=config_lib.Optim()) == config_lib.Config()
  assert (g.optim.lr, g.optim.schedule, g.optim.warmup_ratio, g.optim.b2) == (
      1e-6, "constant", 0.0, 0.99)
  # where code fallbacks once disagreed with the configs, the configs' values hold
  c = config_lib.Config()
  assert (c.sft.curate, c.gdpo.batch_unit, c.sft.lora.dropout, c.optim.grad_clip) == (
      False, "completions", 0.05, 1.0)


def test_a_misspelled_field_names_its_path_and_the_nearest_name():
  cd = demo.get_config("stage=gdpo")
  cd.gdpo.grop_size = 4                      # an unlocked ConfigDict takes any new name
  with pytest.raises(config_lib.ConfigError,
                     match=r"unknown config field gdpo\.grop_size; did you mean gdpo\.group_size"):
    config_lib.from_dict(cd)
  with pytest.raises(config_lib.ConfigError, match=r"unknown config field sft\.lora\.rnak"):
    config_lib.from_dict({"sft": {"lora": {"rnak": 4}}})
  with pytest.raises(config_lib.ConfigError, match=r"unknown config field tokenzier"):
    config_lib.from_dict({"tokenzier": {}})
  with pytest.raises(config_lib.ConfigError, match=r"sft\.num_stepz; did you mean sft\.num_steps"):
    config_lib.override(config_lib.Config(), "sft.num_stepz", 3)


@pytest.mark.parametrize("values,where,want,got", [
    ({"gdpo": {"group_size": "8"}}, "gdpo.group_size", "int", "str"),
    ({"gdpo": {"group_size": 8.0}}, "gdpo.group_size", "int", "float"),
    ({"sft": {"curate": 1}}, "sft.curate", "bool", "int"),
    ({"optim": {"lr": True}}, "optim.lr", "float", "bool"),
    ({"gdpo": {"rewards": "safety"}}, "gdpo.rewards", "tuple", "str"),
    ({"mesh": {"shape": (("fsdp", "all"),)}}, r"mesh.shape\[0\]\[1\]", "int", "str"),
    ({"mesh": {"rules": (("vocab", 3),)}}, r"mesh.rules\[0\]\[1\]", "str", "int"),
    ({"log": {"profile_steps": (1, 2, 3)}}, "log.profile_steps", "2 entries", "(1, 2, 3)"),
    ({"eval": 16}, "eval", "mapping", "int"),
])
def test_a_mistyped_field_names_its_path_the_type_and_the_value(values, where, want, got):
  with pytest.raises(config_lib.ConfigError, match=where) as e:
    config_lib.from_dict(values)
  assert want in str(e.value) and got in str(e.value)


def test_accepted_conversions_and_immutability():
  c = config_lib.from_dict({"optim": {"lr": 1}, "tokenizer": {"buckets": [64, 128]},
                            "model": {"overrides": [["num_layers", 2]]}, "stage": "gdpo"})
  assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)      # int for a float, as
  assert c.tokenizer.buckets == (64, 128)                         # ml_collections does
  assert c.model.overrides == (("num_layers", 2),)
  assert c.gdpo == config_lib.Gdpo()                              # absent: the defaults
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.sft.num_steps = 3
  with pytest.raises(config_lib.ConfigError, match="stage"):
    c.replace(stage="rl")
  with pytest.raises(config_lib.ConfigError, match="sft.batch_size"):
    c.sft.replace(batch_size="12")


def test_override_parses_command_line_strings_after_the_field_type():
  c = config_lib.Config()
  d = config_lib.override(c, "sft.num_steps", "600")
  assert d.sft.num_steps == 600 and c.sft.num_steps == -1          # a copy
  assert config_lib.override(c, "log.progress", "false").log.progress is False
  assert config_lib.override(c, "checkpoint.async_save", "1").checkpoint.async_save is True
  assert config_lib.override(c, "tokenizer.buckets", "(128, 256)").tokenizer.buckets == (128, 256)
  assert config_lib.override(c, "data.dir", "/d").data.dir == "/d"
  assert config_lib.override(c, "sft.lora.alpha", 16).sft.lora.alpha == 16.0
  with pytest.raises(ValueError):
    config_lib.override(c, "sft.num_steps", "many")


def test_demo_configs_are_typed_and_take_set_overrides():
  sft_c, gdpo_c, grpo_c = demo_run.get_configs(
      "test", {"sft.num_steps": "30", "gdpo.beta": "0.0", "log.progress": False})
  assert all(isinstance(c, config_lib.Config) for c in (sft_c, gdpo_c, grpo_c))
  assert sft_c.sft.num_steps == gdpo_c.sft.num_steps == 30 and grpo_c.gdpo.beta == 0.0
  assert (gdpo_c.gdpo.advantage_mode, grpo_c.gdpo.advantage_mode) == ("gdpo", "grpo")
  cd = demo.get_config("stage=gdpo,size=test,relational=off")    # the same by hand
  cd.sft.num_steps, cd.gdpo.beta, cd.log.progress = 30, 0.0, False
  assert gdpo_c == config_lib.from_dict(cd)
  with pytest.raises(config_lib.ConfigError, match="sft.num_stepz"):
    demo_run.get_configs("test", {"sft.num_stepz": "30"})


# A config field read with a fallback: `<config or section>.get(`, getattr(<config>, name, default).
_SECTIONS = r"(?:model|mesh|data|tokenizer|optim|checkpoint|log|sft|lora|gdpo|eval)"
_FALLBACK = re.compile(
    r"\b(?:config|cfg|\w+_cfg|gcfg|ck|ev)\.get\(|\." + _SECTIONS + r"\.get\(|"
    r"getattr\((?:config|cfg|\w+_cfg|gcfg)\b[^)]*,[^)]*,")


def test_no_config_field_is_read_with_a_fallback():
  hits = []
  for folder in ("safecrs_jax", "launch", "bench"):
    for path in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True):
      with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
          if _FALLBACK.search(line.split("#")[0]):
            hits.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
  assert not hits, "config fields read with a fallback:\n" + "\n".join(hits)
  # the pattern finds the forms that were there
  for line in ('strict=config.data.get("strict", True)', 'optim_cfg.get("grad_clip", 0.0)',
               'self.config.gdpo.get("batch_unit", "prompts")',
               'log_cfg.get("wandb_mode", "online")', 'getattr(cfg, "curate", True)'):
    assert _FALLBACK.search(line), line
