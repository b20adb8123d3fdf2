"""dpobench's built-in loss variants, installed as the import package ``dpobench_plugins``.

Each module is an ordinary dpobench plugin: a ``register_losses`` hook implementation, found
through the ``dpobench`` entry-point group exactly as a third-party package is.
"""
