"""Combiners: pure functions from member logits to a combined log-distribution."""
