"""Spectral analysis of the weight changes."""
