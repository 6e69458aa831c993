"""The algorithm, pure jittable maths with no I/O: the rollout sampler, advantages,
the policy loss, rank items and the learner steps."""
