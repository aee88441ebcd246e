"""Stages composed from pipeline pieces, and the CLI (outermost layer)."""
