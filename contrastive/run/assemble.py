"""A run's parts, built in order from its config: mesh -> data -> model -> shard -> step.

:func:`setup` turns a :class:`~contrastive.configs.Config` into a :class:`Setup` (the mesh, the
data pipeline and evaluation arrays, the model's graphdef and placed train state, the dropout
key and the jitted step), raising every configuration error as a one-line
:class:`~contrastive.configs.ConfigError` before anything long starts. The loop
(:mod:`contrastive.run.loop`) trains it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

import losses
from contrastive.configs import Config, ConfigError
from contrastive.data import HashTokenizer, captioned_shapes, get_spec, text
from contrastive.data.pipeline import DatasetSpec
from contrastive.inputs.splits import run_data
from contrastive.inputs.step_inputs import BatchInputs, StepInputs
from contrastive.loss_registry import STATEFUL_LOSSES
from contrastive.measure.evaluate import evaluate_model
from contrastive.mesh import make_mesh, place_params
from contrastive.models import DualEncoder, TextTransformer, make_image_encoder
from contrastive.models.locked_tower import BagOfWordsText, LockedFeatures
from contrastive.step.example_states import ExampleOrder, init_example_state, with_example_ids
from contrastive.step.negative_queue import check_queue_length, init_queue
from contrastive.step.optim import make_optimizer
from contrastive.step.train_step import Batch, create_train_state, make_train_step, place_state

__all__ = ["Setup", "setup", "build_model", "text_shape", "batch_builder", "evaluate_untrained"]


def build_model(cfg: Config, spec: DatasetSpec, *, feature_width: int | None = None) -> DualEncoder:
    """The dual encoder for ``cfg``: one tower on two views, or image + text towers.

    ``feature_width``: the image tower is locked and its inputs are its features of this
    width (:class:`~contrastive.models.locked_tower.LockedFeatures`); only the heads, the text
    tower, the temperature and the bias train.
    """
    m = cfg.model
    rngs = nnx.Rngs(cfg.run.seed)
    if feature_width is not None:
        image_tower = LockedFeatures(feature_width)
    else:
        s, c = spec.image_size, spec.channels
        shape = (s * s * c,) if m.encoder == "mlp" else (s, s, c)
        image_tower = make_image_encoder(
            m.encoder, shape, width=m.width, depth=m.depth, dropout_rate=m.dropout, rngs=rngs
        )
    text_tower = None
    if spec.kind == "image_text":
        vocab, length = text_shape(cfg, spec)
        text_cls = BagOfWordsText if m.text_tower == "bag-of-words" else TextTransformer
        text_tower = text_cls(vocab, length, dropout_rate=m.dropout, rngs=rngs)
    return DualEncoder(
        image_tower,
        text_tower,
        embed_dim=m.embed_dim,
        head_hidden=m.head_hidden,
        init_temperature=cfg.init_temperature,
        init_bias=cfg.init_bias,
        learn_temperature=m.learn_temperature,
        max_inverse_temperature=m.max_inverse_temperature,
        rngs=rngs,
    )


def text_shape(cfg: Config, spec: DatasetSpec) -> tuple[int, int]:
    """(vocabulary size, caption length): the flags', else the data set's, else hashed words'
    (:func:`contrastive.data.text.text_shape`)."""
    m = cfg.model
    try:
        return text.text_shape(m.vocab_size, m.text_len, spec.vocab_size, spec.text_len)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def batch_builder(cfg: Config, spec: DatasetSpec, mesh: jax.sharding.Mesh):
    """``f(host batch, step) -> Batch``: this host's rows of the step's global batch.

    Image data: the two views. Image-text: images and captions; with ``--hard-negatives
    K`` also K captions one attribute away from each image's own (``shapes``), laid out as
    the ring loss reads them (each device: its captions, then their hard negatives); with
    ``--skip-duplicate-negatives`` or ``--hard-batches`` the caption ids, so that equal
    captions are not negatives (hard batches gather near-identical captions).
    """
    d = cfg.data
    if spec.kind == "image":
        return lambda host, step: Batch(host["view1"], host["view2"])
    local_devices = len(mesh.local_devices)
    seed = cfg.run.seed

    def build(host: dict, step: int) -> Batch:
        text, ids = host["text"], host.get("caption_id")
        if d.hard_negatives:
            b = len(text)
            first = jax.process_index() * b  # global row of this host's first example
            extra = [
                captioned_shapes.one_attribute_apart(
                    ids[i : i + 1], d.hard_negatives, np.random.default_rng([seed, step, first + i])
                )
                for i in range(b)
            ]
            k = d.hard_negatives
            tokens = np.concatenate([t for t, _ in extra])  # [b, K, L]
            extra_ids = np.concatenate([n for _, n in extra])  # [b, K]
            # Each device: its captions, then their hard negatives (the ring losses' layout).
            text = np.asarray(losses.interleave(text, tokens.reshape(b * k, -1), local_devices))
            ids = np.asarray(losses.interleave(ids, extra_ids.reshape(b * k), local_devices))
        keep_ids = d.skip_duplicate_negatives or d.hard_batches
        return Batch(host["image"], text, ids=ids if keep_ids else None)

    return build


@dataclasses.dataclass
class Setup:
    """What a run is made of, built in order: mesh -> data -> model -> shard -> step."""

    mesh: jax.sharding.Mesh
    spec: DatasetSpec
    make_inputs: Callable[[], StepInputs]  # a fresh source of every step's input
    eval_data: dict
    graphdef: nnx.GraphDef
    state: Any  # TrainState, placed on the mesh
    key: jax.Array
    step_fn: Any  # (state, input from make_inputs, key) -> (state, metrics)
    dataset: str
    # What the checkpoints must agree on beyond the settings: the device count and the
    # digests of the inputs the run did not compute (RunData.inputs).
    inputs: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 0  # the global batch make_inputs and step_fn are built for
    # (batch size, peak learning rate) -> this run at another batch and rate (--adaptive-batch)
    _resize: Callable[[int, float], Setup] | None = None

    def resize(self, batch_size: int, learning_rate: float) -> Setup:
        """This run with its inputs and step for another global batch and peak learning
        rate: the same model, data order, evaluation and state (the optimiser's state fits
        both), a step compiled for the new shapes (``--adaptive-batch``)."""
        if self._resize is None:
            raise ValueError("this run's inputs are built for one batch size")
        return self._resize(batch_size, learning_rate)

    def evaluate(self, params: Any, only: str | None = None) -> dict[str, float]:
        """The evaluation metrics of the model with ``params`` (see ``evaluate_model``)."""
        return evaluate_model(
            self.graphdef, params, self.spec, self.eval_data, self.mesh, self.dataset, only=only
        )


def run_tokenizer(cfg: Config, spec: DatasetSpec) -> HashTokenizer:
    """The run's caption tokenizer: the model's vocabulary and text length (defaults when
    the data set brings its own tokens or has no text)."""
    vocab, length = text_shape(cfg, spec) if spec.kind == "image_text" else (None, None)
    return text.run_tokenizer(vocab, length, spec.kind)


def setup(cfg: Config) -> Setup:
    """Build everything up to the jitted step (nothing compiled yet).

    Every configuration error surfaces here as a :class:`ConfigError`, before any long work.
    """
    # --- config: the checks that need the devices ----------------------------------------
    devices = jax.devices()
    n_dev = cfg.run.num_devices or len(devices)
    if n_dev > len(devices):
        raise ConfigError(f"--num-devices {n_dev} but only {len(devices)} devices are present")
    cfg.check_devices(n_dev)
    stateful = cfg.train.loss.name in STATEFUL_LOSSES  # per-example state (global-infonce)
    if cfg.run.noise_scale_every and stateful:
        raise ConfigError(
            f"--loss {cfg.train.loss.name} does not combine with --noise-scale-every (the "
            "meter's extra gradients would need the per-example state too); drop one"
        )
    if cfg.run.noise_scale_every and (cfg.train.stream or cfg.data.hard_batches):
        flag = "--stream" if cfg.train.stream else "--hard-batches"
        raise ConfigError(
            f"{flag} does not combine with --noise-scale-every: the noise meter draws whole "
            "random batches of the run's size; drop one"
        )

    # --- mesh ----------------------------------------------------------------------------
    mesh = make_mesh(num_devices=n_dev)

    # --- data ------------------------------------------------------------------------------
    d = cfg.data
    spec = get_spec(d.dataset, d.image_size)
    tokenizer = run_tokenizer(cfg, spec)
    try:
        data = run_data(cfg, spec, tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    eval_data = data.eval
    if cfg.run.adaptive_batch and cfg.run.max_batch_size > data.num_train:
        raise ConfigError(
            f"--max-batch-size {cfg.run.max_batch_size} is more than the {data.num_train} "
            "training examples: lower it"
        )
    make_batch = batch_builder(cfg, spec, mesh)
    if stateful:  # each row's index in the training set, for the per-example state
        order = ExampleOrder(data.num_train, cfg.run.seed, data.examples.order)
        make_batch = with_example_ids(make_batch, order, cfg.run.batch_size)
    if d.hard_batches:  # one line before anything is built
        from contrastive.inputs.hard_batch_inputs import check_hard_batches

        check_hard_batches(
            num_examples=data.num_train,
            batch_size=cfg.run.batch_size,
            cluster_size=d.cluster_size,
            cluster_tower=d.cluster_tower,
            kind=spec.kind,
        )
        from contrastive.inputs.hard_batches import first_hard_step

        first = first_hard_step(data.num_train, cfg.run.batch_size, d.refresh_every)
        if first > cfg.steps:  # else every batch is random, and a "hard" run is not one
            raise ConfigError(
                f"--hard-batches: the first hard batch is step {first} (the first clustering, "
                f"due after --refresh-every {d.refresh_every} steps, takes effect at the next "
                f"epoch start) but --steps is {cfg.steps}: every batch would be random; raise "
                "--steps or lower --refresh-every"
            )

    def make_inputs() -> StepInputs:
        # Called by the loop once the model exists (graphdef below), once per run.
        if cfg.train.stream:  # chunks read twice, never the whole batch
            from contrastive.step.streamed.inputs import streamed_inputs

            return streamed_inputs(cfg, data, make_batch, mesh)
        if cfg.data.hard_batches:  # whole clusters of similar examples
            from contrastive.inputs.hard_batch_inputs import hard_batch_inputs

            return hard_batch_inputs(cfg, data, make_batch, mesh, graphdef, tokenizer=tokenizer)
        return BatchInputs(data.train, make_batch, mesh)

    # --- model -----------------------------------------------------------------------------
    try:
        model = build_model(cfg, spec, feature_width=data.feature_width)
    except ValueError as e:  # e.g. a ViT patch that does not divide the image
        raise ConfigError(str(e)) from e
    tx = make_optimizer(cfg.train.optim)
    graphdef, state = create_train_state(model, tx)
    k = cfg.train.negative_queue
    if k:  # past embeddings of the second tower, each device its own rows
        try:
            check_queue_length(k, cfg.run.batch_size, data.num_train)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        rows = cfg.run.batch_size // n_dev
        state = state._replace(queue=init_queue(k, rows, cfg.model.embed_dim, devices=n_dev))
    if stateful:  # log u (and τ_i) per training example, rows split over the devices
        examples = init_example_state(
            data.num_train, cfg.train.loss, devices=n_dev, init_temperature=cfg.init_temperature
        )
        state = state._replace(examples=examples)
    key = jax.random.key(cfg.run.seed + 1)  # dropout; the step folds in the step number

    # --- shard -----------------------------------------------------------------------------
    state = place_state(state, mesh, shard_optimizer=cfg.train.shard_optimizer)
    key = place_params(key, mesh)

    # --- step ------------------------------------------------------------------------------
    if cfg.train.stream:  # reads its input (a chunk source) twice, chunk by chunk
        from contrastive.step.streamed.inputs import streamed_step_fn

        step_fn = streamed_step_fn(graphdef, cfg.train, mesh, tx=tx)
    else:
        step_fn = make_train_step(graphdef, cfg.train, mesh, tx=tx)
    inputs = {"devices": int(mesh.devices.size), **data.inputs}
    resize = None
    if not (stateful or k or cfg.train.stream or d.hard_batches):  # else B is built in

        def resize(batch_size: int, learning_rate: float) -> Setup:
            # The same examples in the same order, cut into batches of the new size.
            examples = dataclasses.replace(data.examples, global_batch_size=batch_size)
            optim = dataclasses.replace(cfg.train.optim, learning_rate=learning_rate)
            train_cfg = dataclasses.replace(cfg.train, optim=optim)
            new_tx = make_optimizer(optim)
            return dataclasses.replace(
                built,
                make_inputs=lambda: BatchInputs(examples.batches(), make_batch, mesh),
                step_fn=make_train_step(graphdef, train_cfg, mesh, tx=new_tx),
                batch_size=batch_size,
            )

    built = Setup(
        mesh, spec, make_inputs, eval_data, graphdef, state, key, step_fn, d.dataset, inputs,
        batch_size=cfg.run.batch_size, _resize=resize,
    )  # fmt: skip
    return built


def evaluate_untrained(cfg: Config) -> dict[str, float]:
    """Evaluation of the randomly initialised model of ``cfg`` (the no-training baseline)."""
    s = setup(cfg)
    return s.evaluate(s.state.params)
