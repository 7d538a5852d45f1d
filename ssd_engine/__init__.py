"""The fast engine, a file per concept. Its front door is ssd_fast.py; read ssd.py first, then, in this order:

  fast_model.py   the model layer: a checkpoint re-laid for speed, the Triton kernels or their references, KV caches
  graphs.py       CUDA graphs: the one capture utility, and the runner that replays a model's steps by shape
  batch.py        the batch's sequence state on the device: prefill, the commit of a round, the finish check
  sampling.py     ssd.py's sampling rules with no host synchronization
  rounds.py       the AR and SD rounds (ssd.ar_round, ssd.sd_round on the device)
  ssd_round.py    the SSD round, once for every layout (one graph on one GPU, or a draft side on a worker)
  run.py          the run loop: read-backs, pipelining, the running estimates, continuous batching
  policy.py       the rules that choose from the models' sizes, and the measured ones (--k auto)
  engine.py       the Engine: devices, models, random streams, caches; generate / stream / start
  tp.py, loader.py                  a tensor-parallel target; checkpoints streamed to the device
  bootstrap.py, report.py, cli.py, server.py   flags to a warm engine, what is reported, the command line, the server
"""
