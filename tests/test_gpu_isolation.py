"""The engine next to other GPU code in one process: transformers' compiled static-cache `generate` (CUDA graphs
of torch.compile, which own the default CUDA generator's graph-safe state and a private memory pool) runs first,
then the engine's AR, SD and SSD, graphs on. A benchmark once died here with an illegal memory access; the
engine must neither rely on the default generator nor on memory it does not own."""
import pytest
import torch

import ssd
import ssd_fast
from conftest import make_checkpoint


@pytest.mark.gpu
def test_engine_after_compiled_transformers_generate(tmp_path):
    path, hf = make_checkpoint(tmp_path / "t", seed=5, logit_scale=4.0)
    hf = hf.to("cuda", torch.bfloat16)
    ids = torch.tensor([[5, 17, 3, 88, 41]], device="cuda")
    for _ in range(2):      # compiled, with CUDA graphs (transformers' static cache compiles its forward)
        hf.generate(ids, max_new_tokens=24, do_sample=True, cache_implementation="static", pad_token_id=0)
    torch.cuda.synchronize()
    target = ssd.load_model(path)
    engine = ssd_fast.Engine(target, target, device="cuda", dtype=torch.float32)
    ar = engine.generate([[5, 17, 3, 88, 41], [1, 2]], mode="ar", max_new_tokens=24, eos_token_id=[]).tokens
    for mode in ("sd", "ssd"):
        for t in (0.0, 1.0):
            out = engine.generate([[5, 17, 3, 88, 41], [1, 2]], mode=mode, k=3, max_new_tokens=24, eos_token_id=[],
                                  temperature=t, seed=1)
            torch.cuda.synchronize()
            if t == 0:
                assert out.tokens == ar, mode
    hf.generate(ids, max_new_tokens=8, do_sample=True, cache_implementation="static", pad_token_id=0)
    torch.cuda.synchronize()
