"""lattice.api (see docs/architecture.md)."""
