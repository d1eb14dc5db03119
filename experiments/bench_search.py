"""Benchmark compress search: a two-objective search (SST-2 accuracy against parameters) on the MiniLM-L6 teacher.

    python experiments/bench_search.py [--config experiments/search_minilm_sst2.yaml] [--trials 12] [--out DIR]
    python experiments/bench_search.py --tiny      # smoke test: a tiny head-less BERT built here, in a few minutes

The search is the YAML's (`compress search --config` reads the same file); this script only puts its study, models
and MLflow store under --out, then prints the Pareto front (score, params, latency, the recipe) as markdown and
writes it to OUT/bench_search.json. Latency is measured in each trial's own process at batch 32 x 128 on this
machine's CPU, interleaved with the teacher's. Rerunning with the same --out resumes the study (adds --trials).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "search_minilm_sst2.yaml"


def build_tiny(folder: Path) -> tuple[Path, Path]:
    """A small random BERT without a classifier (so the search fine-tunes it first, as it does MiniLM) and
    synthetic sentiment rows it can learn in seconds."""
    sys.path.insert(0, str(ROOT / "tests"))  # the test suite's tiny-model and toy-data helpers
    from helpers import save_tiny_bert, write_tsv

    data = write_tsv(folder / "data", train=512, dev=128)
    raw = save_tiny_bert(folder / "encoder", hidden=64, heads=4, intermediate=256, head=False)
    return raw, data


def tiny_config(folder: Path) -> dict:
    teacher, data = build_tiny(folder)
    return {"teacher": str(teacher), "data": str(data), "objectives": ["score", "params"], "trials": 4,
            "study": "tiny",
            "space": {"layers": [1, 2, 3], "temperature": {"low": 1.0, "high": 8.0, "log": True},
                      "lr": {"low": 1e-4, "high": 2e-3, "log": True}, "heads": [None, 0.5], "ffn": [None, 0.5],
                      "epochs": 2, "recover_epochs": 1, "importance_batches": 4, "latency_reps": 2,
                      "teacher_epochs": 6, "teacher_lr": 2e-3}}


def table(result) -> str:
    lines = [f"| trial | {result.front[0]['metric'] if result.front else 'score'} | params | latency ms | "
             "retention | compression | speedup | recipe |", "|---|---|---|---|---|---|---|---|"]
    t = result.teacher
    if t:
        lines.append(f"| teacher | {t['score']:.4f} | {t['params']:,.0f} | {t['latency_ms']:.1f} | 1.000 | 1.00 | "
                     "1.00 | - |")
    for r in result.front:
        lines.append(f"| {r['trial']} | {r['score']:.4f} | {r['params']:,.0f} | {r['latency_ms']:.1f} | "
                     f"{r['retention']:.3f} | {r['compression']:.2f} | {r['speedup']:.2f} | {r['recipe']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG), help="the search YAML (default: search_minilm_sst2.yaml)")
    parser.add_argument("--trials", type=int, help="trials to run now (default: the YAML's)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="outputs/bench-search", help="study, models and MLflow store")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny model built here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.tiny:
        out = Path(tempfile.mkdtemp(prefix="bench-search-tiny-"))
        config = tiny_config(out / "models")
    else:
        out = Path(args.out)
        config = yaml.safe_load(Path(args.config).read_text())
        data = config.get("data")
        if data and not (ROOT / data).exists() and not Path(data).exists():
            sys.exit(f"bench_search: no data at {data} (the shared SST-2 copy is not on this machine)")
        if data and not Path(data).is_absolute():
            config["data"] = str((ROOT / data).resolve()) if (ROOT / data).exists() else data
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config |= {"output": str(out / "trials"), "tracking": f"sqlite:///{out}/mlruns/mlflow.db",
               "storage": f"sqlite:///{out}/mlruns/optuna.db", "workers": args.workers}
    if args.trials:
        config["trials"] = args.trials
    # the teacher's fine-tuned copy is cached under the study's folder, not the working directory's outputs/
    config["space"] = config["space"] | {"teacher_cache": str(out / "teachers")}

    from compress.options.commands import to_groups
    from compress.search.run import search

    start = time.perf_counter()
    result = search(**to_groups("search", config))
    seconds = time.perf_counter() - start
    print(f"\nsearch benchmark: {config['teacher']} on {config['data']}, {config['trials']} trial(s) this run "
          f"({result.counts.get('complete', 0)} complete in the study), objectives "
          f"{' / '.join(config['objectives'])}, {seconds / 60:.1f} min; latency at batch 32 x 128 on CPU\n")
    print(table(result))
    print(f"\nMLflow: compress ui --tracking sqlite:///{out}/mlruns/mlflow.db   (parent run {result.parent_run_id})")
    (out / "bench_search.json").write_text(json.dumps(
        {"config": config, "seconds": seconds, "counts": result.counts, "teacher": result.teacher,
         "front": result.front, "artifacts": result.artifacts}, indent=2, default=str))


if __name__ == "__main__":
    main()
