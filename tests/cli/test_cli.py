"""The `compress` command end to end on tiny random BERTs: help, config files, distill (with and without a teacher head,
narrower students, attention transfer), what lands in MLflow, evaluate, resume after kill -9, DDP on CPU, an
unreachable hub, and a catalogue of bad inputs that must each give one clean line.

Most runs call `compress.__main__.main` in-process; a subprocess is used only where a fresh process matters.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import FAST, error_lines, mlflow_runs, run_main, save_tiny_bert, sqlite_uri, track

from compress.cli.main import COMMANDS

COMPRESS = Path(sys.executable).with_name("compress")  # the console script of this venv


def ok(args: list) -> tuple[str, str]:
    code, out, err = run_main(args)
    assert code == 0, f"exit {code}\n--- stderr ---\n{err[-4000:]}"
    return out, err


def runs_of(runs, command: str) -> list:
    return [r for r in runs if r.data.tags.get("compress.command") == command]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def leftovers(output: Path) -> list[str]:
    """Siblings of `output` that share its name: OUTPUT itself, OUTPUT.partial, and the hidden .OUTPUT.tmp-* and
    .OUTPUT.old-* of an atomic write."""
    if not output.parent.exists():
        return []
    name = output.name
    return sorted(p.name for p in output.parent.iterdir()
                  if p.name == name or p.name.startswith((name + ".", "." + name + ".")))


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def dev_texts(data: Path) -> tuple[list[str], list[int]]:
    lines = (data / "dev.tsv").read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines if line]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


# --- help -------------------------------------------------------------------------------------------------------------


def test_top_level_help_is_fast_and_lists_the_commands(tmp_path: Path) -> None:
    assert COMPRESS.exists(), COMPRESS
    proc = subprocess.run([str(COMPRESS), "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(), timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    for command in ("distill", "finetune", "evaluate"):
        assert command in proc.stdout
    # the list shows each command's first docstring line, so that line must be a whole sentence
    for command, function in COMMANDS.items():
        summary = function.__doc__.strip().splitlines()[0]
        assert summary.endswith("."), f"compress --help cuts {command}'s summary mid-sentence: {summary!r}"
    # Fast means none of the heavy libraries load (they take seconds); checked by what is imported, not by a
    # stopwatch, which a loaded CI machine would fail. (`time compress --help`: about 0.3 s on an idle 2-core CPU.)
    probe = (f"import sys\nsys.argv = [{str(COMPRESS)!r}, '--help']  # what the console script sees\n"
             "from compress.__main__ import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "heavy = ('torch', 'lightning', 'transformers', 'mlflow', 'optuna', 'datasets', 'onnxruntime')\n"
             "print('LOADED', sorted(m for m in heavy if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(), timeout=30, check=False)
    assert "LOADED []" in proc.stdout, proc.stdout[-500:] + proc.stderr[-2000:]


def _help_entries(text: str) -> dict[str, str]:
    """Option name -> the help text argparse printed for it (wrapped lines joined)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (--?[\w-]+)(.*)$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2)
        elif current and line.startswith("    ") and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def _description(entry: str, name: str) -> str:
    text = re.sub(r"\((required, )?type: .*$", "", entry)  # jsonargparse's "(type: int, default: 3)" tail
    # what precedes the help: the metavar (NAME, {true,false}) and alias spellings such as ", --name+ NAME"
    lead = rf"^(\s*(,\s*--{name}\+|{re.escape(name.upper())}|\{{[^}}]*\}}|\[=\w+\]))*"
    return re.sub(lead, "", text).strip()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_documents_every_flag(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import docstring_parser

    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_main([command, "--help"])
    assert code == 0, err
    entries = _help_entries(out)
    documented = {p.arg_name: p.description for p in docstring_parser.parse(COMMANDS[command].__doc__).params}
    for name in inspect.signature(COMMANDS[command]).parameters:
        flag = f"--{name}"
        assert flag in out, f"{command} --help does not list {flag}"
        assert flag in entries, f"{command} --help: cannot find the entry of {flag}"
        text = _description(entries[flag], name)
        assert re.search(r"[a-z]{2,}", text), f"{command} {flag} has no help text: {entries[flag]!r}"
        assert documented.get(name), f"{command}: {name} is missing from the docstring's Args"
        first_words = " ".join(documented[name].split()[:3])
        assert first_words in text, f"{command} {flag}: help {text!r} is not the docstring {documented[name]!r}"


@pytest.mark.parametrize(("args", "line"), [
    (["distill", "--teacher", "t", "--temperature", "abc"],
     "--temperature abc: expected a float (see compress distill --help)"),
    (["prune", "--model", "m", "--heads", "half"], "--heads half: expected a float (see compress prune --help)"),
    (["distill", "--teacher", "t", "--bogus", "1"], "unrecognized arguments: --bogus 1 (see compress distill --help)"),
    # a unique prefix was taken for the flag: this typo trained a 2-layer student as --layers 2
    (["distill", "--teacher", "t", "--layer", "2"],
     "unrecognized arguments: --layer 2; did you mean --layers? (see compress distill --help)"),
    (["prune", "--model", "m", "--head", "0.5"],
     "unrecognized arguments: --head 0.5; did you mean --heads? (see compress prune --help)"),
    # named as typed: it said --max_len, a spelling the user never wrote
    (["distill", "--teacher", "t", "--max-len", "64"],
     "unrecognized arguments: --max-len 64; did you mean --max_length? (see compress distill --help)"),
    (["distill", "--teacher", "t", "--temp=2", "--epoch", "1"],
     "unrecognized arguments: --temp=2 --epoch 1 (see compress distill --help)"),
    (["--resume", "distill", "--teacher", "t"],  # it said --resume=true, and "did you mean --resume?"
     "unrecognized arguments: --resume; give it after the command name (compress distill --resume ...) "
     "(see compress --help)"),
    (["distill"], "the following arguments are required: --teacher (see compress distill --help)"),
    ([], "give a command: distill, finetune, evaluate, export, bench, prune, share, search, auto, ui (see compress "
         "--help)"),
    (["distil", "--teacher", "t"], "no command 'distil'; the commands are distill, finetune, evaluate, export, bench, "
                                   "prune, share, search, auto, ui; did you mean distill? (see compress --help)"),
    (["distill", "--teacher", "t", "--layers", "x"], "--layers x: expected int or null (see compress distill --help)"),
])
def test_a_flag_that_does_not_parse_is_one_line(args: list[str], line: str) -> None:
    """jsonargparse would print a usage block of some 35 lines above its message."""
    code, out, err = run_main(args)
    assert (code, out, err) == (2, "", f"compress: error: {line}\n")


@pytest.mark.parametrize(("text", "line"), [
    ("", "--config c.yaml: the file holds nothing, not flags"),
    ("- teacher\n", "--config c.yaml: the file holds a list, not flags"),
    ("teacher: t\nheads: 0.5\n", "compress distill has no flag --heads (see compress distill --help)"),
])
def test_a_config_that_is_no_set_of_the_commands_flags_is_one_line(text: str, line: str, workdir: Path) -> None:
    (workdir / "c.yaml").write_text(text)
    code, out, err = run_main(["distill", "--config", "c.yaml"])
    assert code in (1, 2) and out == "" and err == f"compress: error: {line}" + err.split(line, 1)[1], err
    assert len(err.strip().splitlines()) == 1


def test_version_is_one_line_with_the_libraries_a_result_depends_on() -> None:
    from importlib.metadata import version

    import compress

    code, out, err = run_main(["--version"])
    assert (code, err) == (0, "")
    assert out.startswith(f"compress {compress.__version__} (torch {version('torch')}, transformers ")
    assert out.count("\n") == 1 and "mlflow" in out


# --- --print_config / --config ----------------------------------------------------------------------------------------


def test_print_config_round_trips_through_config(workdir: Path) -> None:
    import yaml

    out1, _ = ok(["distill", "--teacher", "some/teacher", "--task", "sst2", "--layers", "3", "--temperature", "4",
                  "--alpha-attn", "0.5", "--resume", "--max_train", "100", "--print_config"])
    first = yaml.safe_load(out1)
    assert first["teacher"] == "some/teacher" and first["task"] == "sst2" and first["layers"] == 3
    assert first["temperature"] == 4.0 and first["alpha_attn"] == 0.5 and first["resume"] is True
    assert first["max_train"] == 100 and first["data"] is None
    path = workdir / "distill.yaml"
    path.write_text(out1)
    out2, _ = ok(["distill", "--config", path, "--print_config"])
    assert yaml.safe_load(out2) == first
    # flags after --config override it
    out3, _ = ok(["distill", "--config", path, "--epochs", "7", "--print_config"])
    assert yaml.safe_load(out3) == first | {"epochs": 7}
    assert not (workdir / "outputs").exists() and not (workdir / "mlruns").exists()  # printing runs nothing


# --- distill with a teacher that has a head: one shared run -----------------------------------------------------------


@pytest.fixture(scope="module")
def distilled(tiny_teacher: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One 2-epoch distill run (default student: half the teacher's layers), shared by the tests below."""
    root = tmp_path_factory.mktemp("distilled")
    out = root / "student"
    uri = sqlite_uri(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        _, err = ok(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "2", "--batch_size", "16",
                     "--output", out, "--tracking", uri, *FAST])
    client, runs = mlflow_runs(uri)
    assert len(runs) == 1, [r.data.tags.get("compress.command") for r in runs]
    return SimpleNamespace(root=root, out=out, uri=uri, err=err, client=client, run=runs[0])


def test_distill_writes_a_complete_output_folder(distilled, tiny_teacher: Path) -> None:
    out = distilled.out
    assert leftovers(out) == ["student"], "a .partial, .tmp or .old folder was left behind"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "compress.json"):
        assert (out / name).is_file(), name
    # the weights are as readable as the config beside them (safetensors alone writes 0600), and the folder too
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
    assert modes == {name: 0o777 & ~umask if name == "student" else 0o666 & ~umask for name in modes}, modes
    config = json.loads((out / "config.json").read_text())
    teacher_config = json.loads((tiny_teacher / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}
    assert config["label2id"] == {"0": 0, "1": 1}
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["num_hidden_layers"] == teacher_config["num_hidden_layers"] // 2 == 2
    assert config["hidden_size"] == teacher_config["hidden_size"]
    lineage = json.loads((out / "compress.json").read_text())
    assert lineage["command"] == "distill"
    assert lineage["mlflow_run_id"] == distilled.run.info.run_id
    assert lineage["teacher"] == str(tiny_teacher)
    assert lineage["label_names"] == ["0", "1"]
    assert "student: 2 layers x 32, from teacher layers [0, 2]" in distilled.err


def test_saved_student_reloads_with_identical_logits(distilled, tiny_data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = distilled.out
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts, labels = dev_texts(tiny_data)
    # the same padding the evaluation loader uses: one batch padded to its longest row with id 0
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert tokenizer.pad_token_id == 0

    def logits(folder: Path) -> torch.Tensor:
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        assert type(model).__name__ == "BertForSequenceClassification"
        with torch.no_grad():
            return model(**batch).logits

    first, second = logits(out), logits(out)
    assert torch.equal(first, second)
    # the copy logged to MLflow is the same model
    local = distilled.client.download_artifacts(distilled.run.info.run_id, "model", str(tmp_path))
    assert (Path(local) / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert torch.equal(logits(Path(local)), first)
    # and it is the model distill scored: its dev accuracy is the logged student_score
    accuracy = (first.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert accuracy == pytest.approx(distilled.run.data.metrics["student_score"], abs=1e-6)
    # the student really is a new model, not the teacher under another name
    teacher = load_weights(Path(json.loads((out / "compress.json").read_text())["teacher_path"]))
    student = load_weights(out)
    assert "bert.encoder.layer.2.attention.self.query.weight" in teacher
    assert "bert.encoder.layer.2.attention.self.query.weight" not in student


def test_mlflow_run_has_params_tags_metrics_history_and_model(distilled, tiny_teacher: Path) -> None:
    import transformers

    from compress.models.measure import count_params, weights_mb
    from compress.models.loading import load_classifier

    run, client = distilled.run, distilled.client
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["temperature"] == "2.0"
    assert params["teacher"] == str(tiny_teacher)
    assert params["metric"] == "accuracy"
    assert params["command"] == "distill"
    assert params["epochs"] == "2" and params["layers"] == "2"
    tags = run.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", tags["git_commit"]), tags["git_commit"]
    assert tags["torch"] == torch.__version__
    assert tags["transformers"] == transformers.__version__
    assert tags["device"] == "cpu"

    m = run.data.metrics
    for key in ("student_score", "teacher_score", "retention", "student_params", "teacher_params", "compression",
                "student_mb", "latency_ms", "speedup"):
        assert key in m, key
        assert math.isfinite(m[key]), key
    assert 0.0 <= m["student_score"] <= 1.0 and 0.0 <= m["teacher_score"] <= 1.0
    assert m["retention"] == m["student_score"] / m["teacher_score"]
    assert m["compression"] == m["teacher_params"] / m["student_params"]
    assert m["speedup"] == m["teacher_latency_ms"] / m["latency_ms"]
    assert m["latency_ms"] > 0
    student_params = count_params(load_classifier(str(distilled.out), ["0", "1"]))
    assert m["student_params"] == student_params
    assert m["teacher_params"] == count_params(load_classifier(str(tiny_teacher), ["0", "1"]))
    assert m["student_mb"] == weights_mb(distilled.out) > 0
    assert m["teacher_mb"] == weights_mb(tiny_teacher) > m["student_mb"]  # beside the student's in the summary
    assert re.search(r"\n  MB +[\d.]+ +[\d.]+\n", distilled.err), distilled.err[-1500:]

    run_id = run.info.run_id
    for name in ("val_score", "loss_kd", "loss_ce", "loss_hidden", "loss_epoch"):
        history = client.get_metric_history(run_id, name)
        assert len(history) == 2, f"{name}: {[(h.step, h.value) for h in history]}"  # one per epoch
        assert all(math.isfinite(h.value) for h in history)
    assert "loss_attn" not in m  # --alpha_attn 0: no attention term

    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/compress.json"} <= artifacts


def test_evaluate_reproduces_the_logged_score(distilled, tiny_data: Path, workdir: Path) -> None:
    out, _ = ok(["evaluate", "--model", distilled.out, "--data", tiny_data, "--latency_reps", "1",
                   "--latency_batch", "2", "--latency_seq", "16", "--json_out", "eval.json"])
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("score", "params", "mb", "latency_ms"):
        assert key in result, key
    m = distilled.run.data.metrics
    assert result["score"] == m["student_score"]
    assert result["params"] == m["student_params"]
    assert result["mb"] == m["student_mb"]
    assert result["latency_ms"] > 0 and result["metric"] == "accuracy"
    assert json.loads((workdir / "eval.json").read_text()) == result


def test_evaluate_rejects_a_model_without_a_head(tiny_encoder: Path, tiny_data: Path, workdir: Path) -> None:
    code, _, err = run_main(["evaluate", "--model", tiny_encoder, "--data", tiny_data, "--latency_reps", "1"])
    assert code == 1 and "Traceback" not in err
    assert len(error_lines(err)) == 1 and "--model" in error_lines(err)[0]


# --- other distill shapes ---------------------------------------------------------------------------------------------


def test_distill_layers_1_and_default_output_name(tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    ok(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--layers", "1", "--epochs", "1", *FAST,
        *track(workdir)])
    outputs = sorted(p.name for p in (workdir / "outputs").iterdir())
    assert outputs == ["distill-teacher-data-L1"]
    config = json.loads((workdir / "outputs" / outputs[0] / "config.json").read_text())
    assert config["num_hidden_layers"] == 1


def test_finetune_with_the_same_seed_gives_the_same_weights(tiny_encoder: Path, tiny_data: Path, workdir: Path) -> None:
    # A head-less encoder gets a fresh classifier: it must come from --seed, not from whatever random state the
    # process is in (here, a different one before each run).
    weights = {}
    for name, process_seed, seed in (("a", 1, 42), ("b", 2, 42), ("c", 1, 43)):
        torch.manual_seed(process_seed)
        _, err = ok(["finetune", "--model", tiny_encoder, "--data", tiny_data, "--epochs", "1", "--seed", seed,
                     "--output", name, *FAST, *track(workdir)])
        weights[name] = load_weights(workdir / name)
        # one column, the model trained: it is no student, and nothing stands beside it
        assert re.search(r"\n {20,}model\n  accuracy +[\d.]+\n", err), err[-1500:]
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not torch.equal(weights["a"]["classifier.weight"], weights["c"]["classifier.weight"])


def test_headless_teacher_is_finetuned_once_then_reused(tiny_encoder: Path, tiny_data: Path, workdir: Path) -> None:
    args = ["distill", "--teacher", tiny_encoder, "--data", tiny_data, "--epochs", "1", "--teacher_epochs", "1", *FAST,
            *track(workdir)]
    _, err1 = ok([*args, "--output", "s1"])
    assert "fine-tuning it first" in err1 and "reusing" not in err1
    teachers = [p for p in (workdir / "outputs" / "teachers").iterdir()]
    assert len(teachers) == 1 and (teachers[0] / "config.json").is_file(), teachers
    cached = teachers[0]
    assert json.loads((cached / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    _, runs = mlflow_runs(sqlite_uri(workdir))
    assert len(runs_of(runs, "finetune")) == 1 and len(runs_of(runs, "distill")) == 1
    assert runs_of(runs, "finetune")[0].info.status == "FINISHED"

    _, err2 = ok([*args, "--output", "s2"])
    assert "reusing" in err2 and "fine-tuning it first" not in err2
    assert f"outputs/teachers/{cached.name}" in err2
    _, runs = mlflow_runs(sqlite_uri(workdir))
    assert len(runs_of(runs, "finetune")) == 1, "the second distill fine-tuned the teacher again"
    distills = runs_of(runs, "distill")
    assert len(distills) == 2

    # an interrupted fine-tuning whose MLflow run is in another store is started over, not resumed into a run the
    # store does not have (the user never typed --resume for it)
    partial = cached.with_name(cached.name + ".partial")
    cached.rename(partial)
    (partial / "run.json").write_text(json.dumps({"run_id": "0" * 32, "params": {}, "inputs": {"tracking": "x://y"}}))
    # ... unless another process is writing it now: that one is refused by name, and its folder kept
    from compress.engine.state import _take_lock

    held = _take_lock(partial / "lock")
    code, _, err = run_main([*args, "--output", "s3"])
    held.close()
    assert code == 1 and f"pid {os.getpid()}" in error_lines(err)[0] and "is writing it now" in err, err[-2000:]
    assert (partial / "run.json").is_file() and not (workdir / "s3").exists()
    _, err3 = ok([*args, "--output", "s3"])
    assert "logged to another MLflow store; starting it over" in err3 and (cached / "config.json").is_file()
    assert not partial.exists()
    assert {(workdir / r.data.params["teacher_path"]).resolve() for r in distills} == {cached.resolve()}
    assert sorted(p.name for p in (workdir / "outputs" / "teachers").iterdir()) == [cached.name]
    assert (workdir / "s1" / "model.safetensors").is_file() and (workdir / "s2" / "model.safetensors").is_file()


def test_cached_teacher_logits_are_reused_by_the_next_distill(tiny_teacher: Path, tiny_data: Path,
                                                              workdir: Path) -> None:
    args = ["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "2", "--cache_teacher",
            "--alpha_hidden", "0", "--teacher_cache", "cache", *FAST, *track(workdir)]
    _, err1 = ok([*args, "--output", "s1"])
    files = list((workdir / "cache" / "logits").glob("*.safetensors"))
    assert len(files) == 1 and "teacher logits cached in" in err1
    assert files[0].stat().st_mode & 0o777 == (workdir / "s1" / "config.json").stat().st_mode & 0o777
    _, err2 = ok([*args, "--output", "s2"])
    assert f"teacher logits: read from cache/logits/{files[0].name}" in err2
    # both runs trained on the same targets from the same start: the students are the same
    first, second = load_weights(workdir / "s1"), load_weights(workdir / "s2")
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)
    _, err3 = ok([*args, "--output", "s3", "--max_length", "64"])  # other preprocessing: another key
    assert "read from" not in err3 and len(list((workdir / "cache" / "logits").glob("*.safetensors"))) == 2


def test_distill_from_a_teacher_with_layers_offloaded_to_disk(tiny_teacher: Path, tiny_data: Path,
                                                              workdir: Path) -> None:
    layout = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "disk",
              "bert.encoder.layer.2": "disk", "bert.encoder.layer.3": "cpu", "bert.pooler": "cpu", "classifier": "cpu"}
    (workdir / "map.json").write_text(json.dumps(layout))
    _, err = ok(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "1", "--output", "out",
                 "--teacher_device_map", "map.json", *FAST, *track(workdir)])
    assert "teacher placed by --teacher_device_map map.json: ['cpu', 'disk']" in err
    assert "latency and the speedup are not measured" in err
    _, runs = mlflow_runs(sqlite_uri(workdir))
    m = runs[0].data.metrics
    assert 0 <= m["teacher_score"] <= 1 and m["retention"] == pytest.approx(m["student_score"] / m["teacher_score"])
    assert "speedup" not in m and runs[0].data.params["teacher_device_map"] == "map.json"
    assert (workdir / "out" / "model.safetensors").is_file()


def test_teacher_device_map_auto_with_a_teacher_that_fits_one_device(tiny_teacher: Path, tiny_encoder: Path,
                                                                     tiny_data: Path, workdir: Path) -> None:
    """transformers sets hf_device_map only on a model it spread over devices: auto on a CPU machine, or on one GPU
    the teacher fits, raised AttributeError. A teacher without its task head is refused before anything is done: it
    would have been fine-tuned whole on one device first."""
    _, err = ok(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "1", "--output", "out",
                 "--teacher_device_map", "auto", *FAST, *track(workdir)])
    assert "teacher placed by --teacher_device_map auto: all on cpu, so it runs beside the student as usual" in err
    assert (workdir / "out" / "model.safetensors").is_file()
    _, runs = mlflow_runs(sqlite_uri(workdir))  # the whole config, the data's flags and the teacher's too
    assert {k: runs[0].data.params.get(k) for k in ("data", "text_column", "label_column", "max_train",
                                                    "teacher_epochs", "teacher_lr", "teacher_device_map")} == {
        "data": str(tiny_data), "text_column": "", "label_column": "label", "max_train": "None",
        "teacher_epochs": "2", "teacher_lr": "5e-05", "teacher_device_map": "auto"}
    code, _, err = run_main(["distill", "--teacher", tiny_encoder, "--data", tiny_data, "--output", "out2",
                             "--teacher_device_map", "auto", *FAST, *track(workdir)])
    assert code == 1 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert line.startswith(f"compress: error: --teacher_device_map auto: the teacher {tiny_encoder} has no classifier")
    assert not (workdir / "out2").exists() and not (workdir / "outputs").exists()
    # a copy fine-tuned before (by a distill without the map) is used as ever
    ok(["distill", "--teacher", tiny_encoder, "--data", tiny_data, "--epochs", "1", "--teacher_epochs", "1",
        "--output", "out3", *FAST, *track(workdir)])
    _, err = ok(["distill", "--teacher", tiny_encoder, "--data", tiny_data, "--epochs", "1", "--teacher_epochs", "1",
                 "--output", "out2", "--teacher_device_map", "auto", *FAST, *track(workdir)])
    assert "reusing its fine-tuned copy" in err and (workdir / "out2" / "model.safetensors").is_file()


def test_distill_into_a_narrower_student(tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    from transformers import AutoConfig, BertForSequenceClassification

    narrow = save_tiny_bert(workdir / "narrow", layers=2, hidden=16, heads=2, intermediate=32, head=False)
    _, err = ok(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--student", narrow, "--epochs", "1",
                 "--output", "out", *FAST, *track(workdir)])
    assert "student: 2 layers x 16" in err
    config = json.loads((workdir / "out" / "config.json").read_text())
    assert config["hidden_size"] == 16 and config["num_hidden_layers"] == 2
    weights = load_weights(workdir / "out")
    assert weights["bert.embeddings.word_embeddings.weight"].shape[1] == 16
    assert not [k for k in weights if "projection" in k], "the hidden-state projection leaked into the student"
    _, runs = mlflow_runs(sqlite_uri(workdir))
    m = runs[0].data.metrics
    assert math.isfinite(m["loss_hidden"])  # the MSE through the learned projection ran
    expected = BertForSequenceClassification(AutoConfig.from_pretrained(narrow, num_labels=2))
    assert m["student_params"] == sum(p.numel() for p in expected.parameters())
    assert runs[0].data.params["student"] == str(narrow)


def test_distill_with_attention_transfer(tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    ok(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--alpha_attn", "0.5", "--epochs", "1",
        "--output", "out", *FAST, *track(workdir)])
    assert (workdir / "out" / "model.safetensors").is_file()
    _, runs = mlflow_runs(sqlite_uri(workdir))
    m = runs[0].data.metrics
    # student layers are teacher layers 0 and 2, matched against teacher layers 2 and 4: their maps differ
    assert math.isfinite(m["loss_attn"]) and m["loss_attn"] > 0
    assert runs[0].data.params["alpha_attn"] == "0.5"


def test_distill_a_distilbert_teacher(tmp_path: Path, tiny_data: Path, workdir: Path) -> None:
    """DistilBERT keeps its layers under `transformer.layer.<i>.` and has no token types; its student is a DistilBERT
    of the teacher's layers 0 and 2, and the hidden-state and attention losses run on it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, DistilBertForSequenceClassification

    teacher = save_tiny_bert(tmp_path / "distilbert", model_type="distilbert")
    ok(["distill", "--teacher", teacher, "--data", tiny_data, "--layers", "2", "--alpha_attn", "0.5", "--epochs",
        "1", "--output", "out", *FAST, *track(workdir)])
    student = AutoModelForSequenceClassification.from_pretrained(workdir / "out")
    assert isinstance(student, DistilBertForSequenceClassification) and student.config.n_layers == 2
    expected = DistilBertForSequenceClassification(AutoConfig.from_pretrained(teacher, n_layers=2))
    _, runs = mlflow_runs(sqlite_uri(workdir))
    m = runs[0].data.metrics
    assert m["student_params"] == sum(p.numel() for p in expected.parameters())
    assert m["loss_hidden"] > 0 and m["loss_attn"] > 0


# --- resume -----------------------------------------------------------------------------------------------------------


def _loads(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:  # still being written
        return False


def test_resume_when_the_stop_came_before_anything_was_written_starts_the_run(tiny_teacher, tiny_data, workdir):
    """A stop while the models loaded or prune scored its heads leaves no OUTPUT.partial, and its last line says
    "rerun with --resume" all the same; that rerun failed with "no interrupted run to resume"."""
    code, _, err = run_main(["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "1", *FAST,
                             *track(workdir), "--output", "never", "--resume"])
    assert code == 0, err[-2000:]
    assert f"--resume: the run stopped before it wrote anything to {Path('never.partial')}; starting it now" in err
    assert "no checkpoint was written yet" not in err and (workdir / "never" / "model.safetensors").exists()


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # expected on resume
def test_resume_after_kill_matches_an_uninterrupted_run(tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    # 96 rows / batch 8 = 12 steps per epoch, 24 in all, a checkpoint every 3
    args = ["distill", "--teacher", str(tiny_teacher), "--data", str(tiny_data), "--epochs", "2", "--batch_size", "8",
            "--checkpoint_every", "3", *FAST, *track(workdir)]
    ok([*args, "--output", "ref"])

    log = workdir / "kill-run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([str(COMPRESS), *args, "--output", "killed"], cwd=workdir, env=subprocess_env(),
                                stdout=sink, stderr=subprocess.STDOUT)
    ckpt_dir = workdir / "killed.partial" / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint after 120 s:\n{log.read_text()[-3000:]}"
            if ckpt_dir.is_dir() and any(_loads(p) for p in ckpt_dir.glob("*.ckpt")):
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert leftovers(workdir / "killed") == ["killed.partial"]

    # rerunning without --resume must not silently start over or clobber the checkpoints
    code, _, err = run_main([*args, "--output", "killed"])
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "--resume" in line and "killed.partial" in line
    assert leftovers(workdir / "killed") == ["killed.partial"]

    # resuming with another recipe is refused (Lightning would restore the old optimizer over a new --lr, and a
    # student of another shape would not load); where and how it runs may change
    flipped = workdir / "other" / tiny_data.name  # the same name and size, other labels
    flipped.mkdir(parents=True)
    for split in ("train.tsv", "dev.tsv"):
        lines = (tiny_data / split).read_text().splitlines()
        (flipped / split).write_text("\n".join([lines[0], *(t[:-1] + str(1 - int(t[-1])) for t in lines[1:])]) + "\n")
    other_store = ["--tracking", f"sqlite:///{workdir / 'other' / 'mlflow.db'}"]
    for changed, named in (
        (["--lr", "1e-3"], "the interrupted run at killed.partial had --lr 0.0001, this one 0.001"),
        (["--layers", "1"], "the interrupted run at killed.partial had --layers 2, this one 1; resume with the same"),
        (["--data", flipped], "the data's rows changed since the interrupted run at killed.partial"),
        # the flag, not the rows it chose, which the data check named first
        (["--max_train", "30"], "the interrupted run at killed.partial had --max_train unset, this one 30"),
        ([*other_store], "the interrupted run at killed.partial logs to --tracking sqlite:///"),
    ):
        code, _, err = run_main([*args, "--output", "killed", "--resume", *changed])
        assert code == 1 and "Traceback" not in err, err
        (line,) = error_lines(err)
        assert line.startswith(f"compress: error: --resume: {named}"), line
        assert "--overwrite" in line and leftovers(workdir / "killed") == ["killed.partial"]
    assert not (workdir / "other" / "mlflow.db").exists()

    _, err = ok([*args, "--output", "killed", "--resume", "--num_workers", "0"])
    match = re.search(r"resuming from \S*step(\d+)\.ckpt", err)
    assert match, err[-3000:]
    step = int(match.group(1))
    assert 0 < step < 24 and step % 12 != 0, f"resumed at step {step}, not mid-epoch"
    assert leftovers(workdir / "killed") == ["killed"]

    ref, resumed = load_weights(workdir / "ref"), load_weights(workdir / "killed")
    assert ref.keys() == resumed.keys()
    differ = {k: (ref[k] - resumed[k]).abs().max().item() for k in ref if not torch.equal(ref[k], resumed[k])}
    assert not differ, f"resumed from step {step}, weights differ from the uninterrupted run: {differ}"

    # the resumed run continued the killed run's MLflow run rather than starting another
    _, runs = mlflow_runs(sqlite_uri(workdir))
    killed_runs = [r for r in runs if r.data.params.get("output") == "killed"]
    assert len(killed_runs) == 1 and killed_runs[0].info.status == "FINISHED"
    assert len(runs) == 2
    client, _ = mlflow_runs(sqlite_uri(workdir))
    assert len(client.get_metric_history(killed_runs[0].info.run_id, "val_score")) == 2


def test_resume_refuses_a_model_whose_weights_changed_and_names_flags_not_params(tmp_path: Path) -> None:
    from compress.infra.errors import CompressError
    from compress.engine.state import RunState

    (tmp_path / "out.partial").mkdir()
    state = RunState(tmp_path / "out", resume=True, overwrite=False)
    params = {"lr": 1e-4, "teacher_path": "t", "embedding": None, "devices": "auto"}
    state.write(params=params, inputs={"data": "d1", "tracking": "sqlite:///a.db", "teacher_path": "w1"})
    state.check_resume({**params, "devices": 2}, {"data": "d1", "tracking": "sqlite:///a.db", "teacher_path": "w1"})
    with pytest.raises(CompressError, match=r"--resume: the weights in --teacher changed since the interrupted run"):
        state.check_resume(params, {"data": "d1", "tracking": "sqlite:///a.db", "teacher_path": "w2"})
    with pytest.raises(CompressError, match=r"had --embedding unset, this one 16; resume with the same flags and "
                                            r"files, or drop --resume and pass --overwrite"):
        state.check_resume({**params, "embedding": 16}, {"data": "d1", "tracking": "sqlite:///a.db"})
    inputs = {"data": "d1", "tracking": "sqlite:///a.db", "teacher_path": "w1"}
    # a param the interrupted run's compress did not log yet (an upgrade in between) is no change of the user's
    state.check_resume({**params, "label_column": "label", "teacher_epochs": 2}, inputs)
    # nor is naming the text column that was found before, or the data folder by another path: the rows decide
    state.write(params={**params, "text_column": "", "data": "d", "max_train": None})
    state.check_resume({**params, "text_column": "sentence", "data": "/abs/d", "max_train": None}, inputs)
    with pytest.raises(CompressError, match=r"had --max_train unset, this one 30"):  # not "the data's rows changed"
        state.check_resume({**params, "text_column": "", "data": "d", "max_train": 30}, {**inputs, "data": "d2"})


def test_only_what_is_raised_while_handling_ctrl_c_counts_as_ctrl_c() -> None:
    """Lightning's sys.exit(1), or its shutdown failing (MLflow's "database is locked"), during a Ctrl-C is the
    Ctrl-C; an error of the run's own (out of memory) is that error."""
    from compress.engine.fit import _during_ctrl_c

    for raised in (SystemExit(1), RuntimeError("database is locked")):
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise raised  # its implicit context, the KeyboardInterrupt, is what is tested
        except BaseException as error:
            assert _during_ctrl_c(error)
    assert not _during_ctrl_c(RuntimeError("out of memory")) and not _during_ctrl_c(SystemExit(2))


@pytest.mark.parametrize(("sig", "code", "said"), [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_exits_non_zero_with_the_resume_hint(sig, code: int, said: str, tiny_teacher: Path,
                                                               tiny_data: Path, workdir: Path) -> None:
    """Lightning made Ctrl-C exit 1 with no word of --resume, and SIGTERM exit 0 with nothing written."""
    args = ["distill", "--teacher", str(tiny_teacher), "--data", str(tiny_data), "--epochs", "40", "--batch_size",
            "8", "--checkpoint_every", "3", *FAST, *track(workdir), "--output", "stopped"]
    log = workdir / "stop.log"
    with log.open("w") as sink:
        # A shell starts background jobs (CI's, for one) with SIGINT ignored, and Python then never raises
        # KeyboardInterrupt; the run under test gets the disposition a terminal gives it.
        proc = subprocess.Popen([str(COMPRESS), *args], cwd=workdir, env=subprocess_env(), stdout=sink,
                                stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    ckpt_dir = workdir / "stopped.partial" / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while not (ckpt_dir.is_dir() and any(_loads(p) for p in ckpt_dir.glob("*.ckpt"))):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no checkpoint after 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        # while it runs, a second run on the same --output is refused, and --overwrite deletes nothing of it
        for extra in ([], ["--resume"], ["--overwrite"]):
            again, _, err = run_main([*args, *extra])
            (line,) = error_lines(err)
            assert again == 1 and f"another compress process (pid {proc.pid} on " in line, line
        assert proc.poll() is None
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    text = log.read_text()
    assert proc.returncode == code, text[-3000:]
    assert "Traceback" not in text
    assert f"compress: {said}; rerun with --resume" in text.strip().splitlines()[-1]
    assert leftovers(workdir / "stopped") == ["stopped.partial"]  # resumable, and nothing that looks finished
    _, runs = mlflow_runs(sqlite_uri(workdir))
    assert [r.info.status for r in runs_of(runs, "distill")] == ["KILLED"]  # Lightning wrote FAILED, as for an error
    again, _, err = run_main(args)  # the lock went with the process: this is an interrupted run now
    (line,) = error_lines(err)
    assert again == 1 and "an interrupted run left" in line and "--resume" in line, line


# --- DDP on CPU -------------------------------------------------------------------------------------------------------


def test_distill_ddp_on_two_cpu_processes(tiny_teacher: Path, tiny_data: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(COMPRESS), "distill", "--teacher", str(tiny_teacher), "--data", str(tiny_data), "--epochs", "1",
         "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--output", "ddp_out", *FAST],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-5000:]}"
    assert "Traceback" not in proc.stderr
    assert leftovers(tmp_path / "ddp_out") == ["ddp_out"]
    assert (tmp_path / "ddp_out" / "model.safetensors").is_file()
    _, runs = mlflow_runs(sqlite_uri(tmp_path))
    assert [r.info.status for r in runs_of(runs, "distill")] == ["FINISHED"], "rank 1 must not log a run of its own"


# --- an unreachable hub -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offline", [None, "1"], ids=["hub-unreachable", "HF_HUB_OFFLINE=1"])
@pytest.mark.parametrize("source", ["task", "data"])
def test_unreachable_hub_fails_fast_with_one_line(offline, source, tiny_data: Path, tmp_path: Path) -> None:
    env = subprocess_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))  # port 9: nothing there
    env.pop("HF_HUB_OFFLINE")
    if offline:
        env["HF_HUB_OFFLINE"] = offline
    data = ["--task", "sst2"] if source == "task" else ["--data", str(tiny_data)]  # data: the teacher must be found
    start = time.perf_counter()
    proc = subprocess.run([str(COMPRESS), "distill", "--teacher", "bert-large", *data], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compress: error:"), proc.stderr
    assert ("--task sst2" if source == "task" else "--teacher bert-large") in lines[0]
    assert not (tmp_path / "outputs").exists()
    assert elapsed < 10, f"took {elapsed:.1f} s to report an unreachable hub"


# --- bad inputs -------------------------------------------------------------------------------------------------------


def _bad_data(root: Path, name: str, train: str, dev: str = "sentence\tlabel\ngood\t1\nbad\t0\n") -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "train.tsv").write_text(train)
    (folder / "dev.tsv").write_text(dev)
    return folder


def _gpt2(root: Path) -> Path:
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=4).save_pretrained(root / "gpt2")
    return root / "gpt2"


def _model_copy(root: Path, teacher: Path, name: str, *, tokenizer: str = "same", weights: bytes | None = None) -> Path:
    """The tiny teacher's folder copied, with its tokenizer kept, left out ("none") or grown past the embedding
    table ("bigger"), and optionally its weights file overwritten."""
    import shutil

    from transformers import AutoTokenizer

    folder = root / name
    shutil.copytree(teacher, folder, ignore=None if tokenizer == "same" else shutil.ignore_patterns("*token*",
                                                                                                     "vocab*"))
    if tokenizer == "bigger":
        grown = AutoTokenizer.from_pretrained(teacher)
        grown.add_tokens(["zebra", "yak", "okapi"])
        grown.save_pretrained(folder)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def _text_file(root: Path, name: str) -> str:
    (root / name).write_text("my notes\n")
    return f"sqlite:///{root / name}"


def _text_labels(root: Path) -> Path:
    rows = "".join(f"film number {i} was fine\tgood film {i}\n" for i in range(30))
    return _bad_data(root, "textlabels", "sentence\tlabel\n" + rows, "sentence\tlabel\n" + rows)


# name -> (extra args builder(workdir, teacher, data) -> args, substrings the error line must contain)
BAD_INPUTS = {
    "missing-data-folder": (lambda w, t, d: ["--teacher", t, "--data", w / "nope"],
                            ["--data", "nope", "does not exist"]),
    "malformed-tsv": (lambda w, t, d: ["--teacher", t, "--data", _bad_data(
        w, "bad", "sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n")], ["--data", "train.tsv", "line 3"]),
    "wrong-label-column": (lambda w, t, d: ["--teacher", t, "--data", d, "--label_column", "polarity"],
                           ["--label_column", "polarity"]),
    "no-text-column": (lambda w, t, d: ["--teacher", t, "--data", _bad_data(
        w, "notext", "review\tlabel\ngood\t1\nbad\t0\n", "review\tlabel\ngood\t1\n")],
                       ["no text column", "--text_column"]),
    "task-and-data": (lambda w, t, d: ["--teacher", t, "--data", d, "--task", "sst2"], ["--task", "--data"]),
    "neither-task-nor-data": (lambda w, t, d: ["--teacher", t], ["--task", "--data"]),
    "unknown-task": (lambda w, t, d: ["--teacher", t, "--task", "sst3"], ["--task", "sst3"]),
    "missing-teacher-folder": (lambda w, t, d: ["--teacher", "./no_such_teacher", "--data", d],
                               ["--teacher", "no_such_teacher"]),
    "teacher-not-an-encoder": (lambda w, t, d: ["--teacher", _gpt2(w), "--data", d], ["--teacher", "gpt2"]),
    "layers-0": (lambda w, t, d: ["--teacher", t, "--data", d, "--layers", "0"], ["--layers 0"]),
    "layers-too-many": (lambda w, t, d: ["--teacher", t, "--data", d, "--layers", "5"], ["--layers 5", "4"]),
    "temperature-0": (lambda w, t, d: ["--teacher", t, "--data", d, "--temperature", "0"], ["--temperature"]),
    "negative-alpha-kd": (lambda w, t, d: ["--teacher", t, "--data", d, "--alpha_kd", "-0.5"], ["--alpha_kd"]),
    "warmup-1.5": (lambda w, t, d: ["--teacher", t, "--data", d, "--warmup", "1.5"], ["--warmup"]),
    "epochs-0": (lambda w, t, d: ["--teacher", t, "--data", d, "--epochs", "0"], ["--epochs"]),
    "checkpoint-minutes-0": (lambda w, t, d: ["--teacher", t, "--data", d, "--checkpoint_minutes", "0"],
                             ["--checkpoint_minutes 0", "must be > 0"]),
    "layers-past-the-student": (lambda w, t, d: ["--teacher", t, "--data", d, "--student", t, "--layers", "5"],
                                ["--layers 5", "the student's 4 layers"]),
    "fsdp-on-a-cpu": (lambda w, t, d: ["--teacher", t, "--data", d, "--accelerator", "cpu", "--strategy", "fsdp"],
                      ["--strategy fsdp", "GPU"]),
    "device-map-with-ddp": (lambda w, t, d: ["--teacher", t, "--data", d, "--teacher_device_map", "auto",
                                             "--devices", "2"], ["--teacher_device_map auto", "--devices 1"]),
    "device-map-not-json": (lambda w, t, d: ["--teacher", t, "--data", d, "--teacher_device_map", "map.yaml"],
                            ["--teacher_device_map map.yaml", "JSON"]),
    "cache-with-hidden-loss": (lambda w, t, d: ["--teacher", t, "--data", d, "--cache_teacher"],
                               ["--cache_teacher", "--alpha_hidden 0"]),
    # transformers 5 makes a tokenizer of special tokens alone from a folder without tokenizer files: all [UNK]
    "teacher-without-tokenizer": (lambda w, t, d: ["--teacher", _model_copy(w, t, "notok", tokenizer="none"),
                                                   "--data", d], ["--teacher", "notok", "no tokenizer files"]),
    "tokenizer-past-the-embeddings": (lambda w, t, d: ["--teacher", _model_copy(w, t, "bigtok", tokenizer="bigger"),
                                                       "--data", d], ["--teacher", "tokens but", "embedding table"]),
    "max-length-past-the-positions": (lambda w, t, d: ["--teacher", t, "--data", d, "--max_length", "512"],
                                      ["--max_length 512", "at most 128 tokens"]),
    "corrupt-weights": (lambda w, t, d: ["--teacher", _model_copy(w, t, "corrupt", weights=b"\xff" * 64),
                                         "--data", d], ["--teacher", "corrupt", "cannot load the weights"]),
    "negative-num-workers": (lambda w, t, d: ["--teacher", t, "--data", d, "--num_workers", "-1"],
                             ["--num_workers"]),
    "label-column-holds-text": (lambda w, t, d: ["--teacher", t, "--data", _text_labels(w)],
                                ["--label_column label", "30 distinct values", "not class labels"]),
    "tracking-not-a-store": (lambda w, t, d: ["--teacher", t, "--data", d, "--tracking", "foo://bar"],
                             ["--tracking foo://bar", "not an MLflow store"]),
    "tracking-not-a-database": (lambda w, t, d: ["--teacher", t, "--data", d, "--tracking", _text_file(w, "notes.db")],
                                ["--tracking", "notes.db is not an SQLite database"]),
    "teacher-cache-cannot-be-made": (lambda w, t, d: ["--teacher", t, "--data", d, "--teacher_cache", "/proc/no/c"],
                                     ["--teacher_cache", "cannot create /proc/no"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clean_error(case: str, tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    build, wanted = BAD_INPUTS[case]
    args = ["distill", *build(workdir, tiny_teacher, tiny_data), "--output", "out", *FAST]
    code, _, err = run_main(args)
    assert code != 0
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for text in wanted:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert leftovers(workdir / "out") == []
    assert not (workdir / "outputs").exists()


@pytest.mark.parametrize("where", ["file", "proc", "in-proc", "root", "empty"])
def test_an_output_that_cannot_be_a_folder_is_refused_first(where: str, tiny_teacher: Path, tiny_data: Path,
                                                            workdir: Path) -> None:
    """A file is never replaced, even with --overwrite (it is not a model); nothing is written and no MLflow run
    opens."""
    (workdir / "notes.txt").write_text("mine")
    # /proc itself exists, and root may "write" in it by its permission bits: it refuses every new entry (a
    # traceback from the first write, with the MLflow run left RUNNING)
    output, wanted = {"file": ("notes.txt", "is a file"), "proc": ("/proc/nope/out", "cannot create /proc/nope"),
                      "in-proc": ("/proc/out", "cannot write in /proc"),
                      "root": ("/", "name a new folder"), "empty": ("", "empty")}[where]
    for command in (["distill", "--teacher", tiny_teacher, "--data", tiny_data],
                    ["prune", "--model", tiny_teacher, "--data", tiny_data, "--heads", "0.5"],
                    ["export", "--model", tiny_teacher, "--format", "hf"]):
        code, _, err = run_main([*command, "--output", output, "--overwrite", *track(workdir)])
        assert code == 1 and "Traceback" not in err, err
        (line,) = error_lines(err)
        assert line.startswith(f"compress: error: --output{' ' if output else ':'}{output}") and wanted in line, line
        assert (workdir / "notes.txt").read_text() == "mine"
        assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"] + (["mlruns"] if
                                                                             (workdir / "mlruns").exists() else [])
        assert not (workdir / "mlruns").exists() or mlflow_runs(sqlite_uri(workdir / "mlruns")) == []


@pytest.mark.parametrize("command", ["finetune", "distill", "prune", "share", "export"])
def test_overwrite_never_deletes_the_data_the_run_reads(command: str, tiny_teacher: Path, tiny_data: Path,
                                                        workdir: Path) -> None:
    """--data inside an earlier output: --overwrite replaced the output, and the data folder went with it."""
    import shutil

    shutil.copytree(tiny_teacher, workdir / "earlier")
    shutil.copytree(tiny_data, workdir / "earlier" / "mydata")
    flag = "--teacher" if command == "distill" else "--model"
    extra = {"prune": ["--heads", "0.5", *FAST], "export": ["--format", "hf"]}.get(command, FAST)
    code, _, err = run_main([command, flag, tiny_teacher, "--data", workdir / "earlier" / "mydata", *extra,
                             "--output", "earlier", "--overwrite", *track(workdir)])
    assert code == 1 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert line == (f"compress: error: --output earlier: holds {workdir / 'earlier' / 'mydata'}, which this run "
                    "reads; choose another folder"), line
    assert sorted(p.name for p in (workdir / "earlier" / "mydata").iterdir()) == ["dev.tsv", "train.tsv"]


@pytest.mark.parametrize(("flags", "wanted"), [
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--latency_reps", "0"], "--latency_reps 0: must be at least 1"),
    (["--latency_seq", "4096"], "--latency_seq 4096"),
    (["--max_length", "0"], "--max_length 0"),
    (["--json_out", "."], "--json_out .: is a folder"),
    (["--json_out", "/proc/nope/r.json"], "--json_out /proc/nope/r.json: cannot create"),
])
def test_evaluate_checks_its_flags_before_scoring(flags: list[str], wanted: str, tiny_teacher: Path,
                                                  tiny_data: Path, workdir: Path) -> None:
    code, out, err = run_main(["evaluate", "--model", tiny_teacher, "--data", tiny_data, *flags])
    assert code == 1 and "Traceback" not in err and out == "", err
    (line,) = error_lines(err)
    assert wanted in line, line


@pytest.mark.parametrize("command", ["evaluate", "export", "bench", "prune", "distill", "finetune"])
def test_a_weights_file_lacking_a_layer_is_refused_by_each_command(command: str, tiny_teacher: Path, tiny_data: Path,
                                                                  workdir: Path) -> None:
    """transformers left the missing layer random and said so in a log line compress silences (for a new head's
    sake): evaluate scored, export wrote and bench timed a model of random weights, and each exited 0."""
    from safetensors.torch import load_file, save_file

    folder = _model_copy(workdir, tiny_teacher, "lacking")
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".layer.3." not in k}, str(folder / "model.safetensors"))
    flag = "--teacher" if command == "distill" else "--model"
    args = {"evaluate": ["--data", tiny_data], "export": ["--format", "hf", "--output", "out"],
            "bench": ["--reps", "1", "--batch", "1", "--seq", "8"], "prune": ["--data", tiny_data, "--heads", "0.5",
                                                                        "--output", "out"],
            "distill": ["--data", tiny_data, "--output", "out"],
            "finetune": ["--data", tiny_data, "--output", "out"]}[command]
    tracked = [] if command in ("bench", "evaluate") else track(workdir)
    code, _, err = run_main([command, flag, folder, *args, *tracked])
    assert code == 1 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert line == (f"compress: error: {flag} {folder}: the weights file does not match its config.json: it lacks 16 "
                    "of the model's tensors (bert.encoder.layer.3.attention.output.LayerNorm.bias, ...)"), line
    assert leftovers(workdir / "out") == []


def test_a_run_that_diverges_fails_in_one_line_and_leaves_no_model(tiny_teacher: Path, tiny_data: Path,
                                                                   workdir: Path) -> None:
    """--lr 1e30 made every weight NaN: the model was scored (0.5, an argmax over NaN logits), saved as a finished
    output, and its run marked FINISHED."""
    code, _, err = run_main(["finetune", "--model", tiny_teacher, "--data", tiny_data, "--lr", "1e30", "--epochs", "2",
                             "--output", "out", *FAST, *track(workdir)])
    assert code == 1 and "Traceback" not in err, err
    (line,) = error_lines(err)  # at the start of its own line, not after the progress bar's
    assert line == ("compress: error: training diverged in epoch 1: the trained weights hold NaN or inf; try a lower "
                    "--lr, with --overwrite to start over"), err[-2000:]
    assert "Epoch 1" not in err  # the second epoch never ran
    assert not (workdir / "out").exists()
    _, runs = mlflow_runs(sqlite_uri(workdir))
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "val_score" not in runs[0].data.metrics  # the NaN model was never scored (nor judged by a pruner)


def test_json_out_never_takes_a_models_own_file(tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    config = (tiny_teacher / "config.json").read_text()
    code, _, err = run_main(["evaluate", "--model", tiny_teacher, "--data", tiny_data,
                             "--json_out", tiny_teacher / "config.json"])
    (line,) = error_lines(err)
    assert code == 1 and "one of a model's own files" in line
    assert (tiny_teacher / "config.json").read_text() == config


def test_an_atomic_write_spares_the_users_folders_and_replaces_a_link_not_its_target(tiny_teacher: Path,
                                                                                   workdir: Path) -> None:
    """The temporary and the replaced folder have fresh hidden names, so OUTPUT.tmp or OUTPUT.old of the user's
    survive; --overwrite of a link to an earlier output moves the link, not what it points to."""
    for name in ("res.tmp", "res.old"):
        (workdir / name).mkdir()
        (workdir / name / "important.txt").write_text("keep")
    ok(["export", "--model", tiny_teacher, "--format", "hf", "--output", "res"])
    ok(["export", "--model", tiny_teacher, "--format", "hf", "--output", "res", "--overwrite"])
    assert all((workdir / name / "important.txt").read_text() == "keep" for name in ("res.tmp", "res.old"))
    (workdir / "link").symlink_to(workdir / "res")
    ok(["export", "--model", tiny_teacher, "--format", "hf", "--output", "link", "--overwrite"])
    assert not (workdir / "link").is_symlink() and (workdir / "link" / "config.json").is_file()
    assert (workdir / "res" / "config.json").is_file()  # the link's old target is left as it was
    assert sorted(p.name for p in workdir.iterdir()) == ["link", "res", "res.old", "res.tmp"]


def test_json_out_replaces_an_earlier_result_but_not_data(tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    import shutil

    data = shutil.copytree(tiny_data, workdir / "data")
    train = (data / "train.tsv").read_text()
    code, _, err = run_main(["evaluate", "--model", tiny_teacher, "--data", data, "--json_out", data / "train.tsv"])
    (line,) = error_lines(err)
    assert code == 1 and "not an earlier JSON result" in line and (data / "train.tsv").read_text() == train
    (workdir / "r.json").write_text('{"score": 0}')
    out, _ = ok(["evaluate", "--model", tiny_teacher, "--data", data, "--latency_reps", "1", "--json_out", "r.json"])
    assert json.loads((workdir / "r.json").read_text()) == json.loads(out)


def test_an_output_path_through_a_missing_folder_makes_no_folder(tiny_teacher: Path, workdir: Path) -> None:
    """x/../out is out: nothing named x appears, and the new folder has the umask's mode, not mkdtemp's 0700."""
    ok(["export", "--model", tiny_teacher, "--format", "hf", "--output", "x/../out"])
    assert sorted(p.name for p in workdir.iterdir()) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert (workdir / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_evaluate_creates_the_json_outs_folder(tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    out, _ = ok(["evaluate", "--model", tiny_teacher, "--data", tiny_data, "--latency_reps", "1",
                 "--json_out", "results/r.json"])
    assert json.loads((workdir / "results" / "r.json").read_text()) == json.loads(out)


@pytest.mark.parametrize(("tokenizer", "wanted"), [("none", "no tokenizer files"), ("bigger", "embedding table")])
def test_export_and_evaluate_refuse_a_tokenizer_that_is_not_the_models(tokenizer: str, wanted: str, tiny_teacher: Path,
                                                                     tiny_data: Path, workdir: Path) -> None:
    model = _model_copy(workdir, tiny_teacher, "odd", tokenizer=tokenizer)
    for command in (["export", "--model", model, "--format", "hf", "--output", "exported"],
                    ["evaluate", "--model", model, "--data", tiny_data]):
        code, _, err = run_main(command)
        assert code == 1 and "Traceback" not in err, err
        (line,) = error_lines(err)
        assert "--model" in line and wanted in line, line
    assert leftovers(workdir / "exported") == []


def test_existing_output_needs_overwrite(tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    (workdir / "out").mkdir()
    (workdir / "out" / "keep.txt").write_text("mine")
    args = ["distill", "--teacher", tiny_teacher, "--data", tiny_data, "--epochs", "1", "--output", "out", *FAST,
            *track(workdir)]
    code, _, err = run_main(args)
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "--output" in line and "--overwrite" in line
    assert leftovers(workdir / "out") == ["out"]
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["keep.txt"]
    # --overwrite replaces an earlier output, not a folder of the user's other things
    code, _, err = run_main([*args, "--overwrite"])
    (line,) = error_lines(err)
    assert code == 1 and "holds none" in line and (workdir / "out" / "keep.txt").read_text() == "mine"
    ok(args[:-2] + ["--output", "out2", *track(workdir)])  # an earlier output ...
    ok([*args[:-2], "--output", "out2", *track(workdir), "--overwrite"])  # ... is replaced
    assert (workdir / "out2" / "model.safetensors").is_file() and leftovers(workdir / "out2") == ["out2"]


def test_overwrite_never_deletes_what_the_run_reads(tiny_teacher: Path, tiny_data: Path, workdir: Path) -> None:
    """--output naming the model itself, a folder above it, or the folder of the MLflow store is refused even
    with --overwrite, which would delete them."""
    import shutil

    shutil.copytree(tiny_teacher, workdir / "models" / "teacher")
    teacher = workdir / "models" / "teacher"
    for command, output in ((["distill", "--teacher", teacher], teacher), (["distill", "--teacher", teacher],
                                                                          workdir / "models"),
                            (["prune", "--model", teacher, "--heads", "0.5"], teacher),
                            (["export", "--model", teacher, "--format", "hf"], workdir / "models"),
                            (["distill", "--teacher", teacher], workdir / "mlruns"),
                            (["export", "--model", teacher, "--format", "hf"], workdir / "mlruns")):
        (workdir / "mlruns").mkdir(exist_ok=True)
        code, _, err = run_main([*command, *(["--data", tiny_data] if command[0] != "export" else []),
                                 "--output", output, "--overwrite", *track(workdir)])
        (line,) = error_lines(err)
        assert code == 1 and "which this run reads" in line, line
        assert (teacher / "model.safetensors").is_file()


def test_git_commit_says_dirty_and_never_takes_another_repositorys_commit(tmp_path: Path) -> None:
    """A run from edited code is not reproducible from its commit; a compress installed into a virtualenv inside the
    user's own repository reported that repository's commit."""
    from compress.infra.tracking import git_commit

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    assert git_commit(tmp_path) == "unknown"  # no repository
    package, installed = tmp_path / "compress", tmp_path / ".venv" / "site-packages" / "compress"
    for folder in (package, installed):
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
    git("init", "-q")
    git("add", "compress")
    git("commit", "-qm", "first")
    head = git("rev-parse", "HEAD")
    assert git_commit(package) == head
    assert git_commit(installed) == "unknown"  # inside the repository, but not its code
    (package / "__init__.py").write_text("x = 1\n")
    assert git_commit(package) == f"{head}-dirty"
