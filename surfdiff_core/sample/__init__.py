"""Guided generation into any cell and composition."""
