"""lattice.operator (see docs/architecture.md)."""
