"""Distillation training throughput: compress's own Lightning pipeline against plain loops, in one run, on one device.

    python experiments/bench_distill_gpu.py                  # BERT-large -> 6x768 at 64x128, on the GPU
    python experiments/bench_distill_gpu.py --teacher base   # a BERT-base teacher instead
    python experiments/bench_distill_gpu.py --no-compile     # skip the torch.compile rows (saves minutes)
    python experiments/bench_distill_gpu.py --tiny           # a CPU smoke run on tiny models (what CI runs)
    python experiments/bench_distill_gpu.py --budget_s 420 --json $OUT/gpu.json   # under a lent device's time limit

The setup is ../shared/bench/anchor_gpu.py's (TARGETS.md): random weights (speed does not depend on them), soft-target
KL at T=4 plus hard-label CE, AdamW, every batch full length. Rows, in one process:

- matmul peak: a large bf16 matmul, the denominator of "share of peak";
- plain fp32 loop and bf16-autocast loop: hand-written loops that call .item() every step, as users and HF-Trainer
  subclasses do (the fp32 loop runs at TextBrewer's speed in TARGETS.md);
- compress distill: `DistillModule`, `TaskDataModule` (tokenizer, collator, pinned loader workers) and the Trainer from
  `compress.engine.trainer.build_trainer`, exactly what `compress distill` builds, timed by a callback after warm-up
  steps;
  live teacher, then with `--compile`, then with `--cache_teacher` (epoch 2, after the first filled the cache);
- student alone: the compiled student on precomputed teacher logits, the bound for cached epochs;
- compress distill again with the hidden-state and attention losses on, to show what they cost (last: the targets do
  not need them, so they are the rows `--budget_s` drops first).

Each row is printed, and the JSON rewritten, as soon as it is timed. On a GPU each row also counts the host syncs in
its timed steps (CUDA's sync debug mode): the hand-written loops show their .item(), and compress should show none.

FLOPs per step follow the anchor: teacher forward + 3x student forward (forward + backward), matmuls and attention.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # layers, hidden, heads, intermediate
    "large": (24, 1024, 16, 4096),
    "base": (12, 768, 12, 3072),
    "student": (6, 768, 12, 3072),
    "tiny-teacher": (4, 64, 4, 128),
    "tiny-student": (2, 32, 2, 64),
}
T = 4.0
VOCAB = 30522
# the rows the targets are checked on
FP32 = "plain fp32 loop (.item() each step)"
BF16 = "bf16-autocast loop (.item() each step)"
LIVE = "compress distill, live teacher"
LIVE_COMPILED = "compress distill --compile"
CACHED = "compress distill --cache_teacher, epoch 2"
BOUND = "student alone on cached logits (bound)"


def make_model(shape: tuple[int, int, int, int], device: str, attn: str = "sdpa"):
    from transformers import AutoModelForSequenceClassification, BertConfig

    layers, hidden, heads, inter = shape
    cfg = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
                     num_labels=2, vocab_size=VOCAB)
    return AutoModelForSequenceClassification.from_config(cfg, attn_implementation=attn).to(device)


def fwd_flops_per_token(shape: tuple[int, int, int, int], seq: int) -> int:
    """The anchor's count: QKV and output projections, the FFN, and the two attention matmuls, per layer."""
    n, h, _, i = shape
    return n * (8 * h * h + 4 * h * i + 4 * seq * h)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # a fresh compile per row: no recompile limit is hit, no graph is shared


class SyncCount:
    """Host syncs between start() and stop(), as CUDA's sync debug mode reports them (one warning each): the issue
    asks for none per step. A CPU has no syncs to report, so the count stays 0 there and the table shows '-'."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self, device: str) -> None:
        self.device, self.count = device, 0

    def start(self) -> None:
        self._context = warnings.catch_warnings(record=True)
        self._seen = self._context.__enter__()
        warnings.simplefilter("always")  # every sync, not the first per call site
        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        self._context.__exit__(None, None, None)
        self.count = sum(self.MESSAGE in str(w.message) for w in self._seen)


def matmul_peak(device: str, tiny: bool) -> float:
    n = 256 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 / ((time.perf_counter() - t0) / 10) / 1e12


# --- hand-written loops (the baselines) ------------------------------------------------------------------------------


def plain_loop(args, device: str, *, autocast: bool, student_only: bool = False) -> tuple[float, float]:
    """Seconds and host syncs per step of a hand-written loop; `student_only` is the compiled student on precomputed
    logits."""
    teacher = make_model(SHAPES[args.teacher_shape], device).eval()
    student = make_model(SHAPES[args.student_shape], device).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, VOCAB, (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(device)
    fused = device == "cuda" and student_only
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, fused=fused)
    run_student = student
    if student_only:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            cached = teacher(input_ids=ids, attention_mask=mask).logits.float()
        if args.compile:
            run_student = torch.compile(student)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            if student_only:
                t_logits = cached
            else:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, attention_mask=mask).logits
            s_logits = run_student(input_ids=ids, attention_mask=mask).logits
        s, t = s_logits.float(), t_logits.float()
        loss = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
        loss = loss + F.cross_entropy(s, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not student_only:
            loss.item()  # what a logging loop does every step: a host sync

    for _ in range(args.warmup):
        step()
    sync(device)
    syncs = SyncCount(device)
    t0 = time.perf_counter()
    syncs.start()
    for _ in range(args.steps):
        step()
    syncs.stop()
    sync(device)
    return (time.perf_counter() - t0) / args.steps, syncs.count / args.steps


# --- compress's own pipeline ----------------------------------------------------------------------------------------


def synthetic_task(rows: int, seq: int):
    """A task whose every row tokenizes past `seq` tokens, so every batch is full length as in the anchor."""
    from compress.data.tasks import TaskData

    rng = random.Random(0)
    texts = [(" ".join(f"w{rng.randrange(VOCAB - 5)}" for _ in range(seq + 8)),) for _ in range(rows)]
    labels = [rng.randrange(2) for _ in range(rows)]
    return TaskData(name="synthetic", train_texts=texts, train_labels=labels, dev_texts=texts[:8],
                    dev_labels=labels[:8], label_names=["0", "1"], metric="accuracy", fingerprint="synthetic")


def word_tokenizer():
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    return BertTokenizerFast(vocab=vocab)  # transformers 5 wants the dict itself, not a vocab file


class StepTimer(pl.Callback):
    """Wall time of the steps after `warmup` in epoch `epoch`, with one device sync at each end (none in between)."""

    def __init__(self, device: str, warmup: int, epoch: int) -> None:
        self.device, self.warmup, self.epoch = device, warmup, epoch
        self.t0 = self.t1 = 0.0
        self.steps = 0
        self.syncs = SyncCount(device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()
            self.syncs.start()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx >= self.warmup:
            self.steps = batch_idx - self.warmup + 1
            if batch_idx == trainer.num_training_batches - 1:
                self.syncs.stop()
                sync(self.device)
                self.t1 = time.perf_counter()

    @property
    def per_step(self) -> tuple[float, float]:
        """Seconds and host syncs per timed step."""
        return (self.t1 - self.t0) / self.steps, self.syncs.count / self.steps


def compress_step(args, device: str, *, compile: bool = False, cache: bool = False, hidden: float = 0.0,
                  attn: float = 0.0, save_probe: dict | None = None) -> tuple[float, float]:
    """Seconds and host syncs per step of `compress distill`'s training as the command builds it (module,
    datamodule, Trainer).

    With `save_probe`, also times one checkpoint save after training (Lightning's own, student and AdamW state, as
    the command writes them) into it: the cost that decides how often the command can afford to checkpoint."""
    from compress.data.datamodule import TaskDataModule
    from compress.api import LossConfig, RuntimeConfig, TrainingConfig
    from compress.engine.distill_module import DistillModule
    from compress.engine.trainer import build_trainer, quiet_libraries, resolve_precision

    quiet_libraries()
    attn_impl = "eager" if attn else "sdpa"  # attention maps need eager attention, as in the command
    teacher = make_model(SHAPES[args.teacher_shape], "cpu", attn_impl)
    student = make_model(SHAPES[args.student_shape], "cpu", attn_impl)
    rows = args.batch * (args.warmup + args.steps)
    datamodule = TaskDataModule(synthetic_task(rows, args.seq), word_tokenizer(), batch_size=args.batch,
                                max_length=args.seq, num_workers=4 if device == "cuda" else 0, seed=0)
    module = DistillModule(student, teacher, num_labels=2,
                           loss=LossConfig(temperature=T, alpha_kd=1.0, alpha_ce=1.0, alpha_hidden=hidden,
                                           alpha_attn=attn, cache_teacher=cache),
                           training=TrainingConfig(lr=5e-5), compile=compile)
    timed_epoch = 1 if cache else 0  # cached: epoch 1 fills the cache (and warms up), epoch 2 is timed
    timer = StepTimer(device, args.warmup, timed_epoch)
    with tempfile.TemporaryDirectory() as ckpt:
        trainer = build_trainer(epochs=timed_epoch + 1, accelerator=device, precision=resolve_precision("auto", device),
                                runtime=RuntimeConfig(devices=1, strategy="auto", progress=False), logger=None,
                                ckpt_dir=Path(ckpt), callbacks=[timer])
        trainer.fit(module, datamodule=datamodule)
        if save_probe is not None:
            path = Path(ckpt) / "probe.ckpt"
            sync(device)
            t0 = time.perf_counter()
            trainer.save_checkpoint(path)
            save_probe |= {"seconds": time.perf_counter() - t0, "mb": path.stat().st_size / 1e6}
    return timer.per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", choices=["large", "base"], default="large", help="teacher shape (BERT-large or -base)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them (compilation happens here)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny models (what CI runs)")
    p.add_argument("--json", help="also write the results here (rewritten after every row, so a cut-off run keeps "
                                  "what it measured)")
    p.add_argument("--budget_s", type=float, default=0.0,
                   help="start no new row after this many seconds (0: no limit); rows that bear on the targets run "
                        "first, so a run under a device's time limit still checks them")
    args = p.parse_args()
    started = time.perf_counter()

    device = args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.batch, args.seq = (4, 16) if args.tiny else (64, 128)
    args.teacher_shape, args.student_shape = ("tiny-teacher", "tiny-student") if args.tiny else (args.teacher,
                                                                                                 "student")
    if args.tiny:
        args.steps, args.warmup, args.compile = min(args.steps, 3), min(args.warmup, 1), False
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({card}); torch {torch.__version__}; teacher {SHAPES[args.teacher_shape]} -> student "
          f"{SHAPES[args.student_shape]}; batch {args.batch} x {args.seq}; {args.steps} timed steps after "
          f"{args.warmup}", file=sys.stderr)

    peak = matmul_peak(device, args.tiny)
    probe_t, probe_s = SHAPES[args.teacher_shape], SHAPES[args.student_shape]
    tokens = args.batch * args.seq
    flops_live = tokens * (fwd_flops_per_token(probe_t, args.seq) + 3 * fwd_flops_per_token(probe_s, args.seq))
    flops_student = tokens * 3 * fwd_flops_per_token(probe_s, args.seq)

    rows: list[tuple[str, float, int, float]] = []  # (name, seconds per step, flops per step, host syncs per step)
    skipped: list[str] = []
    save: dict = {}  # one timed checkpoint save, filled by the live row

    def row(name: str, fn, flops: int) -> None:
        elapsed = time.perf_counter() - started
        if args.budget_s and elapsed > args.budget_s:
            print(f"  {name}: skipped, {elapsed:.0f} s is past --budget_s {args.budget_s:.0f}", file=sys.stderr)
            skipped.append(name)
            return
        print(f"  timing {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            seconds, syncs = fn()
        except Exception as error:  # one failing row (e.g. out of memory) must not lose the others
            print(f"  {name} FAILED: {str(error).splitlines()[0][:300]}", file=sys.stderr)
        else:
            rows.append((name, seconds, flops, syncs))
            # Printed and saved as it lands: a run cut off by the device's time limit keeps every finished row.
            print(f"  {name}: {seconds * 1e3:.1f} ms/step, {args.batch / seconds:.1f} samples/s "
                  f"({time.perf_counter() - t0:.0f} s with set-up and compilation)", file=sys.stderr, flush=True)
            if args.json:
                write_json(args, card, peak, rows, skipped, save)
        release(device)  # the row's models went with its function's frame

    # The rows the targets need come first; the loss-cost rows last, as the first to go under --budget_s.
    row(FP32, lambda: plain_loop(args, device, autocast=False), flops_live)
    row(BF16, lambda: plain_loop(args, device, autocast=True), flops_live)
    row(LIVE, lambda: compress_step(args, device, save_probe=save), flops_live)
    if args.compile:
        row(LIVE_COMPILED, lambda: compress_step(args, device, compile=True), flops_live)
    row(CACHED, lambda: compress_step(args, device, cache=True, compile=args.compile), flops_student)
    row(BOUND, lambda: plain_loop(args, device, autocast=True, student_only=True), flops_student)
    row("compress distill + hidden-state MSE", lambda: compress_step(args, device, hidden=1.0, compile=args.compile),
        flops_live)
    row("compress distill + attention KL (eager)", lambda: compress_step(args, device, attn=1.0), flops_live)

    results, checks = summarize(args, peak, rows)
    print(f"\nbf16 matmul peak measured in this run: {peak:.1f} TFLOP/s ({device}: {card})")

    def ratio(v: float | None) -> str:
        return f"{v:>8.2f}x" if v else f"{'-':>9}"

    print(f"{'loop':<44}{'ms/step':>9}{'samples/s':>11}{'TFLOP/s':>9}{'% peak':>8}{'vs bf16':>9}{'vs fp32':>9}"
          f"{'syncs/step':>12}")
    for r in results:
        print(f"{r['name']:<44}{r['ms_per_step']:>9.1f}{r['samples_per_s']:>11.1f}{r['tflops']:>9.2f}"
              f"{100 * r['share_of_peak']:>7.1f}%{ratio(r['vs_bf16_loop'])}{ratio(r['vs_fp32_loop'])}"
              + (f"{r['host_syncs_per_step']:>12.2f}" if r["host_syncs_per_step"] is not None else f"{'-':>12}"))
    for name in skipped:
        print(f"{name:<44}{'skipped (--budget_s)':>20}")
    live = next((r for r in results if r["name"] == LIVE), None)
    if save and live:
        # Why compress checkpoints by time (every --checkpoint_minutes) and not every N steps.
        from compress.api import RuntimeConfig

        minutes = RuntimeConfig().checkpoint_minutes
        every_100 = save["seconds"] / (save["seconds"] + 100 * live["ms_per_step"] / 1e3)
        print(f"\ncheckpoint save ({save['mb']:.0f} MB, student + AdamW state): {save['seconds']:.2f} s, "
              f"{save['seconds'] / (live['ms_per_step'] / 1e3):.0f} live steps; one every 100 steps would take "
              f"{every_100:.0%} of a run, one every {minutes:g} minutes (the default) "
              f"{save['seconds'] / (60 * minutes + save['seconds']):.2%}")
    print("\ntargets (issue 7; meaningful on an H100/H200, not on a CPU):")
    for c in checks:
        print(f"  {c['check']}: {c['value']:.2f}x  {'met' if c['value'] >= c['need'] else 'NOT met'}")
    print(f"wall: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.json:
        write_json(args, card, peak, rows, skipped, save)


def summarize(args, peak: float, rows: list[tuple[str, float, int, float]]) -> tuple[list[dict], list[dict]]:
    """Per-row figures (samples/s, TFLOP/s, share of peak, ratios to both loops, host syncs) and the issue's target
    checks."""
    by_name = {name: seconds for name, seconds, _, _ in rows}
    fp32, bf16 = by_name.get(FP32), by_name.get(BF16)
    results = []
    for name, seconds, flops, syncs in rows:
        tflops = flops / seconds / 1e12
        results.append({"name": name, "ms_per_step": seconds * 1e3, "samples_per_s": args.batch / seconds,
                        "tflops": tflops, "share_of_peak": tflops / peak,
                        "vs_bf16_loop": bf16 / seconds if bf16 else None,
                        "vs_fp32_loop": fp32 / seconds if fp32 else None,
                        "host_syncs_per_step": syncs if args.device == "cuda" else None})
    best_live = min((by_name[n] for n in (LIVE, LIVE_COMPILED) if n in by_name), default=None)
    cached, bound = by_name.get(CACHED), by_name.get(BOUND)
    checks = []
    if best_live and bf16 and fp32:
        checks += [("live teacher >= 2x the bf16-autocast loop", bf16 / best_live, 2.0),
                   ("live teacher >= 7.5x the fp32 loop", fp32 / best_live, 7.5)]
    if cached and bound:
        checks.append(("cached epochs >= 0.8x the student-alone bound", bound / cached, 0.8))
    return results, [{"check": t, "value": v, "need": n} for t, v, n in checks]


def write_json(args, card: str, peak: float, rows: list, skipped: list[str], save: dict) -> None:
    import transformers

    results, checks = summarize(args, peak, rows)
    path = Path(args.json)
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: never a half-written file
    tmp.write_text(json.dumps({
        "device": args.device, "card": card, "torch": torch.__version__, "transformers": transformers.__version__,
        "teacher": SHAPES[args.teacher_shape], "student": SHAPES[args.student_shape], "batch": args.batch,
        "seq": args.seq, "steps": args.steps, "warmup": args.warmup, "bf16_matmul_tflops": peak,
        "rows": results, "skipped": skipped, "targets": checks, "checkpoint_save": save}, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
