"""compress: distil, share, prune, search and export BERT-family models.

The Python API is `compress.api`, and its steps are here too: `compress.distill(...)`, `compress.prune(...)`, ...
each taking config groups (`compress.api.DataConfig`, ...) and returning a `StepResult`. The search is
`compress.api.search` (`compress.search` is the package that runs it).

`import compress` registers compress's own model class (pruned and partly shared BERTs) with transformers'
Auto classes. The `compress` command skips that at start-up (it costs seconds of torch and transformers
imports, and `compress --help` must answer at once); the commands that need it import compress.models.compress_bert.
"""

import sys

from compress.infra.version import __version__  # noqa: F401  (compress.__version__)

_API = ("distill", "finetune", "prune", "share", "evaluate", "export", "bench")


def _started_as_cli() -> bool:
    # console script: argv[0] is .../bin/compress; `python -m compress`: argv[0] is "-m" while the package loads
    return sys.argv[:1] == ["-m"] or sys.argv[0].endswith(("/compress", "\\compress.exe", "\\compress"))


def __getattr__(name: str):
    """compress.distill and the other steps, from compress.api on first use (the API imports every step module)."""
    if name in _API or name == "api":
        import compress.api

        return compress.api if name == "api" else getattr(compress.api, name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


if not _started_as_cli():
    import compress.models.compress_bert  # noqa: F401  (registers the Auto classes)
