"""Distillation quality on real SST-2: compress distill against a plain hand-written KD loop, in one run.

    python experiments/bench_distill.py                      # MiniLM-L6 teacher, 4,000 train rows, 5 epochs
    python experiments/bench_distill.py --train_rows 67349   # the whole train set (slow on a CPU)
    python experiments/bench_distill.py --seeds 42,43,44     # three training seeds on the same rows: mean and sd
                                                             # (rerun the same command to resume a cut-short run)
    python experiments/bench_distill.py --tiny               # a smoke run on tiny random models and toy data
    # issue 23's table: the MPNet teacher too (../shared/models/get_mpnet.sh ../shared/models puts it together)
    python experiments/bench_distill.py --seeds 42,43,44 --unlabeled_rows 20000 --augment 4 \
        --teacher2 ../shared/models/all-mpnet-base-v2 --json outputs/bench_distill/issue23.json

Steps: fine-tune the teacher (and --teacher2) with `compress finetune` on the same rows (reused if the folder
exists), distil a 3-layer student with `compress distill`'s own pipeline, then train the same 3-layer
initialisation with a plain loop (soft targets + hard labels, TextBrewer-style: same teacher, data, epochs, batch
size, temperature and peak lr) and without a teacher (hard labels only). More compress rows: + --unlabeled (the
train texts outside the labelled rows, labels dropped, --unlabeled_rows of them), + --augment N, and with
--teacher2 the same student (the first teacher's layers) distilled from that teacher, with and without the
unlabelled text. All students are scored on GLUE's SST-2 dev set (872 rows), against their own teacher
(retention) and against labels only (gain); the CPU latency is timed against the teacher at batch 32 x 128. With
--seeds, each row is trained once per seed on the same rows, and the table gives the mean, the sample sd and
every seed's score; each row's wall time is its mean per seed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / ".." / "shared" / "data" / "sst2"


def plain_loop(teacher, student, tokenizer, task, *, epochs: int, batch_size: int, lr: float, temperature: float,
               alpha: float, seed: int, max_length: int) -> None:
    """The baseline everyone writes first: AdamW, linear decay, KL*T² and CE mixed by alpha, fp32."""
    torch.manual_seed(seed)
    rows = list(zip(task.train_texts, task.train_labels))
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(rows) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    if teacher is not None:
        teacher.eval()
    rng = random.Random(seed)
    for epoch in range(epochs):
        student.train()
        rng.shuffle(rows)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            enc = tokenizer([t[0] for t, _ in chunk], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
            labels = torch.tensor([y for _, y in chunk])
            logits = student(**enc).logits
            loss = F.cross_entropy(logits, labels) * (1 - alpha)
            if teacher is not None and alpha > 0:
                with torch.no_grad():
                    t_logits = teacher(**enc).logits
                kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(t_logits / temperature, -1),
                              reduction="batchmean")
                loss = loss + alpha * kl * temperature**2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            print(f"\r  plain loop epoch {epoch + 1}/{epochs} step {i // batch_size + 1}", end="", file=sys.stderr)
    print(file=sys.stderr)


@torch.inference_mode()
def accuracy(model, tokenizer, task, max_length: int) -> float:
    model.eval()
    right = 0
    for i in range(0, len(task.dev_labels), 64):
        texts = task.dev_texts[i : i + 64]
        enc = tokenizer([t[0] for t in texts], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        right += (model(**enc).logits.argmax(-1) == torch.tensor(task.dev_labels[i : i + 64])).sum().item()
    return right / len(task.dev_labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="minilm-l6")
    p.add_argument("--teacher2", help="a second teacher of another family (e.g. the folder get_mpnet.sh makes), "
                                      "fine-tuned on the same rows; adds its rows, with and without --unlabeled")
    p.add_argument("--data", default=str(SST2))
    p.add_argument("--train_rows", type=int, default=4000)
    p.add_argument("--unlabeled_rows", type=int, default=20000,
                   help="train texts outside the labelled subset, labels dropped, for the --unlabeled rows (0: none)")
    p.add_argument("--augment", type=int, default=4, help="copies a text for the --augment row (0: no such row)")
    p.add_argument("--augment_model", help="distill's --augment_model (default: the teacher's embeddings)")
    p.add_argument("--epochs", type=int, default=5, help="student epochs, the same for every student")
    p.add_argument("--temperature", type=float, help="soft-target temperature for both KD runs (default: distill's)")
    p.add_argument("--teacher_epochs", type=int, default=2)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--workdir", default="outputs/bench_distill")
    p.add_argument("--tracking", default="sqlite:///mlruns/mlflow.db")
    p.add_argument("--seeds", default="42", help="comma-separated training seeds; >1 prints mean and sd per row")
    p.add_argument("--json", help="also write the table's numbers to this JSON file")
    p.add_argument("--tiny", action="store_true", help="smoke run on tiny random models and toy data")
    p.add_argument("--rows", nargs="+", metavar="ROW",
                   help="train only these rows, named as the table names them (e.g. 'teacher2: compress distill'); "
                        "the others are read from the results kept in --workdir where there, left out where not")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: print the table from the results kept in --workdir, each row over the seeds "
                        "it has (the n column)")
    args = p.parse_args()

    import compress
    from compress.api import (DataConfig, DistillConfig, FinetuneConfig, LossConfig, RuntimeConfig,
                              TrackingConfig, TrainingConfig)
    from compress.data.tasks import load_task
    from compress.options.commands import flag_defaults

    distill_defaults = flag_defaults("distill")  # what `compress distill` runs with when a flag is not given
    if args.temperature is None:
        args.temperature = distill_defaults["temperature"]
    from compress.models.measure import count_params, latency_ms
    from compress.models.loading import load_classifier, load_tokenizer, student_from_teacher, teacher_layer_map

    work = Path(args.workdir)
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import make_rows, save_tiny_bert, save_tiny_mpnet, write_tsv

        work = Path(tempfile.mkdtemp(prefix="bench_distill_"))
        args.teacher = str(save_tiny_bert(work / "encoder", head=False))
        args.teacher2 = str(save_tiny_mpnet(work / "mpnet"))  # another family, another vocabulary
        args.data = str(write_tsv(work / "data", train=128, dev=64))
        args.train_rows, args.epochs, args.teacher_epochs, args.augment = 128, 3, 8, 1
        args.unlabeled_rows = min(args.unlabeled_rows, 256)
        args.tracking = f"sqlite:///{work}/mlruns/mlflow.db"
    elif not Path(args.data).exists():
        sys.exit(f"no SST-2 at {args.data}: this benchmark reads ../shared/data/sst2 (see its README)")
    lr_teacher = 3e-3 if args.tiny else 5e-5
    data = DataConfig(data=args.data, max_train=args.train_rows)
    common = dict(runtime=RuntimeConfig(latency_reps=3),
                  tracking=TrackingConfig(tracking=args.tracking, experiment="bench_distill"))

    def finetuned(model: str, name: str) -> tuple[Path, float]:
        folder = work / f"{name}-{args.train_rows}"
        t0 = time.perf_counter()
        if not (folder / "config.json").exists():
            if args.report_only:
                sys.exit(f"--report_only: no fine-tuned {name} in {folder}; run the benchmark first")
            compress.finetune(FinetuneConfig(model=model), data,
                              training=TrainingConfig(epochs=args.teacher_epochs, lr=lr_teacher), **common,
                              output=resumable(folder))
        return folder, time.perf_counter() - t0

    teacher_dir, t_teacher = finetuned(args.teacher, "teacher")
    teacher2_dir = finetuned(args.teacher2, "teacher2")[0] if args.teacher2 else None

    task = load_task(data=args.data, max_train=args.train_rows, seed=42)  # the rows the teachers were tuned on
    unlabeled, n_unlabeled = None, 0
    if args.unlabeled_rows:
        if args.tiny:
            texts = [t for t, _ in make_rows(args.unlabeled_rows, seed=7)]
        else:  # the train texts outside the labelled subset, their labels dropped
            labelled = set(task.train_texts)
            texts = [t[0] for t in load_task(data=args.data).train_texts if t not in labelled]
            random.Random(0).shuffle(texts)
            texts = texts[: args.unlabeled_rows]
        unlabeled, n_unlabeled = work / f"unlabeled-{len(texts)}.txt", len(texts)
        write_if_changed(unlabeled, "\n".join(texts) + "\n")  # a second run sharing --workdir may be reading it
    seeds = [int(x) for x in args.seeds.split(",")]
    seed_data = data
    if seeds != [42]:
        # distill's --seed also draws the --max_train subset: hand every seed the teacher's rows as a folder instead,
        # so that only initialisation, order and dropout change between seeds
        rows_dir = work / f"rows-{args.train_rows}"
        write_jsonl(rows_dir, task)
        seed_data = DataConfig(data=str(rows_dir), max_train=None)
    tokenizer = load_tokenizer(str(teacher_dir))
    teacher = load_classifier(str(teacher_dir), task.label_names)
    kept = teacher_layer_map(teacher.config.num_hidden_layers, args.layers)
    # the same peak learning rate as compress distill's default: the loops differ in recipe, not in tuning
    lr_plain = 3e-3 if args.tiny else distill_defaults["lr"]
    lr_ours = {"lr": 3e-3} if args.tiny else {}

    # name -> (teacher folder, DistillConfig changes); every compress row's student is the same 3 layers of the
    # fine-tuned first teacher (its layers [0, 2, 4] with its head), whichever teacher it learns from
    recipes: dict[str, tuple[Path, dict]] = {"compress distill": (teacher_dir, {})}
    if unlabeled:
        recipes["+ --unlabeled"] = (teacher_dir, {"unlabeled": str(unlabeled)})
    if args.augment:
        recipes[f"+ --augment {args.augment}"] = (teacher_dir, {"augment": args.augment,
                                                                "augment_model": args.augment_model})
    if teacher2_dir:
        first = {"student": str(teacher_dir), "layers": args.layers}
        recipes["teacher2: compress distill"] = (teacher2_dir, first)
        if unlabeled:
            recipes["teacher2: + --unlabeled"] = (teacher2_dir, first | {"unlabeled": str(unlabeled)})
    names = ["no KD (labels only)", "plain KD loop", *recipes]
    if unknown := set(args.rows or ()) - set(names):
        sys.exit(f"--rows: no row named {', '.join(map(repr, sorted(unknown)))} with these flags; the rows are "
                 + ", ".join(map(repr, names)))
    skip = (lambda name: True) if args.report_only else (lambda name: bool(args.rows) and name not in args.rows)
    scores: dict[str, dict[int, float]] = {n: {} for n in names}  # row -> seed -> dev accuracy
    seconds: dict[str, list[float]] = {n: [] for n in names}
    runs: dict[str, dict] = {}
    # every (row, seed) result is kept as it lands, so a run cut short resumes at the row it was on; a row's key
    # holds every flag that changes its number, so a rerun with other flags trains afresh only the rows they touch
    # Two runs may share --workdir (say one per core, each on other seeds or teachers): each writes its result into
    # the file as it is on disk then, under a lock, so neither drops the other's rows.
    done_file = work / f"results-L{args.layers}-{args.train_rows}.json"
    done = {"rows": {}} if args.tiny else read_results(done_file)
    common_key = {k: getattr(args, k) for k in ("teacher", "data", "epochs", "temperature", "teacher_epochs")}

    def row_key(name: str, seed: int, changes: dict | None = None, teacher_from: Path | None = None) -> str:
        return json.dumps([name, seed, common_key, {k: str(v) for k, v in (changes or {}).items()},
                           str(teacher_from or "")], sort_keys=True)

    def record(key: str, name: str, seed: int, score: float, wall: float, metrics: dict | None = None) -> None:
        scores[name][seed] = score
        seconds[name].append(wall)
        if metrics is not None:
            runs[name] = metrics
        if key not in done["rows"] and not args.tiny:
            keep_result(done_file, done, key, {"score": score, "seconds": wall, "metrics": metrics})

    for seed in seeds:
        for name, alpha, with_teacher in (("plain KD loop", 0.5, True), ("no KD (labels only)", 0.0, False)):
            key = row_key(name, seed)
            if (kept_row := done["rows"].get(key)) is not None:
                record(key, name, seed, kept_row["score"], kept_row["seconds"])
                continue
            if skip(name):
                continue
            student = student_from_teacher(teacher, kept)
            t0 = time.perf_counter()
            plain_loop(teacher if with_teacher else None, student, tokenizer, task, epochs=args.epochs, batch_size=32,
                       lr=lr_plain, temperature=args.temperature, alpha=alpha, seed=seed, max_length=128)
            record(key, name, seed, accuracy(student, tokenizer, task, 128), time.perf_counter() - t0)
        for name, (teacher_from, changes) in recipes.items():
            key = row_key(name, seed, changes, teacher_from)
            if (kept_row := done["rows"].get(key)) is not None:
                record(key, name, seed, kept_row["score"], kept_row["seconds"], kept_row["metrics"])
                continue
            if skip(name):
                continue
            out = work / f"student-L{args.layers}-{args.train_rows}" / slug(name) / f"seed{seed}"
            step = DistillConfig(teacher=str(teacher_from), layers=args.layers)
            t0 = time.perf_counter()
            metrics = compress.distill(
                replace(step, **changes), seed_data, loss=LossConfig(temperature=args.temperature),
                training=TrainingConfig(epochs=args.epochs, seed=seed, **lr_ours), **common,
                output=resumable(out)).metrics
            record(key, name, seed, metrics["student_score"], time.perf_counter() - t0, dict(metrics))
    student = student_from_teacher(teacher, kept)  # the students' shape, for the latency and parameters below

    names = [n for n in names if scores[n]]  # --rows and --report_only: the rows kept for at least one seed
    if "compress distill" not in runs or "no KD (labels only)" not in names:
        sys.exit(f"{done_file} holds no compress distill or labels-only result for seeds {args.seeds} with these "
                 "flags: run those rows too")
    ours = runs["compress distill"]
    lat = latency_ms({"teacher": teacher, "student": student}, batch=32, seq=128, reps=5,
                     vocab_size=teacher.config.vocab_size)
    t_score = ours["teacher_score"]
    teacher_of = {name: runs[name]["teacher_score"] for name in recipes if name in runs} | {
        n: t_score for n in ("no KD (labels only)", "plain KD loop")}
    base = statistics.mean(scores["no KD (labels only)"].values())
    n_student = count_params(student)
    print(f"\n{Path(args.data).name} dev ({len(task.dev_labels)} rows); teachers fine-tuned on "
          f"{len(task.train_labels)} rows for {args.teacher_epochs} epochs: {Path(args.teacher).name} {t_score:.3f} "
          f"({count_params(teacher):,} params, {t_teacher:.0f} s)"
          + (f", {Path(args.teacher2).name} {runs['teacher2: compress distill']['teacher_score']:.3f} "
             f"({int(runs['teacher2: compress distill']['teacher_params']):,} params)"
             if "teacher2: compress distill" in runs else "")
          + f"; students {args.layers} of {teacher.config.num_hidden_layers} layers of the first teacher, "
          f"{args.epochs} epochs, T={args.temperature:g}; seeds {args.seeds}"
          + (f"; --unlabeled: {n_unlabeled:,} texts" if unlabeled else ""))
    per_seed = "".join(f"{'seed ' + str(s):>10}" for s in seeds) if len(seeds) > 1 else ""
    print(f"{'model':<28}{'n':>3}{'dev acc':>9}{'± sd':>7}{'retention':>11}{'vs labels':>11}{per_seed}"
          f"{'params':>13}{'train s':>9}")
    table = {}
    for name in names:
        accs = list(scores[name].values())
        mean, sd = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        retention, gain = mean / teacher_of[name], mean - base
        cells = "".join(f"{scores[name][s]:>10.3f}" if s in scores[name] else f"{'-':>10}" for s in seeds) \
            if per_seed else ""
        print(f"{name:<28}{len(accs):>3}{mean:>9.3f}{sd:>7.3f}{retention:>11.3f}{gain:>+11.3f}{cells}"
              f"{n_student:>13,}{statistics.mean(seconds[name]):>9.0f}")
        table[name] = {"score": mean, "sd": sd, "scores": scores[name], "teacher_score": teacher_of[name],
                       "retention": retention, "gain_over_labels_only": gain, "params": n_student,
                       "seconds": statistics.mean(seconds[name])}
    if "teacher2: compress distill" in runs:
        t2_params = int(runs["teacher2: compress distill"]["teacher_params"])
        print(f"the student has {t2_params / n_student:.1f}x fewer parameters than {Path(args.teacher2).name} "
              f"({n_student:,} against {t2_params:,})")
    print(f"compression {ours['compression']:.2f}x; CPU latency at 32x128: teacher {lat['teacher']:.0f} ms, "
          f"student {lat['student']:.0f} ms, speedup {lat['teacher'] / lat['student']:.2f}x "
          f"(compress distill's own run measured {ours['speedup']:.2f}x). One dev accuracy on "
          f"{len(task.dev_labels)} rows has a "
          f"binomial sd of about {100 * (t_score * (1 - t_score) / len(task.dev_labels)) ** 0.5:.1f} points.")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "seeds": seeds, "train_rows": len(task.train_labels),
                                               "unlabeled_rows": n_unlabeled}, indent=1))


def resumable(folder: Path):
    """Where a benchmark run writes: a run cut short (its FOLDER.partial left) goes on from its last checkpoint."""
    from compress.api import OutputConfig
    from compress.engine.state import RunState

    return OutputConfig(output=str(folder), overwrite=True, resume=RunState.partial(folder).exists())


def read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def keep_result(path: Path, done: dict, key: str, result: dict) -> None:
    """Add one (row, seed) result to `done` and to the file at `path`, keeping every row another process sharing
    the file wrote since `done` was read."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done["rows"].update(read_results(path)["rows"])
        done["rows"][key] = result
        atomic_write(path, json.dumps(done, indent=1))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        atomic_write(path, text)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def write_jsonl(folder: Path, task) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, texts, labels in (("train", task.train_texts, task.train_labels),
                                 ("dev", task.dev_texts, task.dev_labels)):
        # another run sharing --workdir may be reading the same rows
        write_if_changed(folder / f"{split}.jsonl", "".join(
            json.dumps({"sentence": text[0], "label": task.label_names[label]}) + "\n"
            for text, label in zip(texts, labels)))


if __name__ == "__main__":
    main()
