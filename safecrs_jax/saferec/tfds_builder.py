"""A tensorflow-datasets builder for SafeRec (works without TensorFlow).

tensorflow-datasets >= 4.9 can write and read the `array_record` file format
with no TensorFlow installed: `download_and_prepare` serialises examples with
its own protobuf code, and `as_data_source` gives random-access sequences of
decoded numpy/bytes examples. This builder uses exactly that path; `tfrecord`
and `as_dataset` (tf.data) need TensorFlow and are not used.

    from safecrs_jax.saferec import tfds_builder
    builder = tfds_builder.SafeRec(source_dir="/path/to/saferec_root", config="sft",
                                   data_dir="/tmp/tfds")
    builder.download_and_prepare()
    rows = tfds_builder.rows_from_tfds(builder, "train")   # == saferec.load_split(root, "train")

`source_dir` is anything `saferec.load_split` accepts (released layout,
SafeRec-mini, JSON lines); rows are validated there, strictly. Every row is
stored field by field (ground truth as {title, year} records, constraints as
parallel name / value lists) plus `extra_json` for any other fields, so
`rows_from_tfds` gives back exactly the rows `load_split` returns, in order.
"""
from __future__ import annotations

import json

import numpy as np
from etils import epath

try:
  import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - tfds is an install requirement
  raise ImportError("safecrs_jax.saferec.tfds_builder needs tensorflow-datasets "
                    "(pip install tensorflow-datasets); TensorFlow itself is not needed") from e

from safecrs_jax.saferec.data import find_split, load_split

_CORE = ("prompt", "completion", "groundtruth_with_release_year", "seen_titles", "constraints")
SPLITS = ("train", "validation", "test")


class SafeRecConfig(tfds.core.BuilderConfig):
  """`stage`: which processed dataset to read, "sft" or "grpo"."""

  def __init__(self, *, stage: str, **kwargs):
    super().__init__(**kwargs)
    self.stage = stage


class SafeRec(tfds.core.GeneratorBasedBuilder):
  """SafeRec conversations (prompt, completion, ground truth, seen titles, constraints)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Released SafeRec fields, plus extra fields as JSON."}
  BUILDER_CONFIGS = [
      SafeRecConfig(name="sft", stage="sft", description="saferec_sft_dataset splits"),
      SafeRecConfig(name="grpo", stage="grpo", description="saferec_grpo_dataset splits"),
  ]

  # tfds 4.9's default `code_path` touches the `importlib_resources` backport,
  # which Python >= 3.9 installs do not have; this file's path is all it needs.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def __init__(self, *, source_dir: str | None = None, file_format: str = "array_record", **kwargs):
    self._source_dir = source_dir
    super().__init__(file_format=file_format, **kwargs)

  def _info(self):
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Sequence({"role": text, "content": text}),
            "has_completion": np.bool_,
            "completion": text,
            "groundtruth": tfds.features.Sequence({"title": text, "year": np.int32}),
            "seen_titles": tfds.features.Sequence(text),
            "constraint_traits": tfds.features.Sequence(text),
            "constraint_values": tfds.features.Sequence(np.bool_),
            "extra_json": text,
        }),
        disable_shuffling=True,   # keep the released row order
        homepage="https://github.com/xxyyffyeah/SafeCRS",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._source_dir is None:
      raise ValueError("SafeRec builder: pass source_dir= (a SafeRec root, split dir or .jsonl)")
    out = {}
    for split in SPLITS:
      try:
        find_split(self._source_dir, split, self.builder_config.stage)
      except FileNotFoundError:
        continue
      out[split] = self._generate_examples(split)
    if not out:
      raise FileNotFoundError(f"no {self.builder_config.stage} splits under {self._source_dir}")
    return out

  def _generate_examples(self, split):
    for i, row in enumerate(load_split(self._source_dir, split, self.builder_config.stage)):
      yield i, to_example(row)


def to_example(row: dict) -> dict:
  """A normalised row as a tfds example of `SafeRec` features."""
  extra = {k: v for k, v in row.items() if k not in _CORE}
  return {
      "prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
      "has_completion": "completion" in row,
      "completion": row.get("completion", ""),
      "groundtruth": [{"title": t, "year": int(y)} for t, y in row["groundtruth_with_release_year"]],
      "seen_titles": list(row["seen_titles"]),
      "constraint_traits": list(row["constraints"]),
      "constraint_values": [bool(v) for v in row["constraints"].values()],
      "extra_json": json.dumps(extra, sort_keys=True, ensure_ascii=False),
  }


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def from_example(ex: dict) -> dict:
  """Inverse of `to_example` on a decoded example (bytes and numpy arrays)."""
  prompt = ex["prompt"]
  gt = ex["groundtruth"]
  row = {
      "prompt": [{"role": _text(r), "content": _text(c)} for r, c in zip(prompt["role"], prompt["content"])],
      "groundtruth_with_release_year": [[_text(t), int(y)] for t, y in zip(gt["title"], gt["year"])],
      "seen_titles": [_text(t) for t in ex["seen_titles"]],
      "constraints": {_text(t): bool(v) for t, v in zip(ex["constraint_traits"], ex["constraint_values"])},
  }
  if bool(ex["has_completion"]):
    row["completion"] = _text(ex["completion"])
  row.update(json.loads(_text(ex["extra_json"])))
  return row


def rows_from_tfds(builder: SafeRec, split: str) -> list[dict]:
  """All rows of a prepared split, via `as_data_source` (no TensorFlow)."""
  source = builder.as_data_source(split)
  return [from_example(source[i]) for i in range(len(source))]
