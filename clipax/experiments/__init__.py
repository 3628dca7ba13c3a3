"""The demo's experiments: small, seeded, CPU-sized runs that show what clipping does.

Each module has the same interface, shared by ``python -m clipax demo`` and the notebooks:

- ``Config``: a frozen dataclass of sizes and hyperparameters, with ``Config.quick()`` for a
  small version;
- ``run(config, *, seeds=..., progress=True) -> dict``: every number, JSON-serialisable;
- ``table(result) -> str``: a markdown table;
- ``plot(result, out_dir) -> list[pathlib.Path]``: PNG files (matplotlib, Agg backend).

Experiments:

- :mod:`clipax.experiments.imbalance`: a rare class yanking the weights of a tiny classifier
  trained with batch size 1, with and without ``clip_by_global_norm(1.0)``;
- :mod:`clipax.experiments.cliff`: gradient descent on a 2-D valley that meets a cliff, without
  clipping, with norm clipping and with value clipping;
- :mod:`clipax.experiments.spiky_lm`: a small Flax NNX transformer trained with AdamW on a
  synthetic Markov corpus with injected bad batches, one arm per clipper.

The private modules hold what the experiment modules re-export or share: ``_common`` (seed lists,
JSON numbers, markdown tables, progress bars, pyplot and saving figures), ``_imbalance_train`` and
``_imbalance_plot`` (the imbalance training and figures), ``_spiky_lm_model`` and
``_spiky_lm_plot`` (the spiky-LM corpus and model, and its figure).

The library modules never import this package; it needs ``flax`` (spiky_lm), ``matplotlib`` and
``tqdm`` (the ``demo`` extra), imported lazily so that importing it costs nothing.
"""

EXPERIMENTS = ("imbalance", "cliff", "spiky-lm")
"""The experiment names used by the command line, in the order ``all`` runs them."""

MODULES = {"imbalance": "imbalance", "cliff": "cliff", "spiky-lm": "spiky_lm"}
"""Command-line name -> module name inside :mod:`clipax.experiments`."""

__all__ = ["EXPERIMENTS", "MODULES", "cliff", "imbalance", "spiky_lm"]


def __getattr__(name):
  if name in ("cliff", "imbalance", "spiky_lm"):
    import importlib

    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
