"""Experiments: arms x seeds of a run config, compared with a control arm (see spec.py)."""
