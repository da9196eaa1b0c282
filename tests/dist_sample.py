"""torchrun worker for tests/test_sample.py::test_fsdp2_two_processes_match_one.

    torchrun --nproc_per_node=2 --standalone tests/dist_sample.py CKPT_DIR PROMPTS.pt OUT.json

Loads the checkpoint, shards it with FSDP2 (fully_shard on every decoder layer and vision block,
then the root; gloo on CPU), and has each rank sample its contiguous share of the prompts (saved
by the test with torch.save) with keys = the global prompt indices: once at temperature 1 (seeded)
and once greedily. Rank 0 writes the gathered completions to OUT.json.

Also checks that the weights are all-gathered once per generate() call, not once per decode step:
the number of all-gather collectives in a call must not grow with max_new_tokens.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as M  # noqa: E402
import sample  # noqa: E402

SAMPLED = dict(n=2, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
GREEDY = dict(n=1, max_new_tokens=12, temperature=0.0)


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    for block in model.visual.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class CountAllGathers:
    """Counts the all-gather collectives (FSDP2 in torch 2.13 calls dist.all_gather_single; older
    versions dist.all_gather_into_tensor) while active."""
    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather")

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        self.saved = {}
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapped(*args, _fn=fn, **kwargs):
                self.calls += 1
                return _fn(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def rows(out):
    return [dict(tokens=out.tokens[r, :int(out.lengths[r])].tolist(), length=int(out.lengths[r]),
                 finished=bool(out.finished[r]), prompt=int(out.prompt_index[r]),
                 sample=int(out.sample_index[r])) for r in range(out.tokens.shape[0])]


def main():
    ckpt, prompts_path, out_path = sys.argv[1:4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    mesh = init_device_mesh("cpu", (world,))

    model = shard(M.load_model(ckpt).eval(), mesh)
    n_fsdp = sum(isinstance(m, FSDPModule) for m in model.modules())
    prompts = torch.load(prompts_path)
    per = -(-len(prompts) // world)
    mine = list(range(rank * per, min(len(prompts), (rank + 1) * per)))
    local = [prompts[i] for i in mine]
    stop_ids = sample.default_stop_ids(model.config)

    result = {}
    for name, kw in (("sampled", SAMPLED), ("greedy", GREEDY)):
        out = sample.generate(model, local, keys=mine, stop_ids=stop_ids, pad_id=0, **kw)
        result[name] = rows(out)
        for r in result[name]:
            r["prompt"] = mine[r["prompt"]]  # local -> global prompt index

    # weights gathered once per call: the collective count does not depend on the decode steps
    counts = {}
    for steps in (2, 10):
        with CountAllGathers() as c:
            out = sample.generate(model, local, keys=mine, max_new_tokens=steps, temperature=0.0,
                                  stop_ids=[])
        assert out.tokens.shape[1] == steps, out.tokens.shape
        counts[steps] = c.calls
    assert counts[2] == counts[10] == n_fsdp, f"all-gathers per generate: {counts}, FSDP modules: {n_fsdp}"
    # after generate the weights are sharded again (reshard() ran)
    from torch.distributed.tensor import DTensor
    assert all(isinstance(p, DTensor) for p in model.parameters())

    gathered = [None] * world
    dist.all_gather_object(gathered, dict(result=result, counts=counts, n_fsdp=n_fsdp))
    if rank == 0:
        merged = {name: [r for g in gathered for r in g["result"][name]] for name in result}
        merged["all_gather_counts"] = [g["counts"] for g in gathered]
        merged["n_fsdp_modules"] = n_fsdp
        with open(out_path, "w") as f:
            json.dump(merged, f)
    dist.barrier()  # leave together: a rank tearing gloo down while its peer still works aborts
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
