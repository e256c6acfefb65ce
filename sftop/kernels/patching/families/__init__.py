"""Families whose classes do not follow `patching/registry.py`'s `<Prefix>RMSNorm` naming, one
module each, registered in `registry.py` (names only: no torch here either)."""
