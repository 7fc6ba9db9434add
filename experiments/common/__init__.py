"""What the commands of ``experiments/`` share (this package holds no command).

- :mod:`~experiments.common.cli`: one-line errors, list flags, the exit-status rule;
- :mod:`~experiments.common.grid`: a grid of runs built as configs, trained, reported;
- :mod:`~experiments.common.reports`: statistics over seeds, tables, plots, CSV/JSON;
- :mod:`~experiments.common.run_dir`: fresh run directories, ``--update-results``;
- :mod:`~experiments.common.benchmarking`: timing, compiled memory, simulated devices;
- :mod:`~experiments.common.memory_report`: the memory sweep's tables and plot;
- :mod:`~experiments.common.planning`: what the memory planners share (sizes, the search);
- :mod:`~experiments.common.streamed_plan`: the streamed step's memory plan (``plan --stream``);
- :mod:`~experiments.common.scaling`: McCandlish's fit of steps and examples to a target;
- :mod:`~experiments.common.study`: the batch-size study's runs, rate choice and report;
- :mod:`~experiments.common.budget`: its fixed-budget stage (accuracy at equal examples);
- :mod:`~experiments.common.arms`: its arms (hard batches, a negative queue);
- :mod:`~experiments.common.rate_edges`: its check of rates chosen at an end of the grid;
- :mod:`~experiments.common.stages`: running a stage of the study;
- :mod:`~experiments.common.stage_plots`: the stages' plots.
"""
