"""lattice.rendezvous (see docs/architecture.md)."""
