"""lattice.operator: keeps TrainingJobs between minSize and maxSize workers.

`lattice.operator.core` holds the pure decisions (`allocate`, `reconcile`); the Kubernetes
adapter (`lattice.operator.kubernetes`) and the local control plane (`lattice.operator.local`)
observe, call them and apply the actions.
"""
