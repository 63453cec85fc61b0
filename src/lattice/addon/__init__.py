"""lattice.addon: checkpoints and restores training state inside training processes."""
