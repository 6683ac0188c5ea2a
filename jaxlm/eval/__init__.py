"""Evaluation: task scoring (tasks.py, metrics.py)."""
