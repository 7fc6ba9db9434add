"""The batch-size study: steps to a target against batch size, by a protocol fixed in advance.

``python -m experiments.batch_size_study`` is its command (:mod:`experiments.batch_size_study`);
this package is its machinery. Every constant of the protocol below lives in
:mod:`experiments.study.protocol`, and the report prints them from the runs' own configs.

The protocol (version 2, fixed on 2026-12-07 before its first run; it replaces version 1,
whose review found a target on the small batches' plateau, rates at the end of their grid,
the tuning seed inside the means and a fit that hid its misses):

1. **Regime.** CLIP-style training on the generated ``shapes`` data set with the image tower
   locked (LiT/SigLiT, Zhai et al. 2022, 2023): an MLP pre-trained once on the five
   attributes, its features cached; a trainable head to 64-d; a bag-of-words text tower.
   Training examples ``[0, N)`` of the training split (N = 65,536 reduced, 131,072 full); a
   validation split of 4,096 examples carved right after them, **all of them scored**.
2. **Metric.** Validation zero-shot cross-entropy (``val_zero_shot_xent``): each validation
   image classified among all 5,184 class captions at a fixed temperature 0.05
   (:func:`contrastive.measure.evaluate.zero_shot_cross_entropy`). It moves smoothly and does not
   depend on B; top-1 is kept as a second column. Evaluations at the steps ``ceil(1.05^k)``.
3. **Optimiser.** AdamW (weight decay 1e-4, gradient norm clipped at 1), 10 warm-up steps,
   then constant. **Steps are counted after the warm-up** (``S = step - 10``).
4. **Targets** (the ``pilot`` stage). Per (loss, B), one pilot run on seed 1000 (never
   reported) at the rule's rate ``4e-3 * sqrt(B / 256)`` for ``max(500, 8 N / B)`` steps.
   Its plateau ``p`` is the median of the metric over the evaluations in the last 30 % of
   its steps, its evaluation noise ``sigma`` the standard deviation of successive
   differences there divided by sqrt(2). The level every cell clears with a margin of 3
   sigma is ``L = max over cells of (p + 3 sigma)``; the targets are ``L`` rounded up to a
   multiple of 0.05 nats (the harder) and that plus 0.5 nats (the easier). The report gives
   every cell's margin ``(T - p) / sigma``. A target a cell cannot clear is dropped.
5. **Rates.** Per (loss, B), the tuning seed 0 trains at ``2^k`` times the rule's rate for
   k = -4 .. 2. Per target the rate with the fewest steps is chosen (a run that missed the
   target counts as infinitely many; ties go to the smaller rate). While the choice is at an
   end of the grid, the grid grows by one factor of 2 beyond that end, up to 4 times per
   side; it stops when the choice is interior, when the new rate diverges or misses the
   target (the report says which), or at the limit.
6. **Seeds.** Seeds 1-5 train at each chosen rate; **the tuning seed is not in the means**.
   The runner-up rate's steps (seed 0) are reported beside the chosen one.
7. **Caps and censoring.** Every run of a cell stops at its harder target or at the cap
   ``max(200, 4 x the pilot's steps to the harder target)``. A run that reaches the cap is
   censored: a cell with a censored seed is a lower bound, shown as ">= S", and left out of
   the fit (whose curve is then checked against the bound).
8. **Fit.** McCandlish et al. 2018: ``S = S_min + E_min / B``, by least squares on ``log S``
   over the cells' geometric-mean steps, ``B_crit = E_min / S_min``; 90 % intervals from
   2,000 bootstrap resamples of the seeds within each cell; each point's measured / model
   ratio, flagged beyond 1.5x. The model does not describe a curve with a flagged point.
9. **Verdicts.** A comparison (two losses at one B; two B_crit) is called only where the
   90 % intervals separate; otherwise "not resolved at this precision".

The main job (no flag) trains seeds 1-5 at the committed reduced study's chosen rates for
the harder target and prints its table beside the committed one with each cell's
difference in units of the seeds' standard error: it reproduces within noise, or names the
cells that do not.

Modules: :mod:`~experiments.study.protocol` (the constants and rules),
:mod:`~experiments.study.harness` (a study's run directory, record, lock and runs),
:mod:`~experiments.study.targets`, :mod:`~experiments.study.tuning`,
:mod:`~experiments.study.fitting`, :mod:`~experiments.study.report`; the stages on the
committed study's targets and rates, each with its own rules fixed before its runs
(:mod:`~experiments.study.noise_scale`, :mod:`~experiments.study.small_batches`,
:mod:`~experiments.study.adaptive_batch`); the stages run at a version-1
study's rates (:mod:`~experiments.study.stages`: fixed budget, arms, rate edges, on the
rates of protocol version 1; see their modules).
"""
