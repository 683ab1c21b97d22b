"""What runs the jobs: executors (Ray lives only in ``executors.py``), the results store and its
locations, model loading and its disk cache, pass sizing, provenance, the console."""
