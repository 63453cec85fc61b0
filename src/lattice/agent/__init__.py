"""lattice.agent (see docs/architecture.md)."""
