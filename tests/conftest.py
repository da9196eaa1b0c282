import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    """Every test runs torch on one thread: the models are tiny, so one thread is as fast, and far
    faster when other processes share the 2 cores (OpenMP threads spin-wait on each other). The
    torchrun workers run with OMP_NUM_THREADS=1 too, so in-process runs they are compared with
    differ from them only by the order of gradient sums across ranks (~1e-7), not by the
    matmul blocking that 2 threads change (~1e-6 after 3 Adam steps)."""
    import torch
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


@pytest.fixture(autouse=True)
def uncompiled_decode(monkeypatch):
    """grpo.py compiles the decode step's forward by default on a CPU; inductor's compile (~20 s
    the first time on a machine, again for each model shape) is not what these tests are about:
    in them the "compiled" forward is the plain one, unless a test installs another (the compile
    tests of tests/test_sample.py install dynamo's)."""
    import sample
    monkeypatch.setattr(sample, "_compiled", {"cpu": sample.decode_forward})


# the micro model of the sft/grpo tests: a few thousand parameters, every part of the real shape
MICRO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, mrope_section=[2, 3, 3], vision_depth=2, vision_hidden_size=32,
             vision_intermediate_size=64, vision_heads=2, fullatt_block_indexes=[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """Per test module: a micro checkpoint (random weights, tiny tokenizer) and a small easy data
    file of WORLD_ROWS rows (a module-level constant, default 20) with 56 px images."""
    import data
    root = tmp_path_factory.mktemp(request.module.__name__.split(".")[-1])
    ckpt, ds = str(root / "base"), str(root / "data")
    data.make_tiny_checkpoint(ckpt, seed=0, **MICRO)
    data.write_split(ds, n=getattr(request.module, "WORLD_ROWS", 20), level="easy", seed=0, image_size=56)
    return dict(root=root, model=ckpt, data=os.path.join(ds, "data.jsonl"))


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
