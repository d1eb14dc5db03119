"""Distillation quality on real SST-2: compress distill against a plain hand-written KD loop, in one run.

    python experiments/bench_distill.py                      # MiniLM-L6 teacher, 4,000 train rows, 5 epochs
    python experiments/bench_distill.py --train_rows 67349   # the whole train set (slow on a CPU)
    python experiments/bench_distill.py --seeds 42,43,44     # three training seeds on the same rows: mean and sd
    python experiments/bench_distill.py --tiny               # a smoke run on a tiny random BERT and toy data

Steps: fine-tune the teacher with `compress finetune` (reused if the folder exists), distil a 3-layer student
with `compress distill`'s own pipeline, then train the same 3-layer initialisation with a plain loop (soft
targets + hard labels, TextBrewer-style: same teacher, data, epochs, batch size, temperature and peak lr) and
without a teacher (hard labels only). All students are scored on GLUE's SST-2 dev set (872 rows) and timed
against the teacher on the CPU at batch 32 x 128. With --seeds, each row is trained once per seed on the same
rows, and the table gives the mean, the sample sd and every seed's score.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
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
    p.add_argument("--data", default=str(SST2))
    p.add_argument("--train_rows", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=5, help="student epochs, the same for every student")
    p.add_argument("--temperature", type=float, help="soft-target temperature for both KD runs (default: distill's)")
    p.add_argument("--teacher_epochs", type=int, default=2)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--workdir", default="outputs/bench_distill")
    p.add_argument("--tracking", default="sqlite:///mlruns/mlflow.db")
    p.add_argument("--seeds", default="42", help="comma-separated training seeds; >1 prints mean and sd per row")
    p.add_argument("--tiny", action="store_true", help="smoke run on a tiny random BERT and toy data")
    args = p.parse_args()

    import compress
    from compress.api import (DataConfig, DistillConfig, FinetuneConfig, LossConfig, OutputConfig, RuntimeConfig,
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
        from helpers import save_tiny_bert, write_tsv

        work = Path(tempfile.mkdtemp(prefix="bench_distill_"))
        args.teacher = str(save_tiny_bert(work / "encoder", head=False))
        args.data = str(write_tsv(work / "data", train=128, dev=64))
        args.train_rows, args.epochs, args.teacher_epochs = 128, 3, 8
    elif not Path(args.data).exists():
        sys.exit(f"no SST-2 at {args.data}: this benchmark reads ../shared/data/sst2 (see its README)")
    lr_teacher = 3e-3 if args.tiny else 5e-5
    data = DataConfig(data=args.data, max_train=args.train_rows)
    common = dict(runtime=RuntimeConfig(latency_reps=3),
                  tracking=TrackingConfig(tracking=args.tracking, experiment="bench_distill"))

    teacher_dir = work / f"teacher-{args.train_rows}"
    t0 = time.perf_counter()
    if not (teacher_dir / "config.json").exists():
        compress.finetune(FinetuneConfig(model=args.teacher), data,
                          training=TrainingConfig(epochs=args.teacher_epochs, lr=lr_teacher), **common,
                          output=OutputConfig(output=str(teacher_dir), overwrite=True))
    t_teacher = time.perf_counter() - t0

    task = load_task(data=args.data, max_train=args.train_rows, seed=42)  # the rows the teacher was tuned on
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
    names = ["compress distill", "plain KD loop", "no KD (labels only)"]
    scores: dict[str, list[float]] = {n: [] for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    ours = {}
    for seed in seeds:
        ours_dir = work / f"student-L{args.layers}-{args.train_rows}" / f"seed{seed}"
        t0 = time.perf_counter()
        ours = compress.distill(
            DistillConfig(teacher=str(teacher_dir), layers=args.layers), seed_data,
            loss=LossConfig(temperature=args.temperature),
            training=TrainingConfig(epochs=args.epochs, seed=seed, **({"lr": 3e-3} if args.tiny else {})),
            **common, output=OutputConfig(output=str(ours_dir), overwrite=True)).metrics
        seconds["compress distill"].append(time.perf_counter() - t0)
        scores["compress distill"].append(ours["student_score"])
        for name, alpha, with_teacher in (("plain KD loop", 0.5, True), ("no KD (labels only)", 0.0, False)):
            student = student_from_teacher(teacher, kept)
            t0 = time.perf_counter()
            plain_loop(teacher if with_teacher else None, student, tokenizer, task, epochs=args.epochs, batch_size=32,
                       lr=lr_plain, temperature=args.temperature, alpha=alpha, seed=seed, max_length=128)
            scores[name].append(accuracy(student, tokenizer, task, 128))
            seconds[name].append(time.perf_counter() - t0)

    lat = latency_ms({"teacher": teacher, "student": student}, batch=32, seq=128, reps=5,
                     vocab_size=teacher.config.vocab_size)
    t_score = ours["teacher_score"]
    print(f"\nSST-2 dev ({len(task.dev_labels)} rows); teacher {Path(args.teacher).name} fine-tuned on "
          f"{len(task.train_labels)} rows for {args.teacher_epochs} epochs ({t_teacher:.0f} s); students "
          f"{args.layers} of {teacher.config.num_hidden_layers} layers, {args.epochs} epochs, T={args.temperature:g}; "
          f"seeds {args.seeds}")
    per_seed = "".join(f"{'seed ' + str(s):>10}" for s in seeds) if len(seeds) > 1 else ""
    print(f"{'model':<24}{'dev acc':>9}{'± sd':>7}{'retention':>11}{per_seed}{'params':>13}{'train s':>9}")
    print(f"{'teacher':<24}{t_score:>9.3f}{'':>7}{1:>11.3f}{'':>{10 * len(seeds) if per_seed else 0}}"
          f"{count_params(teacher):>13,}")
    for name in names:
        accs = scores[name]
        mean, sd = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        cells = "".join(f"{a:>10.3f}" for a in accs) if per_seed else ""
        print(f"{name:<24}{mean:>9.3f}{sd:>7.3f}{mean / t_score:>11.3f}{cells}{count_params(student):>13,}"
              f"{statistics.mean(seconds[name]):>9.0f}")
    print(f"compression {ours['compression']:.2f}x; CPU latency at 32x128: teacher {lat['teacher']:.0f} ms, "
          f"student {lat['student']:.0f} ms, speedup {lat['teacher'] / lat['student']:.2f}x "
          f"(compress distill's own run measured {ours['speedup']:.2f}x). One dev accuracy on "
          f"{len(task.dev_labels)} rows has a "
          f"binomial sd of about {100 * (t_score * (1 - t_score) / len(task.dev_labels)) ** 0.5:.1f} points.")


def write_jsonl(folder: Path, task) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, texts, labels in (("train", task.train_texts, task.train_labels),
                                 ("dev", task.dev_texts, task.dev_labels)):
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"sentence": text[0], "label": task.label_names[label]}) + "\n"
                         for text, label in zip(texts, labels))


if __name__ == "__main__":
    main()
