"""The engine the sweep scripts share: models, effects (math), tasks wiring, plan, store, executors."""
