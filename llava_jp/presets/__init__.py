"""Presets (YAML) and the builder that turns one into a (model, processor)."""
