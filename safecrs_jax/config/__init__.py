"""The typed run config: one frozen dataclass per section, each default stated once.

configs/*.py return ml_collections ConfigDicts (what users edit and override on the
command line); entry points turn them into a `Config` once (`from_dict`), which
checks every field's name and type. Library code reads attributes
(config.sft.batch_size) and never falls back on a default of its own; a changed
copy is `override(config, "eval.split", "test")` or `section.replace(...)`.

Sections: sections.py (model, mesh, data, tokenizer, checkpoint, log, eval; the
default logical -> mesh axis rules), stages.py (optim, sft + sft.lora, gdpo);
tree.py (Config, from_dict, override); fields.py (the typed-section machinery).
The lowest layer: imports nothing else from safecrs_jax.
"""
from safecrs_jax.config.fields import ConfigError, Section
from safecrs_jax.config.sections import Checkpoint, Data, Eval, Log, Mesh, Model, Tokenizer
from safecrs_jax.config.stages import Gdpo, Lora, Optim, Sft
from safecrs_jax.config.tree import STAGES, Config, field_type, from_dict, override, parse, resolve

__all__ = ["STAGES", "Checkpoint", "Config", "ConfigError", "Data", "Eval", "Gdpo", "Log", "Lora",
           "Mesh", "Model", "Optim", "Section", "Sft", "Tokenizer", "field_type", "from_dict",
           "override", "parse", "resolve"]
