"""Distributed ablation sweeps for mechanistic interpretability (entry scripts + engine)."""
