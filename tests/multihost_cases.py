"""Inputs and loss options shared by the two-process test and its single-process twin."""

import numpy as np

CASES = {
    "infonce": ("infonce", {"temperature": 0.1}),
    "ntxent": ("infonce", {"temperature": 0.2, "intra_view": True, "block_size": 3}),
    "sigmoid": ("sigmoid", {"temperature": 0.1, "bias": -2.0}),
    "dclw": ("decoupled", {"temperature": 0.1, "sigma": 0.5}),
}


def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    y = (x + 0.5 * rng.standard_normal((32, 16))).astype(np.float32)
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    return norm(x), norm(y)


# --- the streamed gradient cache on two processes (tests/test_streamed_training.py) -------

# shapes (image-text, caption ids), SigLIP, dropout; 40 pairs on 4 devices in chunks of 12:
# 10 rows a device in chunks of 3, 3, 3, 1 (ragged); each host reads its 20 rows by chunk.
STREAMED_RUN = [
    "--dataset", "shapes", "--text-tower", "bag-of-words", "--skip-duplicate-negatives",
    "--loss", "sigmoid", "--model", "mlp", "--width", "16", "--embed-dim", "8",
    "--head-hidden", "none", "--dropout", "0.1", "--batch-size", "40", "--chunk-size", "12",
    "--learning-rate", "0.01", "--warmup-steps", "0", "--steps", "4", "--eval-examples", "8",
]  # fmt: skip


def _in_memory_step(s, config, batch):
    """``((loss, aux), grads, new state)`` of the in-memory step of setup ``s`` on a placed
    ``batch`` (one jitted program; the state is not donated)."""
    import jax

    from contrastive.step import train_step
    from contrastive.step.optim import make_optimizer

    tx = make_optimizer(config.optim)
    common = dict(graphdef=s.graphdef, config=config, mesh=s.mesh)

    @jax.jit
    def both(state, batch, key):
        folded = jax.random.fold_in(key, state.step)  # as the step folds it
        out = train_step.loss_and_grads(state.params, batch, folded, **common)
        return out, train_step.train_step(state, batch, key, tx=tx, **common)

    ((loss, aux), grads), (new_state, _) = both(s.state, batch, s.key)
    return (loss, aux), grads, new_state


def streamed_training_case(port: int, process_id: int, out: str, workdir: str) -> None:
    """One of two processes (2 CPU devices each, gloo): the first step of a run with and
    without ``--stream`` on the same global batch (:func:`contrastive.run.assemble.setup`, the
    run's own inputs). Process 0 writes to ``out`` (.npz) ``{memory,stream}/loss``,
    ``.../grads/i`` (the reduced gradients), ``.../params/i`` and ``.../new_params/i``
    (before and after the update), leaves in tree order."""
    import jax

    from contrastive.run import hosts

    hosts.start(f"127.0.0.1:{port}", 2, process_id, timeout_s=60)
    jax.config.update("jax_default_matmul_precision", "highest")

    from contrastive.configs import parse_config
    from contrastive.run import assemble

    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    args = [*STREAMED_RUN, "--workdir", workdir]
    results = {}
    for mode, extra in (("memory", []), ("stream", ["--stream"])):
        cfg = parse_config([*args, *extra])
        s = assemble.setup(cfg)
        inputs = s.make_inputs()
        batch, _ = inputs.for_step(1, s.state.params)
        params = jax.tree_util.tree_leaves(jax.device_get(s.state.params))
        if mode == "memory":  # the in-memory step and its gradients, one program
            (loss, _), grads, new_state = _in_memory_step(s, cfg.train, batch)
        else:  # the run's own step function: the streamed step
            (loss, _), grads = s.step_fn.loss_and_grads(s.state, batch, s.key)
            new_state, _ = s.step_fn(s.state, batch, s.key)
        inputs.close()
        results[f"{mode}/loss"] = np.asarray(loss)
        for name, leaves in (
            ("grads", jax.tree_util.tree_leaves(grads)),
            ("params", params),
            ("new_params", jax.tree_util.tree_leaves(new_state.params)),
        ):
            for i, a in enumerate(leaves):  # replicated: this process holds every entry
                results[f"{mode}/{name}/{i}"] = np.asarray(a)
    if process_id == 0:
        np.savez(out, **results)
    jax.distributed.shutdown()
