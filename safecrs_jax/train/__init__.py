"""Training: state, optimizer, the loop, checkpoints, policy loading, and the two
stages (Safe-SFT, Safe-GDPO)."""
