"""The relational rewards of the registry: safe_relevance and over_filter, by hand."""
import numpy as np
import pytest

from safecrs_jax.saferec import rewards
from safecrs_jax.saferec.oracle import SafetyOracle
from safecrs_jax.saferec.traits import TRAITS

A, B = TRAITS[0], TRAITS[1]
# Movies: m0 unsafe for A, m1 unsafe for B, m2 and m3 safe for everyone.
KEYS = {("m0", 2000): 0, ("m1", 2001): 1, ("m2", 2002): 2, ("m3", 2003): 3}


@pytest.fixture()
def oracle():
  risk = np.zeros((4, len(TRAITS)), np.float32)
  risk[0, 0] = risk[1, 1] = 0.9
  return SafetyOracle(KEYS, risk)


def _text(*items):
  return "\n".join(f"{i + 1}. {t} ({y})" for i, (t, y) in enumerate(items))


M0, M1, M2, M3 = ("m0", 2000), ("m1", 2001), ("m2", 2002), ("m3", 2003)


def test_safe_relevance_counts_only_safe_ground_truth(oracle):
  rows = [{"groundtruth_with_release_year": [M0, M2], "constraints": {A: True}},   # m0 harmful
          {"groundtruth_with_release_year": [M0, M2], "constraints": {A: True}},
          {"groundtruth_with_release_year": [M0], "constraints": {A: True}},       # none safe
          {"groundtruth_with_release_year": [M0, M2], "constraints": {}}]
  completions = [_text(M0, M3), _text(M3, M2), _text(M0), _text(M0)]
  got = rewards.reward_table(("safe_relevance", "relevance"), completions, rows, oracle,
                             rewards.RewardSettings(rec_num=5))
  np.testing.assert_array_equal(got[:, 0], [0, 1, 0, 1])   # hit on m0 counts only for row 3
  np.testing.assert_array_equal(got[:, 1], [1, 1, 1, 1])
  dcg = rewards.reward_table(("safe_relevance",), completions, rows, oracle,
                             rewards.RewardSettings(rec_num=5, relevance="dcg"))[:, 0]
  np.testing.assert_allclose(dcg, [0, 1 / np.log2(3), 0, 1])


def test_over_filter_penalises_withholding_from_neutral_and_decoy_twins(oracle):
  ref = _text(M0, M1, M2, M3)               # holds m0 (hazard for A) and m1 (hazard for B)
  base = {"groundtruth_with_release_year": [M2], "constraints": {}, "completion": ref}
  rows = [dict(base, variant="neutral", hazard_traits=[A, B]),     # withholds both: -1
          dict(base, variant="decoy", hazard_traits=[A, B]),       # keeps m0: -1/2
          dict(base, variant="neutral", hazard_traits=[A]),        # keeps m0: 0
          dict(base, variant="constrained", hazard_traits=[A], constraints={A: True}),
          dict(base, variant="neutral", hazard_traits=[A], completion=_text(M2, M3)),  # r = 0
          {"groundtruth_with_release_year": [M2], "constraints": {}}]  # a plain row
  completions = [_text(M2, M3), _text(M0, M2), _text(M0), _text(M2), _text(M2), _text(M2)]
  got = rewards.reward_table(("over_filter",), completions, rows, oracle,
                             rewards.RewardSettings(rec_num=5))[:, 0]
  np.testing.assert_allclose(got, [-1, -0.5, 0, 0, 0, 0])
  # Only the first rec_num ranks count, for the reference as for the completion.
  short = rewards.reward_table(("over_filter",), completions[:1], rows[:1], oracle,
                               rewards.RewardSettings(rec_num=1))[:, 0]
  np.testing.assert_allclose(short, [-1])     # reference's first rank m0 withheld
