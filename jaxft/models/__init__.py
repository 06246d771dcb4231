"""The one parametric decoder (decoder.py), its config from a checkpoint (config.py), heads beside its
backbone (heads.py) and the table of its layer projections (names.py)."""
