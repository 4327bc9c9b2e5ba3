"""Distill-and-export pipeline: stages, CLI, data and the shared training engine."""
