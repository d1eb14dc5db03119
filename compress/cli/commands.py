"""The commands as jsonargparse sees them: one function a command with the flat flags of `options.commands`, which
turns its flags into config groups once, calls the API and prints what the API returns for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from compress.infra.errors import stop_said
from compress.options.commands import docstring, signature, to_groups


def _adapter(name: str, step: Callable, prints_json: bool = False) -> Callable:
    """A function whose signature and docstring are the command's flags (for the parser and --help), calling `step`
    with the groups they make."""

    def command(**flags):
        result = step(**to_groups(name, flags))
        if prints_json and result is not None:  # stdout: one JSON line for scripts; the table went to stderr
            print(json.dumps(result.report))
        return result

    command.__name__ = command.__qualname__ = name
    command.__signature__ = signature(name)
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    command.__doc__ = docstring(name)
    return command


def _search_stopped_says_how_to_go_on(search: Callable, name: str = "search") -> Callable:
    """A search (or auto) stopped by Ctrl-C or SIGTERM: exit 130 (143) with the line saying how to continue, which
    is to run the same command again (the CLI's usual hint, --resume, is not a search flag)."""
    import functools

    @functools.wraps(search)
    def stopped(**groups):
        try:
            return search(**groups)
        except KeyboardInterrupt as stop:
            said, code = stop_said(stop)
            if not getattr(stop, "reported", False):  # stopped before its study had a parent run to close
                print(f"compress: {name} {said}; rerun the same command to continue", file=sys.stderr)
            raise SystemExit(code) from None

    return stopped


def _unmet_budget_fails(auto: Callable) -> Callable:
    """compress auto with no trial meeting the budget: its report is written, and the command fails with the line
    naming the constraint that bound and the closest trial."""
    import functools

    from compress.infra.errors import CompressError

    @functools.wraps(auto)
    def judged(**groups):
        result = auto(**groups)
        if not result.met:
            raise CompressError(f"no trial meets the budget: {result.verdict} (report: {result.report})")
        return result

    return judged


def commands() -> dict[str, Callable]:
    """Every command by name, in `compress --help` order; the step modules import their heavy libraries inside."""
    from compress.cli.ui import ui
    from compress.search.auto import auto
    from compress.search.run import search
    from compress.steps.bench import bench
    from compress.steps.distill import distill
    from compress.steps.evaluate import evaluate
    from compress.steps.export import export
    from compress.steps.finetune import finetune
    from compress.steps.prune import prune
    from compress.steps.share import share

    return {
        "distill": _adapter("distill", distill),
        "finetune": _adapter("finetune", finetune),
        "evaluate": _adapter("evaluate", evaluate, prints_json=True),
        "export": _adapter("export", export, prints_json=True),
        "bench": _adapter("bench", bench),
        "prune": _adapter("prune", prune),
        "share": _adapter("share", share),
        "search": _adapter("search", _search_stopped_says_how_to_go_on(search)),
        "auto": _adapter("auto", _search_stopped_says_how_to_go_on(_unmet_budget_fails(auto), "auto")),
        "ui": ui,
    }
