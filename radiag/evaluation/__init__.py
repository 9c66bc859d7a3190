"""Evaluation: diagnosis metrics, rationale criteria and the run report."""
