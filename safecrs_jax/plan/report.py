"""Compile a Program, read its memory and HLO, and judge whether it fits.

    row = measure(program, chip, hbm_bytes)      # dict, one per program
    print(format_table(rows))

Per program (per device): argument / temporary / output bytes from
`compiled.memory_analysis()`, peak = arguments + temporaries + outputs - aliased
(donated) + resident (what the stage holds outside the program), headroom =
1 - peak / HBM. A TPU compile that runs out of memory is itself the answer: the
row is marked not fitting with the compiler's message.

MFU ceiling (what the program could reach at best on this chip):
  train     model FLOPs / FLOPs executed with rematerialisation: 1 for remat
            none, 3/4 for full (the forward runs twice), attention recomputed
            for dots_no_batch / offload;
  forward   1;
  generate  decoding is bound by reading the weights and the KV cache once
            per token: (FLOPs of a decode step / peak) / (bytes read / HBM
            bandwidth), at most 1.

loop_param_all_gathers: all-gathers inside while-loop bodies (decode loop, layer
scan, accumulation scan) whose result has the element count of a parameter (or
of one layer's slice of it, or its tensor-parallel shard). The decode loop of a
generate program should have none; an FSDP training step has them by design
(weights are gathered layer by layer).

gradient_reductions (train programs): how the compiled step reduces
parameter-sized arrays across devices. reduce_scatter counts the arrays
reduce-scattered (TPU fuses them as "all-reduce-scatter" fusions, often one
fusion for all of a layer's gradients); full_all_reduces counts arrays of the
size of a sharded parameter (a matrix, whole or one layer's slice; not the
norm scales and biases, which FSDP replicates) all-reduced at full size outside
such fusions. Under FSDP every weight gradient should be reduce-scattered
(full_all_reduces 0). Seen (2026-12, jax 0.10.2, libtpu 0.0.52, v5litepod-4,
demo test model at width 128, scanned or unrolled layers): every weight gradient
is reduce-scattered, full_all_reduces 0. Two things decide it: (1) the fused
q|k|v and gate|up kernels get one gradient matmul per kernel (layers.fused_dot);
autodiff of one fused matmul sliced a single [in, sum out] gradient, which the
compiler all-reduced whole (its simplifier merges the slices into the
per-device slice of the all-reduce, which then no longer matches a
reduce-scatter); (2) the compiler all-reduces small gradients anyway: at width 64
(the plain test size) every per-layer gradient is all-reduced, and at width 128
with sft.grad_accum > 1 the embedding lookup's gradient (its per-device piece 32
lanes wide) is (full_all_reduces 1; 0 at width 512). Constraining the
layer weights, the accumulation carry or the micro-batch gradients to their FSDP
layout changes neither. XLA:CPU has no reduce-scatter pass: cpu:N rows show every
reduction as an all-reduce.
"""
from __future__ import annotations

import re

import jax

from safecrs_jax import models
from safecrs_jax.infra import flops as flops_lib

_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(
    r"(?:calls|to_apply|body|condition|branch_computations)=\{?([^}\n]*?)(?:\}|,\s|$)")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")
_GATHER = re.compile(r"=\s*(.*?)\s(all-gather(?:-start)?)\(")
_ALL_REDUCE = re.compile(r"=\s*(.*?)\sall-reduce(?:-start)?\(")
_REDUCE_SCATTER = re.compile(r"\sreduce-scatter(?:-start)?\(|calls=%?all-reduce-scatter")
_RS_RESULT = re.compile(r"=\s*(.*?)\s(?:reduce-scatter(-start)?|fusion)\(")


def _computations(hlo: str) -> dict:
  """name -> list of instruction lines of an HLO module's text."""
  comps, name = {}, None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0].split("(")[0]:
      name = m.group(1)
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def _callees(lines) -> set:
  out = set()
  for line in lines:
    for m in _CALLS.finditer(line):
      out.update(n.strip().lstrip("%") for n in m.group(1).split(",") if n.strip())
  return out


def _gathered_sizes(line) -> list:
  """Element counts of the arrays an all-gather line produces."""
  m = _GATHER.search(line)
  if not m:
    return []
  sizes = [eval_size(d) for d in _SHAPE.findall(m.group(1))]
  if m.group(2) == "all-gather-start":     # ((operands...), (results...))
    sizes = sizes[len(sizes) // 2:]
  return sizes


def eval_size(dims: str) -> int:
  out = 1
  for d in dims.split(","):
    if d:
      out *= int(d)
  return out


def param_sizes(model_cfg, tensor=1, matrices=False) -> set:
  """Element counts that identify a parameter: whole, one layer of it, its tensor shard.

  Parameters of one dimension are left out; matrices=True also leaves out the
  scanned stacks of them ([L, D] norm scales, [L, out] biases), which FSDP does
  not shard, so their gradients are all-reduced by design.
  """
  sizes = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(models.abstract_params(model_cfg)):
    layered = any(getattr(k, "key", None) == "layers" for k in path)
    if len(leaf.shape) - (layered and matrices) < 2:
      continue
    n = int(leaf.size)
    for m in {n, n // leaf.shape[0] if layered else n}:
      sizes.update({m, m // max(tensor, 1)})
  return sizes


def loop_param_all_gathers(hlo: str, sizes: set) -> int:
  """Parameter-sized arrays all-gathered inside while-loop bodies of an HLO module."""
  comps = _computations(hlo)
  todo = {b for lines in comps.values() for line in lines for b in _BODY.findall(line)}
  seen = set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    todo |= _callees(comps[name]) - seen
  return sum(1 for name in seen for line in comps[name]
             for s in _gathered_sizes(line) if s in sizes)


def gradient_reductions(hlo: str, sizes: set) -> dict:
  """{"reduce_scatter": n, "full_all_reduces": m} of a compiled module (module docstring).

  reduce_scatter counts arrays: a combined reduce-scatter (one fusion with a tuple
  result) counts each array it scatters.

  The all-reduce inside a TPU "all-reduce-scatter" fusion's own computation is
  part of that reduce-scatter and is not counted as a full all-reduce.
  """
  rs = full = 0
  inside_rs = False
  for line in hlo.splitlines():
    head = line.strip()
    if head.endswith("{") and " = " not in head.split("(")[0]:
      inside_rs = head.lstrip("%").startswith("all-reduce-scatter")
      continue
    if _REDUCE_SCATTER.search(line):
      m = _RS_RESULT.search(line)
      shapes = _SHAPE.findall(m.group(1)) if m else [""]
      if m and m.group(2):                 # reduce-scatter-start: ((operands...), (results...))
        shapes = shapes[len(shapes) // 2:]
      rs += len(shapes)
      continue
    m = None if inside_rs else _ALL_REDUCE.search(line)
    if m:
      full += sum(1 for d in _SHAPE.findall(m.group(1)) if eval_size(d) in sizes)
  return {"reduce_scatter": rs, "full_all_reduces": full}


def mfu_ceiling(program, model_cfg, chip, n_devices):
  """The best MFU the program could reach on `chip` (module docstring)."""
  if program.kind == "forward":
    return 1.0
  if program.kind == "train":
    remat = model_cfg.remat
    if remat == "none":
      return 1.0
    if remat == "full":
      return 0.75
    t = max(program.seq, 1)
    attn = flops_lib.forward(model_cfg, 1, t, 0) - 2.0 * flops_lib.body_matmul_params(model_cfg) * t
    fwd = flops_lib.forward(model_cfg, 1, t, t)
    return 3 * fwd / (3 * fwd + attn)
  if chip is None or not program.gen_tokens:
    return None
  step_flops = program.flops / program.gen_tokens / n_devices
  step_bytes = max(program.read_bytes, 1)  # weights + KV cache, read once per token
  return min(1.0, (step_flops / chip.peak_flops) / (step_bytes / chip.hbm_bandwidth))


def _oom_bytes(message):
  m = re.search(r"required for HLO temporaries \(([\d.]+)([GMK])\)", message)
  if not m:
    return None
  return int(float(m.group(1)) * {"G": 1 << 30, "M": 1 << 20, "K": 1 << 10}[m.group(2)])


def measure(program, model_cfg, chip, hbm_bytes, mesh) -> dict:
  """Compiles one Program; returns its row (see module docstring)."""
  row = {"name": program.name, "shapes": program.shapes, "hbm_bytes": hbm_bytes,
         "resident_bytes": program.resident, "flops": program.flops}
  try:
    compiled = program.fn.lower(*program.args).compile()
  except Exception as e:  # the TPU compiler refuses programs that cannot fit
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
      raise
    temp = _oom_bytes(msg)
    row.update(argument_bytes=None, temp_bytes=temp, output_bytes=None, alias_bytes=None,
               peak_bytes=None if temp is None else temp + program.resident, fits=False,
               headroom=None, loop_param_all_gathers=None, mfu_ceiling=None,
               error=msg.splitlines()[0][:300])
    return row
  ma = compiled.memory_analysis()
  arg, tmp = int(ma.argument_size_in_bytes), int(ma.temp_size_in_bytes)
  out, alias = int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes)
  peak = arg + tmp + out - alias + program.resident
  tensor = int(mesh.shape.get("tensor", 1))
  text = compiled.as_text()
  if program.kind == "train":
    row["gradient_reductions"] = gradient_reductions(
        text, param_sizes(model_cfg, matrices=True))
  row.update(argument_bytes=arg, temp_bytes=tmp, output_bytes=out, alias_bytes=alias,
             peak_bytes=peak,
             fits=None if hbm_bytes is None else peak <= hbm_bytes,
             headroom=None if hbm_bytes is None else 1.0 - peak / hbm_bytes,
             loop_param_all_gathers=loop_param_all_gathers(
                 text, param_sizes(model_cfg, tensor)),
             mfu_ceiling=mfu_ceiling(program, model_cfg, chip, mesh.size), error=None)
  return row


def knobs(row, config) -> list:
  """Config settings that would lower the peak of a program that does not fit."""
  m, out = config.model, []
  if row["name"] in ("sft_train", "gdpo_learner", "gdpo_reference"):
    if m.remat in ("none",):
      out.append("model.remat=full (or dots_no_batch / offload)")
    elif m.remat in ("dots_no_batch", "offload"):
      out.append("model.remat=full")
    if int(m.logits_chunk) <= 0:
      out.append("model.logits_chunk=256")
    if m.attention == "xla":
      out.append("model.attention=auto (splash on TPU, cuDNN on GPU)")
  section = {"sft_train": "sft", "eval_generate": "eval"}.get(row["name"], "gdpo")
  out.append(f"{section}.batch_size lower (raise {section}.grad_accum to keep the step)"
             if section != "eval" else "eval.batch_size lower")
  if section == "gdpo":
    out.append("gdpo.max_completion_length / gdpo.max_prompt_length shorter")
  out.append("more devices on the fsdp mesh axis (a larger slice), or mesh.shape with tensor > 1")
  return out


def _gib(x):
  return "-" if x is None else f"{x / (1 << 30):.2f}"


def format_table(rows, header="") -> str:
  cols = ("program", "args", "temp", "out", "resident", "peak", "HBM", "headroom", "fits",
          "TFLOP", "MFU<=", "loop AG")
  lines = [header] if header else []
  lines.append("  ".join(f"{c:>14}" if i == 0 else f"{c:>8}" for i, c in enumerate(cols)))
  for r in rows:
    vals = [r["name"], _gib(r["argument_bytes"]), _gib(r["temp_bytes"]), _gib(r["output_bytes"]),
            _gib(r["resident_bytes"]), _gib(r["peak_bytes"]), _gib(r["hbm_bytes"]),
            "-" if r["headroom"] is None else f"{100 * r['headroom']:.0f}%",
            {True: "yes", False: "NO", None: "?"}[r["fits"]], f"{r['flops'] / 1e12:.1f}",
            "-" if r["mfu_ceiling"] is None else f"{r['mfu_ceiling']:.2f}",
            "-" if r["loop_param_all_gathers"] is None else str(r["loop_param_all_gathers"])]
    lines.append("  ".join(f"{v:>14}" if i == 0 else f"{v:>8}" for i, v in enumerate(vals)))
    lines.append(f"{'':>14}  {r['shapes']}" + (f"  [{r['error']}]" if r.get("error") else ""))
  lines.append("(GiB per device; peak = args + temp + out - donated + resident)")
  return "\n".join(lines)
