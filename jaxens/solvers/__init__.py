"""Solvers for the softmax-bottleneck problem (one algorithm per file)."""
