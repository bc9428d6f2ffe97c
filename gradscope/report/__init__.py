"""Reporters: they only read the history and the diagnoses."""
