"""The planner: topology names, per-program memory rows, the verdict, loop all-gathers.

cpu:N tests run in the default suite (compile-only, seconds). TPU-topology tests
need libtpu (the `plan` extra) and are skipped without it.
"""
import importlib.util
import json
import os
import subprocess
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")   # before libtpu is ever loaded

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from configs import demo  # noqa: E402
from safecrs_jax import models, plan  # noqa: E402
from safecrs_jax.infra import (
  flops,  # noqa: E402
  sharding,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
FSDP = (("data", 1), ("fsdp", -1), ("tensor", 1))
DATA = (("data", -1), ("fsdp", 1), ("tensor", 1))
FIELDS = ("name", "peak_bytes", "hbm_bytes", "fits", "loop_param_all_gathers", "argument_bytes",
          "temp_bytes", "output_bytes", "headroom", "flops", "mfu_ceiling")


def _config(stage="sft", scan=True, shape=FSDP):
  c = demo.get_config(f"stage={stage},size=test,relational=off")
  c.model.scan_layers, c.mesh.shape = scan, shape
  return c


@pytest.mark.parametrize("name,want", [
    ("v5p-16", ("v5p:2x2x2", {})), ("v5p-8", ("v5p:2x2x1", {})), ("v5p-128", ("v5p:4x4x4", {})),
    ("v5litepod-4", ("v5e:2x2", {})), ("v5e-16", ("v5e:4x4", {})), ("v6e-8", ("v6e:2x4", {})),
    ("v4-8", ("v4:2x2x1", {"chip_config_name": "megacore"})),
    ("v5litepod-1", ("v5e:1x1", {"chips_per_host_bounds": (1, 1, 1)})),
    ("v5p:2x2x2", ("v5p:2x2x2", {}))])
def test_cloud_names_map_to_libtpu_topologies(name, want):
  assert plan.tpu_topology_name(name) == want


@pytest.mark.parametrize("bad", ["v5p-6", "v5litepod-3", "tpu-8", "v7x-8"])
def test_bad_topology_names_raise(bad):
  with pytest.raises(ValueError, match="topology"):
    plan.tpu_topology_name(bad)


def test_analytic_flops_by_hand():
  cfg = models.ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=2)
  # q, o: 4x4 each; k, v: 4x2 each; gate, up, down: 4x6 each -> 32 + 16 + 72 = 120
  assert flops.body_matmul_params(cfg) == 120
  # 1 row of 3 tokens: body 2*120*3, attention 4*L*N*H * (1+2+3) keys, head 2*4*10 on 2 positions
  assert flops.forward(cfg, 1, 3, 2) == 720 + 4 * 1 * 2 * 2 * 6 + 160
  assert flops.train(cfg, 1, 3, 2) == 3 * flops.forward(cfg, 1, 3, 2)
  # prefill of 2 (head on 1) + 2 decode steps seeing 3 then 4 keys
  assert flops.generate(cfg, 1, 2, 2) == flops.forward(cfg, 1, 2, 1) + 2 * 2 * (120 + 40) \
      + 4 * 2 * 2 * (3 + 4)


def test_sft_rows_on_cpu8_are_consistent():
  rows = plan.plan_config(_config(), jax.devices()[:8])
  assert [r["name"] for r in rows] == ["sft_train", "eval_generate"]
  for r in rows:
    assert set(FIELDS) <= set(r)
    assert r["peak_bytes"] == (r["argument_bytes"] + r["temp_bytes"] + r["output_bytes"]
                               - r["alias_bytes"] + r["resident_bytes"])
    assert r["fits"] is True and 0 < r["headroom"] < 1 and r["num_devices"] == 8
    assert r["hbm_bytes"] == plan.chip_of(jax.devices()[0]).hbm_bytes
  train = rows[0]
  assert train["alias_bytes"] > 0          # the state is donated
  # demo: 1 micro-batch of 16 rows per device x 8 devices, 256 tokens, head on 255
  cfg = models.ModelConfig.from_hf(models.PRESETS["tiny"], **dict(_config().model.overrides))
  assert train["flops"] == pytest.approx(flops.train(cfg, 16 * 8, 256, 255), rel=1e-6)


def test_gdpo_programs_and_reference_memory_on_cpu8():
  c = _config("gdpo")
  rows = {r["name"]: r for r in plan.plan_config(c, jax.devices()[:8])}
  assert list(rows) == ["gdpo_rollout", "gdpo_reference", "gdpo_learner", "eval_generate"]
  # beta > 0: the learner runs beside the reference params, the rollout beside the
  # optimizer state and the reference (float32, FSDP over 8).
  params = models.count_params(models.ModelConfig.from_hf(
      models.PRESETS["tiny"], **dict(c.model.overrides)))
  assert rows["gdpo_learner"]["resident_bytes"] == pytest.approx(4 * params / 8, rel=0.05)
  assert rows["gdpo_rollout"]["resident_bytes"] == pytest.approx(3 * 4 * params / 8, rel=0.05)
  c.gdpo.beta = 0.0
  names = [r["name"] for r in plan.plan_config(c, jax.devices()[:8], only=("gdpo_learner",))]
  assert names == ["gdpo_learner"]


def test_loop_param_all_gathers_of_a_sharded_decode_loop():
  """The counter on compiled programs: a while loop that gathers an FSDP-sharded kernel on
  every iteration counts 1; the rollout engine lays the weights out once before its decode
  loop, so the real decode program counts 0 whether params are FSDP-sharded (scanned or
  unrolled layers) or replicated."""
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 8), ("tensor", 1)), devices=jax.devices()[:8])
  w_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def loop(w, x):
    def body(c):                                                   # w is carried: the gather
      i, x, w = c                                                  # cannot be hoisted out
      full = jax.lax.with_sharding_constraint(w, repl)
      w = jax.lax.with_sharding_constraint(w * 1.01, w_sh)
      return i + 1, jnp.tanh(x @ full), w
    return jax.lax.while_loop(lambda c: c[0] < x[0, 0].astype(jnp.int32) + 3, body,
                              (0, x, w))[1]
  w = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=w_sh)
  x = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=repl)
  text = jax.jit(loop).lower(w, x).compile().as_text()
  assert plan.loop_param_all_gathers(text, {64 * 64}) == 1           # sizes in elements

  def count(**kw):
    (row,) = plan.plan_config(_config(**kw), jax.devices()[:8], only=("eval_generate",))
    return row["loop_param_all_gathers"]
  assert count(scan=True, shape=FSDP) == 0
  assert count(scan=True, shape=DATA) == 0
  assert count(scan=False, shape=FSDP) == 0


def test_gradient_reductions_counts_reduce_scatters_and_full_all_reduces():
  hlo = """
%all-reduce-scatter (p: f32[64,64]) -> f32[16,64] {
  %ar.1 = f32[64,64]{1,0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = f32[16,64]{1,0} dynamic-slice(%ar.1, %i, %j), dynamic_slice_sizes={16,64}
}

ENTRY %main (a: f32[64,64], b: f32[128,64], c: f32[]) -> f32[16,64] {
  %f = f32[16,64]{1,0} fusion(%a), kind=kCustom, calls=%all-reduce-scatter
  %rs = f32[32,64]{1,0} reduce-scatter(%b), dimensions={0}, to_apply=%add
  %g = (f32[16,64]{1,0}, f32[32,64]{1,0}) fusion(%a, %b), kind=kCustom, calls=%all-reduce-scatter.2
  %ar.2 = (f32[128,64]{1,0}, f32[64,64]{1,0}, f32[5]{0}) all-reduce(%b, %a, %x), to_apply=%add
  %ar.3 = f32[] all-reduce(%c), to_apply=%add
}
"""
  got = plan.gradient_reductions(hlo, {64 * 64, 128 * 64})
  assert got == {"reduce_scatter": 4, "full_all_reduces": 2}   # the tuple fusion scatters 2


def test_train_rows_report_gradient_reductions_on_cpu():
  (row,) = plan.plan_config(_config(), jax.devices()[:4], only=("sft_train",))
  red = row["gradient_reductions"]
  # XLA:CPU has no reduce-scatter pass: FSDP gradients show up as full all-reduces.
  assert red["reduce_scatter"] == 0 and red["full_all_reduces"] > 0


def _launch(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)     # launch.plan sets the device count from --topology
  return subprocess.run([sys.executable, "-m", "launch.plan", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_entry_point_json_and_a_config_that_does_not_fit():
  ok = _launch("--config=configs/demo.py:size=test", "--topology=cpu:4", "--json")
  assert ok.returncode == 0, ok.stderr[-2000:]
  rows = json.loads(ok.stdout)
  assert [r["name"] for r in rows] == ["sft_train", "eval_generate"]
  assert all(r["fits"] and r["num_devices"] == 4 and r["peak_bytes"] > 0 for r in rows)
  bad = _launch("--config=configs/demo.py:size=test", "--topology=cpu:4", "--hbm_gib=0.05",
                "--programs=sft_train")
  assert bad.returncode == 1
  assert "sft_train needs" in bad.stderr
  for knob in ("model.remat=full", "model.logits_chunk=256", "sft.batch_size"):
    assert knob in bad.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[plan]')")
def test_tpu_topology_plan_and_refusal():
  devices = plan.topology_devices("v5litepod-4")
  assert len(devices) == 4 and plan.chip_of(devices[0]).name == "v5e"
  c = _config("gdpo")
  c.gdpo.max_completion_length = 128     # splash attention (auto on TPU) needs P + T % 128 == 0
  rows = plan.plan_config(c, devices)
  assert all(r["fits"] for r in rows) and rows[0]["hbm_bytes"] == 16 << 30
  big = demo.get_config("size=tiny,relational=off")
  big.mesh.shape, big.sft.batch_size = FSDP, 4096         # 16k rows x 256 tokens
  big.tokenizer.max_length, big.tokenizer.buckets = 256, (256,)
  rows = plan.plan_config(big, devices, only=("sft_train",))
  ok, message = plan.verdict(rows, big)
  assert not ok and rows[0]["fits"] is False
  assert "sft.batch_size" in message and "model.remat" in message


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[plan]')")
def test_fsdp_gradients_reduce_scatter_on_tpu():
  """Under FSDP the TPU compiler reduce-scatters every weight gradient (fused
  all-reduce-scatter), the decoder layers' inside the backward loop included, scanned or
  unrolled: none is all-reduced at full size. The fused q|k|v and gate|up matmuls get one
  gradient per kernel for this (layers.fused_dot; one sliced fused gradient was
  all-reduced whole). The test model is widened to 128: at width 64 the compiler
  all-reduces the tiny per-layer gradients anyway (plan/report.py)."""
  devices = plan.topology_devices("v5litepod-4")
  for scan in (True, False):
    c = _config(scan=scan)
    c.model.overrides = tuple(dict(c.model.overrides, hidden_size=128, intermediate_size=256,
                                   head_dim=32).items())
    (row,) = plan.plan_config(c, devices, only=("sft_train",))
    red = row["gradient_reductions"]
    layers = 1 if scan else dict(c.model.overrides)["num_layers"]  # the scan body: once
    assert red["full_all_reduces"] == 0, (scan, red)
    assert red["reduce_scatter"] >= 7 * layers + 1, (scan, red)   # q k v o gate up down, embedding


def test_multi_slice_plan_on_cpu():
  """mesh.num_slices=2 over cpu:4 x 2 (stand-in slices, 4 devices each, in order): the
  config's mesh is one slice's and data parallelism spans the two."""
  devices = plan.topology_devices("cpu:4", num_slices=2)
  assert devices == jax.devices()[:8]
  c = _config()
  c.mesh.num_slices = 2
  rows = plan.plan_config(c, devices)
  assert [r["name"] for r in rows] == ["sft_train", "eval_generate"]
  assert all(r["fits"] and r["num_devices"] == 8 for r in rows)
  assert rows[0]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  ok = _launch("--config=configs/demo.py:size=test", "--topology=cpu:4", "--num_slices=2",
               "--programs=sft_train")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "sft on 2 x cpu:4 (DCN): 8 x cpu" in ok.stdout
  assert "'data': 2, 'fsdp': 4" in ok.stdout


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[plan]')")
def test_multi_slice_tpu_topology_plan():
  """2 x v5litepod-4 from libtpu's multi-slice topology: each device knows its slice; the
  hybrid mesh puts data across the slices and fsdp within one; the programs compile."""
  devices = plan.topology_devices("v5litepod-4", num_slices=2)
  assert len(devices) == 8 and sorted({d.slice_index for d in devices}) == [0, 1]
  mesh = sharding.make_mesh(FSDP, devices=devices, num_slices=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert [{d.slice_index for d in mesh.devices[i].ravel()} for i in range(2)] == [{0}, {1}]
  with pytest.raises(ValueError, match="belong to 2 slice"):
    sharding.make_mesh(FSDP, devices=devices, num_slices=4)
  c = _config()
  c.mesh.num_slices = 2
  rows = plan.plan_config(c, devices)
  assert [r["name"] for r in rows] == ["sft_train", "eval_generate"]
  assert all(r["fits"] for r in rows) and rows[0]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}


def test_preflight_skips_cpu_devices():
  # CPU has no fixed device memory: the start-up check compiles nothing there.
  assert plan.preflight(_config()) is None
