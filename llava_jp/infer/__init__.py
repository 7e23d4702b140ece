"""Inference applications: batched generation, the chat session, terminal chat and the web demo."""
