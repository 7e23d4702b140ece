"""Stand-ins used only by tests."""
