"""Thin entry points (absl flags + ml_collections configs); the logic lives in the library."""
