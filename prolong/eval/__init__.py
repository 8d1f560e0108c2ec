"""HELMET evaluation: task definitions, generators, metrics, reports."""
