"""The LALB experiment's simulator, workload, measurements and live driver (see ``bench/lalb.py``)."""
