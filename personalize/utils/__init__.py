"""Small helpers every layer may use: atomic file writes, output folders (checks, lock, manifests)."""
