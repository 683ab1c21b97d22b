"""The math: one transformer forward with named intervention sites, and what the sweeps compute on it
(direct effects, scaling patches, attribution, circuit evaluation, the logit lens). No Ray, no files,
no devices policy: every function takes tensors (or a model's weights) and returns tensors."""
