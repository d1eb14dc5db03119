"""compress bench: latency and throughput of several models, PyTorch or ONNX, measured side by side in one run.

Every model gets the same random batch, the same threads, and its turn in each round (A, B, A, B, ...), so the
ratios between them hold even when the machine's speed drifts. The JSON records what the numbers depend on:
the CPU, the thread counts, and the torch and onnxruntime versions.
"""

from __future__ import annotations

import json as jsonlib
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from compress.infra.errors import CompressError
from compress.infra.paths import check_file_output, write_json
from compress.infra.results import StepResult
from compress.infra.tracking import shown
from compress.options.groups import BenchConfig, TrackingConfig


def parse_ints(value: str | int, flag: str) -> list[int]:
    """'1,32' -> [1, 32]; each at least 1."""
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise CompressError(f"{flag} {value!r}: expected whole numbers separated by commas, e.g. 1,32") from None
    if not numbers or min(numbers) < 1:
        raise CompressError(f"{flag} {value!r}: expected one or more sizes >= 1, e.g. 1,32")
    return list(dict.fromkeys(numbers))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default method)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def cpu_info() -> dict:
    """CPU model and core counts: logical, physical (when /proc/cpuinfo tells), and usable by this process."""
    name, physical = platform.processor() or platform.machine(), None
    try:
        text = Path("/proc/cpuinfo").read_text()
        models = re.findall(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        name = models[0].strip() if models else name
        cores = set(re.findall(r"^physical id\s*:\s*(\d+)\s*$.*?^core id\s*:\s*(\d+)\s*$", text,
                               re.MULTILINE | re.DOTALL))
        physical = len(cores) or None
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": name, "logical_cores": os.cpu_count(), "physical_cores": physical, "usable_cores": usable,
            "machine": platform.machine(), "system": platform.system(), "python": platform.python_version()}


@dataclass
class Candidate:
    """One model to time: its label, kind (pytorch or onnx), size, and a `run()` bound to the shared batch."""

    label: str
    path: str
    kind: str
    mb: float
    vocab_size: int | None = None
    max_positions: int | None = None
    params: int | None = None
    inputs: list[str] = field(default_factory=list)
    model: object = None
    session: object = None


def _label(path: str, taken: set[str]) -> str:
    p = Path(path.rstrip("/"))
    base = f"{p.parent.name}/{p.name}" if p.suffix == ".onnx" and p.parent.name else p.name or path
    label, n = base, 2
    while label in taken:
        label, n = f"{base}#{n}", n + 1
    taken.add(label)
    return label


def _config_beside(onnx_path: Path):
    """config.json next to an exported .onnx file (compress export writes one), for vocab and position limits."""
    cfg = onnx_path.parent / "config.json"
    if not cfg.is_file():
        return {}
    try:
        return jsonlib.loads(cfg.read_text())
    except ValueError:
        return {}


def load_candidate(name: str, taken: set[str], device: str, threads: int) -> Candidate:
    from compress.exporting.onnx import onnx_session, require_onnx

    path = Path(name).expanduser()
    if path.suffix == ".onnx":
        if not path.is_file():
            raise CompressError(f"--model {name}: no such .onnx file")
        require_onnx(f"--model {name}")
        session = onnx_session(path, device=device, threads=threads, spinning=False)
        unknown = [i.name for i in session.get_inputs() if i.name not in ("input_ids", "attention_mask",
                                                                         "token_type_ids")]
        if unknown:
            raise CompressError(f"--model {name}: takes inputs {', '.join(unknown)}; bench feeds input_ids, "
                                "attention_mask and token_type_ids (what compress export writes)")
        cfg = _config_beside(path)
        data = path.with_name(path.name + ".data")
        mb = (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6
        return Candidate(_label(name, taken), str(path), "onnx", mb, cfg.get("vocab_size"),
                         cfg.get("max_position_embeddings"), None, [i.name for i in session.get_inputs()],
                         session=session)

    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    import compress.models.compress_bert  # noqa: F401  (registers compress_bert: pruned and shared models)
    from compress.models.measure import count_params
    from compress.models.loading import load_config, load_weights, resolve_model

    if path.is_file():
        raise CompressError(f"--model {name}: a file that is not .onnx; pass a saved model folder or an .onnx file")
    folder = resolve_model(name, "--model")
    if not any(f.suffix in (".safetensors", ".bin") for f in Path(folder).iterdir()):
        onnx = sorted(Path(folder).glob("*.onnx"))
        hint = f"; time its ONNX file instead: --model {onnx[0]}" if onnx else ""
        raise CompressError(f"--model {name}: the folder has no PyTorch weights{hint}")
    config = load_config(folder, "--model")
    head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    auto = AutoModelForSequenceClassification if head else AutoModel
    # a headless encoder is timed as it is: masked-LM and sentence-encoder checkpoints have no pooler to load
    model = load_weights(auto, folder, "--model", may_be_new=() if head else ("pooler",), trust_remote_code=False,
                         dtype=torch.float32).eval().to(device)
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    inputs = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
    # the PyTorch weights only: an exported folder also holds .onnx files, which are other candidates
    mb = sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix in (".safetensors", ".bin")) / 1e6
    return Candidate(_label(name, taken), folder, "pytorch", mb, config.vocab_size,
                     getattr(config, "max_position_embeddings", None), count_params(model), inputs, model=model)


def make_runner(c: Candidate, batch: dict, device: str):
    """A zero-argument forward pass of `c` on the shared batch (numpy int64 arrays by input name)."""
    if c.kind == "onnx":
        feed = {n: batch[n] for n in c.inputs}
        return lambda: c.session.run(None, feed)
    import torch

    tensors = {n: torch.from_numpy(batch[n]).to(device) for n in c.inputs}
    cuda = device.startswith("cuda")

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return c.model(**tensors)

    return run


def bench(step: BenchConfig, tracking: TrackingConfig | None = None) -> StepResult:
    """Time `step.model`'s models side by side in interleaved rounds: p50/p95 latency, throughput, speed-ups.

    The result's metrics are keyed bench/MODEL/bBATCH_p50_ms and so on (as logged to `step.run`), its report the
    whole table with hardware and versions (what --json writes).
    """
    import numpy as np

    tracking = tracking or TrackingConfig()
    model, batch, seq, device, warmup, reps = step.model, step.batch, step.seq, step.device, step.warmup, step.reps
    threads, json, run = step.threads, step.json, step.run
    models = [model] if isinstance(model, str) else list(model or [])
    if not models:
        raise CompressError("--model: give at least one model folder or .onnx file")
    batches = parse_ints(batch, "--batch")
    if seq < 1:
        raise CompressError(f"--seq {seq}: must be at least 1")
    if warmup < 0 or reps < 1:
        raise CompressError(f"--warmup {warmup} / --reps {reps}: need warmup >= 0 and reps >= 1")
    if threads is not None and threads < 1:
        raise CompressError(f"--threads {threads}: must be at least 1")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CompressError(f"--device {device}: use cpu or cuda")
    json_file = check_file_output(json, "--json") if json else None

    import torch

    from compress.exporting.registry import get_run
    from compress.models.measure import interleaved_ms
    from compress.engine.trainer import quiet_libraries

    quiet_libraries()
    if run:  # check before minutes of timing, not after
        get_run(run, tracking.tracking)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"--device {device}: no CUDA device is visible")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()

    taken: set[str] = set()
    candidates = [load_candidate(m, taken, device, threads) for m in models]
    for c in candidates:
        if c.max_positions and seq > c.max_positions:
            raise CompressError(f"--seq {seq}: {c.label} takes at most {c.max_positions} positions")
    vocab = min([c.vocab_size for c in candidates if c.vocab_size] or [100])
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    results = []
    for size in batches:
        ids = rng.integers(1, max(2, vocab), (size, seq), dtype=np.int64)
        shared = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        runners = {c.label: make_runner(c, shared, device) for c in candidates}
        print(f"timing batch {size} x {seq} on {device}: {warmup} warm-up + {reps} timed rounds of "
              f"{len(candidates)} model(s)", file=sys.stderr)
        times = interleaved_ms(runners, warmup=warmup, reps=reps, sync=sync)
        first = statistics_row(times[candidates[0].label], size)
        for c in candidates:
            row = statistics_row(times[c.label], size)
            results.append({"model": c.label, "kind": c.kind, "batch": size, "seq": seq, **row,
                            "speedup": first["p50_ms"] / row["p50_ms"], "times_ms": times[c.label]})

    ort_threads = {c.label: c.session.get_session_options().intra_op_num_threads for c in candidates if c.session}
    report = {
        "hardware": cpu_info() | {"gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None},
        "threads": {"torch": threads, "torch_interop": torch.get_num_interop_threads(),
                    "onnxruntime_intra_op": max(ort_threads.values(), default=threads), "onnxruntime_spinning": False},
        "versions": _versions(),
        "settings": {"device": device, "batch": batches, "seq": seq, "warmup": warmup, "reps": reps,
                     "torch_dtype": "bf16 autocast" if device.startswith("cuda") else "fp32",
                     "baseline": candidates[0].label},
        "models": [{"label": c.label, "path": c.path, "kind": c.kind, "mb": c.mb, "params": c.params}
                   for c in candidates],
        "results": results,
    }
    print_table(report)
    if json_file is not None:
        write_json(json_file, report)
    if run:
        log_to_run(run, tracking.tracking, report)
    metrics = {metric_key(r["model"], r["batch"], what): r[what] for r in results
               for what in ("p50_ms", "p95_ms", "throughput", "speedup")}
    return StepResult(str(json_file) if json_file is not None else None, metrics, run, report=report)


def statistics_row(times: list[float], batch: int) -> dict:
    p50 = percentile(times, 50)
    return {"p50_ms": p50, "p95_ms": percentile(times, 95), "mean_ms": sum(times) / len(times),
            "throughput": batch * 1000 / p50}


def _versions() -> dict:
    import importlib.metadata

    import torch
    import transformers

    from compress.infra.version import __version__

    try:
        ort_version = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:  # onnxruntime-gpu, or none at all
        try:
            ort_version = importlib.metadata.version("onnxruntime-gpu")
        except importlib.metadata.PackageNotFoundError:
            ort_version = None
    return {"torch": torch.__version__, "onnxruntime": ort_version,
            "transformers": transformers.__version__, "compress": __version__,
            "python": platform.python_version()}


def print_table(report: dict) -> None:
    hw, th, st = report["hardware"], report["threads"], report["settings"]
    versions = report["versions"]
    print(f"{st['device']}: {hw['gpu'] or hw['cpu']} ({hw['usable_cores']} usable cores); torch {versions['torch']} "
          f"({th['torch']} threads, {st['torch_dtype']}), onnxruntime {versions['onnxruntime']} "
          f"({th['onnxruntime_intra_op']} threads); seq {st['seq']}, {st['warmup']} warm-up + {st['reps']} timed "
          "interleaved rounds")
    mb = {m["label"]: m["mb"] for m in report["models"]}
    width = max(12, *(len(r["model"]) for r in report["results"]))
    print(f"{'model':<{width}}  {'kind':<7} {'MB':>8} {'batch':>5} {'p50 ms':>9} {'p95 ms':>9} {'seq/s':>9} "
          f"{'speedup':>7}")
    for r in report["results"]:
        print(f"{r['model']:<{width}}  {r['kind']:<7} {mb[r['model']]:>8.1f} {r['batch']:>5} {r['p50_ms']:>9.2f} "
              f"{r['p95_ms']:>9.2f} {r['throughput']:>9.1f} {r['speedup']:>6.2f}x")


def metric_key(label: str, batch: int, what: str) -> str:
    """bench/<model>/b<batch>_<what>: MLflow allows letters, digits, _ - . / and spaces in keys."""
    return f"bench/{re.sub(r'[^A-Za-z0-9_./-]+', '_', label)}/b{batch}_{what}"


def log_to_run(run_id: str, tracking: str, report: dict) -> None:
    from mlflow.entities import Metric

    from compress.infra.tracking import mlflow_client

    client = mlflow_client(tracking)
    import time

    now = int(time.time() * 1000)
    metrics = []
    for r in report["results"]:
        for what in ("p50_ms", "p95_ms", "throughput", "speedup"):
            metrics.append(Metric(metric_key(r["model"], r["batch"], what), float(r[what]), now, 0))
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, report, "bench/bench.json")
    print(f"logged {len(metrics)} metrics and bench/bench.json to MLflow run {run_id} in {shown(tracking)}",
          file=sys.stderr)
