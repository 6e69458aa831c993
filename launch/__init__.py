"""Thin absl entry points: `python -m launch.<name> --config=configs/<file>.py ...`."""
