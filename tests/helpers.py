"""Helpers the test files share (imported as `helpers`; tests/ is on pytest's path)."""

from __future__ import annotations


def run_search(**flags):
    """compress search through the API, with the flags as the command line takes them."""
    from compress.options.commands import to_groups
    from compress.search.run import search

    return search(**to_groups("search", flags))
