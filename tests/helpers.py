"""Helpers the test files share (imported as `helpers`; tests/ is on pytest's path)."""

from __future__ import annotations

from contextlib import contextmanager


def run_search(**flags):
    """compress search through the API, with the flags as the command line takes them."""
    from compress.options.commands import to_groups
    from compress.search.run import search

    return search(**to_groups("search", flags))


@contextmanager
def callbacks_for_runs(*callbacks):
    """Lightning callbacks for every run started inside the block, through the CLI too: passed to run_training in
    its hooks, as compress search passes its pruning callback."""
    from compress.engine import run

    real = run.run_training

    def with_hooks(plan, models, task, cfg, tracking, hooks=None):
        hooks = hooks or run.RunHooks()
        return real(plan, models, task, cfg, tracking, run.RunHooks([*hooks.callbacks, *callbacks], hooks.tags))

    run.run_training = with_hooks
    try:
        yield
    finally:
        run.run_training = real
