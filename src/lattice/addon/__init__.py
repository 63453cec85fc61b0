"""lattice.addon (see docs/architecture.md)."""
