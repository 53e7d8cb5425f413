"""One process of the 2-process CPU test (`tests/test_multihost.py`), started by `python -m glm_jax.launch`:

    python -m glm_jax.launch --nproc 2 --module tests.multihost_worker -- --out DIR --torch-dir DIR

Each process: `distributed.initialize()` from the launcher's environment (gloo collectives); a mesh of the 2
processes' devices on `fsdp` (params and optimizer state split across processes); the tiny DiT case of
`tests/test_sharding.py` with the train state placed from the same seed on both; its own 4 of the 8 samples
(`process_rows`, `host_to_global`); 3 sharded update steps; an orbax checkpoint of the sharded state (each
process writes its shards); a restore into a fresh sharded target; one more step from the live and from the
restored state. Then a sharded load of a torch-layout directory, recording the slices each process reads.
Process 0 writes the gathered results to `DIR/result.npz`; every process writes `DIR/reads_<i>.json`.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from glm_jax import distributed


def gathered(tree) -> list[np.ndarray]:
    """Every leaf of a tree of global arrays as a full host array (on every process)."""
    import jax
    from jax.experimental import multihost_utils
    return [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(tree)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--torch-dir", required=True)
    args = ap.parse_args(argv)
    env = distributed.initialize()
    import jax

    from glm_jax import sharding as S
    from glm_jax.sharded_load import load_torch_sharded, module_shardings
    from glm_jax.train_checkpoint import TrainCheckpointer
    from tests.test_sharding import dit_case, flat_params

    pid = jax.process_index()
    assert env is not None and jax.process_count() == 2 and jax.device_count() == 2, (env, jax.devices())
    mesh = S.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    spec, ts, batch, _ = dit_case()
    ts = S.shard_train_state(ts, mesh)
    rows = distributed.process_rows(batch.steps.shape[0])
    gbatch = S.host_to_global(S.select_rows(jax.device_get(batch), rows), mesh)
    mine = distributed.local_rows(gbatch.advantages)
    assert mine[0] == rows and np.array_equal(mine[1], np.asarray(batch.advantages)[rows])
    assert np.array_equal(distributed.gather_rows(mine[1] * 2), np.asarray(batch.advantages) * 2)  # host rewards
    step = S.ShardedUpdate("dit", spec, mesh, ts)
    losses = []
    for _ in range(3):
        ts, m = step.update(ts, gbatch)
        losses.append(float(m["loss"]))
    split = [x for x in jax.tree.leaves(ts.dit.params) if not x.sharding.is_fully_replicated]
    assert split and all(not x.is_fully_addressable for x in split)

    def saved(t):
        return {"step": t.step, "rng": jax.random.key_data(t.rng), "params": t.dit.params,
                "opt_state": t.dit.opt_state}

    ckpt = TrainCheckpointer(os.path.join(args.out, "ckpt"), every=1, async_save=False)
    ckpt.save(3, saved(ts), {"losses": losses}, force=True)
    ckpt.wait()
    fresh = S.shard_train_state(dit_case()[1], mesh)            # a new target with the same shardings
    step_no, restored, meta = ckpt.restore(saved(fresh))
    ckpt.close()
    ts_r = fresh._replace(step=restored["step"], rng=jax.random.wrap_key_data(restored["rng"]),
                          dit=fresh.dit._replace(params=restored["params"], opt_state=restored["opt_state"]))
    for a, b in zip(jax.tree.leaves(ts_r), jax.tree.leaves(ts)):
        assert a.sharding == b.sharding
    ts4, m4 = step.update(ts, gbatch)
    ts4_r, m4_r = step.update(ts_r, gbatch)

    reads = []
    _, dit = load_torch_sharded(args.torch_dir, mesh, reads=reads)
    want_sh = module_shardings(dit, mesh)
    for p, x in flat_params(dit).items():
        assert x.sharding == want_sh[p], p
    with open(os.path.join(args.out, f"reads_{pid}.json"), "w") as f:
        json.dump([[r.key, r.index, r.nbytes] for r in reads], f)

    out = {"losses": np.asarray(losses + [float(m4["loss"])]), "loss_restored": float(m4_r["loss"]),
           "step_restored": step_no, "meta_losses": np.asarray(meta["losses"])}
    live, resumed = gathered(ts4.dit.params), gathered(ts4_r.dit.params)
    loaded = flat_params(dit)
    loaded = dict(zip(loaded, gathered(list(loaded.values()))))
    if pid == 0:
        np.savez(os.path.join(args.out, "result.npz"), **out,
                 **{f"live_{i}": x for i, x in enumerate(live)}, **{f"resumed_{i}": x for i, x in enumerate(resumed)},
                 **{f"loaded:{k}": x for k, x in loaded.items()})
    distributed.sync("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
