"""compress: distil, share, prune, search and export BERT-family models.

`import compress` registers compress's own model class (pruned and partly shared BERTs) with transformers'
Auto classes. The `compress` command skips that at start-up (it costs seconds of torch and transformers
imports, and `compress --help` must answer at once); the commands that need it import compress.models.compress_bert.
"""

import sys

__version__ = "0.1.0"


def _started_as_cli() -> bool:
    # console script: argv[0] is .../bin/compress; `python -m compress`: argv[0] is "-m" while the package loads
    return sys.argv[:1] == ["-m"] or sys.argv[0].endswith(("/compress", "\\compress.exe", "\\compress"))


if not _started_as_cli():
    import compress.models.compress_bert  # noqa: F401  (registers the Auto classes)
