"""Adapters that let other frameworks use the Few-Shot Bot."""
