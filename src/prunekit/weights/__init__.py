"""Pruning what a model is: its weights."""
