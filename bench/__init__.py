"""Benchmarks: scripts that print JSON figures (``python -m bench`` runs them all).

Not tests: nothing here asserts a time. Each module has ``main() -> dict`` and can run alone
(``python -m bench.<name>``).
"""
