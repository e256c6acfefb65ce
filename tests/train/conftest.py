"""The `sftop_home` and `home` fixtures live in tests/conftest.py (the reliability suite uses them too)."""
