"""The `compress` command: maps subcommand names to functions; jsonargparse builds flags from their signatures.

Between parsing and the command, what every command shares: a leading ~ in path flags expanded, and --tracking
checked to be an MLflow store before anything opens it.

Heavy libraries (torch, transformers, Lightning) are imported inside the commands, so `compress --help`
answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from compress.cli.commands import commands
from compress.infra.errors import CompressError, stop_said
from compress.infra.signals import ctrl_c_remembered, sigterm_raises

# one function per command, its flags the flat fields of its config groups (compress/options/commands.py)
COMMANDS = commands()


_AS_TYPED: dict[str, str] = {}  # the argument as normalised -> as the user typed it; and "command"


def _normalise_flags(argv: list[str]) -> list[str]:
    """Accept --max-length as well as --max_length, a bare --resume for --resume=true, and a repeated list flag.

    jsonargparse knows only the underscore spelling, wants a value after a bool flag, and appends to a list only
    with `--name+ value`; users type `--model A --model B`.
    """
    import inspect

    command = next((a for a in argv if a in COMMANDS), None)
    bools, lists = set(), set()
    if command:
        params = inspect.signature(COMMANDS[command]).parameters.values()
        bools = {p.name for p in params if p.annotation in (bool, "bool")}
        lists = {p.name for p in params if str(p.annotation).startswith(("list[", "typing.List["))}
    out = []
    _AS_TYPED.clear()
    _AS_TYPED["command"] = command or ""
    for i, arg in enumerate(argv):
        if arg.startswith("--") and arg != "--print_config":
            typed = arg
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            following = argv[i + 1].lower() if i + 1 < len(argv) else ""
            if name in bools and not eq and following not in ("true", "false"):
                eq, value = "=", "true"
            if name in lists and not (value if eq else following).startswith("["):
                name += "+"  # append one item; a JSON-style [a, b] still sets the whole list
            arg = "--" + name + eq + value
            _AS_TYPED[arg] = typed  # an unknown flag is named as typed
        out.append(arg)
    return out


def _one_line_parser():
    """jsonargparse's parser, reporting a flag it cannot parse in one line like every other compress error,
    rather than after a usage block of 35 lines that buries it."""
    import re

    from jsonargparse import ArgumentParser

    class OneLineParser(ArgumentParser):
        def __init__(self, *args, **kwargs) -> None:
            # argparse took a unique prefix for the whole flag: a typo such as --layer 2 trained as --layers 2, and
            # --temp as --temperature, with no word. Every flag is spelt out, or it is refused as unknown.
            super().__init__(*args, **(kwargs | {"allow_abbrev": False}))

        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error:  # jsonargparse probing a type: it catches this and tries the next
                return super().error(message, ex)
            text = " ".join(message.split())
            # 'Parser key "lr": Expected a <class 'float'>. Got value: abc' -> '--lr abc: expected a float'
            typed = re.fullmatch(r'Parser key "([\w.]+)": Expected a <class \'(\w+)\'>\. Got value: (.*)', text)
            if typed:
                text = f"--{typed.group(1)} {typed.group(3)}: expected a{'n' if typed.group(2)[0] in 'aeiou' else ''} "
                text += typed.group(2)
            # a flag typed int | None: 'Parser key "layers": Does not validate against any of the Union subtypes
            # Subtypes: [<class 'int'>, <class 'NoneType'>] Errors: ... Given value: two' -> '--layers two: expected
            # an int or null'
            union = re.fullmatch(r'Parser key "([\w.]+)": Does not validate against any of the Union subtypes '
                                 r"Subtypes: \[(.*?)\] .* Given value: (.*)", text)
            if union:
                kinds = ["null" if k == "NoneType" else k for k in re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>",
                                                                            union.group(2))]
                text = f"--{union.group(1).rpartition('.')[2]} {union.group(3)}: expected {' or '.join(kinds)}"
            unrecognized = re.fullmatch(r"unrecognized arguments: (.*)", text)
            if unrecognized:  # as the user typed them (--max-len, not --max_len), and the flag meant if it is clear
                given = [_AS_TYPED.get(a, a) for a in unrecognized.group(1).split(" ")]
                text = f"unrecognized arguments: {' '.join(given)}" + _did_you_mean(given)
            if re.fullmatch(r'expected "subcommand" to be one of .*but it was not provided\.', text):
                text = f"give a command: {', '.join(COMMANDS)}"
            choice = re.fullmatch(r"argument subcommand: invalid choice: '(.*?)' \(choose from .*\)", text)
            if choice:  # a typo of a command ('distil')
                import difflib

                close = difflib.get_close_matches(choice.group(1), list(COMMANDS), n=1, cutoff=0.6)
                text = f"no command {choice.group(1)!r}; the commands are {', '.join(COMMANDS)}"
                text += f"; did you mean {close[0]}?" if close else ""
            unknown = re.fullmatch(r"Subcommand '(\w+)' does not accept option '(\w+)'", text)
            if unknown:  # often a config written for another command
                text = f"compress {unknown.group(1)} has no flag --{unknown.group(2)}"
            prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
            # 'required: distill.teacher' -> 'required: --teacher', and the help to read is distill's
            required = re.fullmatch(r"the following arguments are required: (([\w]+)\.[\w.]+(, [\w.]+)*)", text)
            if required:
                names = [name.rpartition(".")[2] for name in required.group(1).split(", ")]
                text = f"the following arguments are required: {', '.join('--' + n for n in names)}"
                prog = f"compress {required.group(2)}"
            print(f"compress: error: {text} (see {prog} --help)", file=sys.stderr)
            raise SystemExit(2)

    return OneLineParser


def _did_you_mean(given: list[str]) -> str:
    """'; did you mean --max_length?' for the one unknown flag that is close to one of the command's."""
    import difflib
    import inspect

    command = COMMANDS.get(_AS_TYPED.get("command", ""))
    flags = [a[2:].partition("=")[0].replace("-", "_") for a in given if a.startswith("--")]
    if command is None or len(flags) != 1:
        return ""
    names = list(inspect.signature(command).parameters)
    if flags[0] in names:  # a flag of the command, given before its name
        return f"; give it after the command name (compress {_AS_TYPED['command']} {given[0]} ...)"
    # a flag cut short (--temp; abbreviations are refused) or misspelt (--max_len, --epoch)
    close = [n for n in names if n.startswith(flags[0])] or difflib.get_close_matches(flags[0], names, n=1, cutoff=0.75)
    return f"; did you mean --{close[0]}?" if len(close) == 1 else ""


# Flags naming a local file or folder (or, for the model flags, a hub name, which never starts with '~').
# teacher_device_map may name a JSON file; space may name a YAML file (a dict given inline is left alone).
PATH_FLAGS = ("teacher", "student", "model", "data", "output", "teacher_cache", "teacher_device_map", "json_out",
              "json", "space", "vocab_corpus", "unlabeled", "augment_model")


def _expand_home(values) -> None:
    """Expand a leading ~ in path flags, as the shell does for an unquoted one. A quoted flag or a config file's
    `data: ~/data` reaches us as is: transformers expands a model's ~ itself, but --data then "did not exist" and
    --output made a folder named ~ in the working directory, one `rm -rf ~` away from the user's home.
    URIs (--tracking, --storage) are not paths and stay as given."""
    import os

    for name in PATH_FLAGS:
        value = values.get(name)
        if isinstance(value, str):
            values[name] = os.path.expanduser(value)
        elif isinstance(value, list):  # bench's repeated --model
            values[name] = [os.path.expanduser(v) if isinstance(v, str) else v for v in value]


def _check_config_files(argv: list[str]) -> None:
    """A --config file (top-level or a command's) that is not UTF-8: jsonargparse reads it as text and raises
    UnicodeDecodeError from deep in its parser, which no parser error hook sees."""
    from pathlib import Path

    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.partition("=")[2]
        else:
            continue
        path = Path(value).expanduser()
        if not path.is_file():  # missing, a folder or inline YAML: jsonargparse says so in one line
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError:  # unreadable: jsonargparse says so too
            continue
        except UnicodeDecodeError as err:
            raise CompressError(f"--config {value}: not UTF-8 text (byte {err.start}); give a YAML configuration "
                                "file") from None
        import yaml

        try:
            held = yaml.safe_load(text)
        except yaml.YAMLError:  # jsonargparse names the line
            continue
        if not isinstance(held, dict):  # jsonargparse says only "Unexpected config:"
            what = "nothing" if held is None else f"a {type(held).__name__}"
            raise CompressError(f"--config {value}: the file holds {what}, not flags; write one flag a line, e.g. "
                                "'teacher: minilm-l6'")


def _version() -> str:
    """compress's version and the libraries a result depends on, read from their metadata (no import: --version
    answers at once), for a bug report or a run to compare."""
    from importlib.metadata import PackageNotFoundError, version

    from compress import __version__

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ("torch", "transformers", "lightning", "optuna", "mlflow", "onnxruntime")
    return f"compress {__version__} ({', '.join(f'{name} {of(name)}' for name in libraries)})"


class _PrintVersion(argparse.Action):
    """argparse's version action wraps its line at the terminal's width; a version is one line to paste."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(_version())
        parser.exit()


def _run(argv: list[str]) -> None:
    """Parse, check what every command shares, then call the command: jsonargparse's CLI would call it straight
    from the parse, leaving no place to expand ~ in path flags."""
    from jsonargparse import auto_parser

    _check_config_files(argv)
    parser = auto_parser(COMMANDS, prog="compress", as_positional=False, parser_class=_one_line_parser(),
                         description="Distil, share, prune, search and export BERT-family models; every run tracked "
                                     "in MLflow.")
    parser.add_argument("--version", action=_PrintVersion, default=argparse.SUPPRESS,
                        help="print compress's version and those of the libraries it runs on, and exit")
    init = parser.instantiate(parser.parse_args(argv))
    command = init.subcommand
    values = dict(init[command].items())
    values.pop("config", None)
    _expand_home(values)
    COMMANDS[command](**values)


def main(argv: list[str] | None = None) -> None:
    argv = _normalise_flags(sys.argv[1:] if argv is None else list(argv))
    try:
        with sigterm_raises(), ctrl_c_remembered():
            _run(argv)
    except CompressError as err:
        print(f"compress: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as stop:
        said, code = stop_said(stop)
        print(f"compress: {said}; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        if _caused_by(stop, ImportError):
            # the Ctrl-C cut a C extension's import short (pybind11 raises ImportError from it; ctrl_c_remembered
            # raises the stop from the next import to fail): CPython keeps the half-made module, and shutting the
            # interpreter down aborted on it ("Fatal Python error: PyThreadState_Get", SIGABRT, after this line).
            # The exit handlers still run (a placed teacher's offload folder is removed); only the teardown is skipped
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise SystemExit(code) from None


def _caused_by(error: BaseException | None, kind: type[BaseException]) -> bool:
    """Whether `error`'s chain of explicit causes (raise ... from) holds a `kind`; not the errors being handled when
    it came (a Ctrl-C inside a library's `except ImportError:` fallback cut no import short)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return True
        seen.add(id(error))
        error = error.__cause__
    return False


if __name__ == "__main__":
    main()
