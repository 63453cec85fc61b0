"""The embedded local control plane (`lattice up`): the operator's local backend.

Objects live in SQLite under ``$LATTICE_HOME`` (`store`); worker "pods" are local process
groups (`pods`); `plane` runs the same observe → allocate → reconcile → apply loop as the
Kubernetes adapter, with the rendezvous and checkpoint services in-process; `api` is the small
HTTP API the `lattice apply/get/describe/logs/delete` commands talk to.
"""
