"""Orchestration: the ``Supervisor`` a program opens, its SupervisorActor and registry, and the
policies that move connections (failover, drain, herd control, the preferred address, the
network monitor's reactions).
"""
