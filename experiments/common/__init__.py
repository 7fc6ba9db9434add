"""What the commands of ``experiments/`` share (this package holds no command).

- :mod:`~experiments.common.cli`: one-line errors, list flags, the exit-status rule;
- :mod:`~experiments.common.grid`: a grid of runs built as configs, trained, reported;
- :mod:`~experiments.common.reports`: statistics over seeds, tables, plots, CSV/JSON;
- :mod:`~experiments.common.run_dir`: fresh run directories, ``--update-results``;
- :mod:`~experiments.common.benchmarking`: timing, compiled memory, simulated devices;
- :mod:`~experiments.common.memory_report`: the memory sweep's tables and plot;
- :mod:`~experiments.common.planning`: what the memory planners share (sizes, the search);
- :mod:`~experiments.common.streamed_plan`: the streamed step's memory plan (``plan --stream``);
- :mod:`~experiments.common.device_measures`: the device check's measurements;
- :mod:`~experiments.common.soak_runs`, :mod:`~experiments.common.soak_checks`: the soak's
  interrupted runs and its comparison with the uninterrupted one.

The batch-size study's machinery is a package of its own: :mod:`experiments.study`.
"""
