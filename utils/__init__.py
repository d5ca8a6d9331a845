"""Shared machinery of the toolkit: data, triggers, poisoning, training, evaluation, records."""
