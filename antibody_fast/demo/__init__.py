"""Embedded CPU demo: the whole defense end to end on a tiny Llama and a synthetic instruction language."""
