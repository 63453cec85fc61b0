"""lattice.agent: `lattice run`, the per-node agent (a drop-in for torchrun).

Kept free of imports: the standby interpreter imports `lattice.agent._standby` and should load
nothing else of the agent.
"""
