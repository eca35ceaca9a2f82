"""Plots (PNG): called by the layer that has the data."""
