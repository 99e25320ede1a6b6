"""Evaluation commands (`fsb eval ...`) over the shared development data."""
