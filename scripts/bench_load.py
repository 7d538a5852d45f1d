"""How fast, and in how much host memory, the fast engine loads a real-sized checkpoint (loader.py).

    python scripts/bench_load.py --dir /data/rand-8b                 # Llama-3.1-8B-shaped, bf16, on the GPUs
    python scripts/bench_load.py --dir OUT/tiny --smoke             # a tiny shape on the CPU (checks the logic)

1. Writes a random checkpoint of Llama-3.1-8B's shape (32 layers, d 4096, 32 heads / 8 KV heads, MLP 14336,
   vocabulary 128256; ~16 GB in bf16) in several shards to --dir, unless one is there already (--rewrite).
2. Measures the disk: reads every shard once, sequentially, in 64 MB blocks. The files' pages are first
   dropped from the page cache with posix_fadvise(DONTNEED) (no root needed for a file we wrote and synced);
   "evicted" says whether that took (a second, cached read is reported next to it).
3. Loads the checkpoint through the streaming loader in a fresh process for --tp 1 and, when two GPUs are
   visible, --tp 2 (a tensor-parallel target: every rank reads its own slices), again after dropping the
   cache. Each rank reports its load time and its peak host memory above what it held before loading.
4. Prints one JSON object, with the goals: peak host memory <= 4 GB above the baseline, load time <= 1.5x
   the time to read the files sequentially.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_8B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072)
SMOKE = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=768, vocab_size=4096, max_position_embeddings=4096)
GOAL_RSS_BYTES = 4e9
GOAL_TIME_RATIO = 1.5


def config(shape: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
            "eos_token_id": 128001, "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192}, **shape}


def tensor_shapes(c: dict) -> dict:
    d, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    D = c["head_dim"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    out = {"model.embed_tokens.weight": (V, d)}
    for i in range(c["num_hidden_layers"]):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out.update({f"model.layers.{i}.input_layernorm.weight": (d,), a + "q_proj.weight": (q, d),
                    a + "k_proj.weight": (kv, d), a + "v_proj.weight": (kv, d), a + "o_proj.weight": (d, q),
                    f"model.layers.{i}.post_attention_layernorm.weight": (d,), m + "gate_proj.weight": (I, d),
                    m + "up_proj.weight": (I, d), m + "down_proj.weight": (d, I)})
    out.update({"model.norm.weight": (d,), "lm_head.weight": (V, d)})
    return out


def write_checkpoint(path: Path, shape: dict, shards: int, seed: int = 0) -> None:
    """Random bf16 weights (norms near 1, matrices ~N(0, 0.02)), split into `shards` files of similar size."""
    import torch
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    c = config(shape)
    shapes = tensor_shapes(c)
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    gen = torch.Generator().manual_seed(seed)
    groups, current, size = [], {}, 0
    for name, s in shapes.items():
        current[name] = s
        size += torch.Size(s).numel() * 2
        if size >= total / shards and len(groups) < shards - 1:
            groups.append(current)
            current, size = {}, 0
    groups.append(current)
    weight_map = {}
    for n, group in enumerate(groups, start=1):
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, s in group.items():
            t = torch.empty(s, dtype=torch.float32)
            if len(s) == 1:
                t.normal_(1.0, 0.1, generator=gen)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            tensors[name] = t.to(torch.bfloat16)
            del t
            weight_map[name] = fname
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(c, indent=2))
    for f in path.glob("*.safetensors"):      # on disk, so that the page cache can let the pages go
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())


def evict(files) -> None:
    """Drop the files' pages from the page cache (clean pages of files we may open: no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_seconds(files, block=64 << 20) -> float:
    buf = bytearray(block)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


def measure_disk(files) -> dict:
    total = sum(Path(f).stat().st_size for f in files)
    evict(files)
    cold = read_seconds(files)
    warm = read_seconds(files)
    # If the eviction did not take, the first read came from memory too: the two speeds are then alike.
    return dict(bytes=total, seconds=round(cold, 3), gbps=round(total / cold / 1e9, 3),
                cached_seconds=round(warm, 3), cached_gbps=round(total / warm / 1e9, 3), evicted=cold > 1.5 * warm)


def child(args) -> None:
    """One load in this fresh process; prints its record as JSON on the last line of stdout."""
    import torch

    from ssd_engine import loader
    import ssd_fast
    from ssd_engine import fast_model
    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        for i in range(args.tp):      # the CUDA contexts exist before the baseline
            torch.empty(1, device=f"cuda:{i}")
    ops = fast_model.Ops(use_triton=on_gpu)
    try:   # reset the peak resident size so that it measures the load alone (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    ckpt = loader.Checkpoint(args.dir)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.tp == 1:
        model = ckpt.fast_model(args.device, dtype, ops)
        engine = ssd_fast.Engine(model, None, device=args.device, dtype=dtype, cuda_graphs=False, linear="torch",
                                 log=lambda *a: None)
    else:
        engine = ssd_fast.Engine(ckpt, None, device=args.device, dtype=dtype, tp=args.tp, cuda_graphs=False,
                                 linear="torch", log=lambda *a: None)
    seconds = time.perf_counter() - t0
    tokens = engine.generate([[1, 2, 3, 4, 5]], mode="ar", max_new_tokens=4).tokens[0]
    engine.close()
    ranks = [dict(rank=r["rank"], seconds=r["seconds"], bytes=r["bytes"], tensors=r["tensors"],
                  host_peak_above_baseline=(r["host_rss_peak"] - r["host_rss_before"])
                  if r["host_rss_peak"] is not None else None) for r in ckpt.loads]
    print(json.dumps(dict(tp=args.tp, device=args.device, dtype=args.dtype, seconds=round(seconds, 3), ranks=ranks,
                          greedy_tokens=tokens)))


def measure_load(args, tp: int, files) -> dict:
    evict(files)
    cmd = [sys.executable, __file__, "--child", "--dir", str(args.dir), "--tp", str(tp), "--device", args.device,
           "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return dict(tp=tp, status="failed", error=proc.stderr[-3000:])
    return dict(status="ok", **json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="where the random checkpoint is (or is written)")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (float32): checks the logic")
    ap.add_argument("--rewrite", action="store_true", help="write the checkpoint even if --dir holds one")
    ap.add_argument("--shards", type=int, default=4, help="files the checkpoint is split into (default 4)")
    ap.add_argument("--tp", type=int, nargs="*", help="tensor-parallel sizes to load with (default: 1, and 2 when "
                                                      "two GPUs are visible; --smoke: 1 and 2 over gloo)")
    ap.add_argument("--device", help="default: cuda:0 when a GPU is visible, else cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args.device = args.device or ("cuda:0" if gpus and not args.smoke else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.child:
        args.tp = args.tp[0]
        child(args)
        return 0
    shape = SMOKE if args.smoke else LLAMA_8B
    if args.rewrite or not (args.dir / "config.json").is_file():
        t0 = time.perf_counter()
        write_checkpoint(args.dir, shape, args.shards)
        print(f"wrote {args.dir} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    files = sorted(str(f) for f in args.dir.glob("*.safetensors"))
    disk = measure_disk(files)
    tps = args.tp or ([1, 2] if args.smoke or gpus >= 2 else [1])
    loads = [measure_load(args, tp, files) for tp in tps]
    for load in loads:
        if load["status"] != "ok":
            continue
        peaks = [r["host_peak_above_baseline"] for r in load["ranks"] if r["host_peak_above_baseline"] is not None]
        load["host_peak_above_baseline_max"] = max(peaks) if peaks else None
        load["gbps"] = round(disk["bytes"] / load["seconds"] / 1e9, 3)
        load["time_over_read"] = round(load["seconds"] / disk["seconds"], 3)
        load["goals"] = dict(host_memory=bool(peaks) and max(peaks) <= GOAL_RSS_BYTES,
                             time=load["seconds"] <= GOAL_TIME_RATIO * disk["seconds"])
    out = dict(checkpoint=str(args.dir), shape=shape, smoke=args.smoke, torch=torch.__version__,
               gpu=torch.cuda.get_device_name(0) if gpus else None, disk=disk, loads=loads,
               note="disk.seconds: one sequential read of every shard after dropping them from the page cache "
                    "(posix_fadvise; disk.evicted says whether it took); load seconds: the engine built on the "
                    "device from the same cold files, in a fresh process")
    print(json.dumps(out, indent=2))
    return 0 if all(load["status"] == "ok" for load in loads) else 1


if __name__ == "__main__":
    sys.exit(main())
