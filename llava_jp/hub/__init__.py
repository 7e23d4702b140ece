"""Hub: release folders (remote code, model card, load check) and the predecessor import."""
