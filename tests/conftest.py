"""Shared pytest fixtures; rig fixtures live in tests/rig/."""
