"""The fast engine, a file per concept (read in this order after ssd.py):

  fast_model.py   the model layer: a checkpoint re-laid for speed, the kernels or their references, KV caches
  ...
"""
