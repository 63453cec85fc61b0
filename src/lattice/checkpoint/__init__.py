"""lattice.checkpoint (see docs/architecture.md)."""
