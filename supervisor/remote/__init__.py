"""Driving a supervisor from another process: one protocol (:mod:`.protocol`), two carriers.

The Unix control socket (:mod:`.control`) serves a supervisor on its own host; the Ray agent
(:mod:`.ray_agent`) serves one per node of a Ray cluster, and :mod:`.fleet` drives those agents
from a program. Both carriers answer through the same dispatcher, envelopes and typed errors.
"""
