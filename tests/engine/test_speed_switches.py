"""The training-speed switches, checked on a CPU: the teacher-logit cache is exact and keyed right, a bf16 teacher
runs in bf16 and gets its exact weights back, torch.compile trains as eager does, fused kernels are off here, a
teacher spread over devices and disk trains as a plain one, checkpoints go by training time; and the GPU
benchmark's CPU smoke mode."""

from dataclasses import replace

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import ROOT

from compress.engine import logit_cache
from compress.data.tasks import load_task
from compress.data.datamodule import TaskDataModule
from compress.infra.errors import CompressError
from compress.models.loading import load_classifier, load_tokenizer, student_from_teacher
from compress.models.loading import teacher_placement as load_placement
from compress.engine.distill_module import DistillModule
from compress.options.groups import LossConfig, RuntimeConfig, TrainingConfig
from compress.engine.trainer import build_trainer, resolve_precision, teacher_runs_bf16


BENCH_GPU = ROOT / "experiments" / "bench_distill_gpu.py"


class StepLosses(pl.Callback):
    def __init__(self):
        self.losses = []
        self.teacher_dtypes = set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.teacher_dtypes.add(module.teacher.dtype if module.teacher is not None else None)


def train(tiny_teacher, tiny_data, cache: bool, epochs: int = 3, cache_file=None, compile=False, placement=None,
          weights=None, precision="32-true"):
    task = load_task(data=str(tiny_data))
    attn = "eager" if weights and weights.alpha_attn else None
    teacher = load_classifier(str(tiny_teacher), task.label_names, attn_implementation=attn, placement=placement)
    pl.seed_everything(0, verbose=False)
    plain = load_classifier(str(tiny_teacher), task.label_names, attn_implementation=attn)
    student = student_from_teacher(plain, [0, 2])
    loss = replace(weights or LossConfig(alpha_kd=1.0, alpha_ce=0.5, alpha_hidden=0.0), cache_teacher=cache)
    module = DistillModule(student, teacher, num_labels=2, loss=loss, training=TrainingConfig(lr=1e-3),
                           cache_file=cache_file, compile=compile)
    dm = TaskDataModule(task, load_tokenizer(str(tiny_teacher)), batch_size=16, seed=0)
    record = StepLosses()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", precision=precision, logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                         use_distributed_sampler=False, num_sanity_val_steps=0)
    calls = {"n": 0}
    hook = teacher.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    trainer.fit(module, datamodule=dm)
    hook.remove()
    return record.losses, calls["n"], module, trainer


def teacher_ran_in(trainer) -> set:
    """The dtypes the teacher ran in during fit (a bf16 teacher is restored to fp32 when fit ends)."""
    return next(c for c in trainer.callbacks if isinstance(c, StepLosses)).teacher_dtypes


def test_cached_teacher_gives_the_same_losses_and_skips_the_teacher(tiny_teacher, tiny_data):
    live, live_calls, _, _ = train(tiny_teacher, tiny_data, cache=False)
    cached, cached_calls, module, trainer = train(tiny_teacher, tiny_data, cache=True)
    assert len(live) == len(cached) == 3 * 6  # 96 rows / 16 per batch, 3 epochs
    assert cached == pytest.approx(live, abs=1e-6)
    steps_per_epoch, val_batches_per_epoch = 6, 1
    # live: the teacher runs every training step (it never runs in validation); cached: only in epoch 1
    assert live_calls == 3 * steps_per_epoch
    assert cached_calls == steps_per_epoch
    assert module._cache_ready and module._cache.shape == (96, 2)
    assert val_batches_per_epoch == trainer.num_val_batches[0]


def test_cache_refuses_hidden_losses(tiny_teacher):
    teacher = load_classifier(str(tiny_teacher), ["0", "1"])
    with pytest.raises(ValueError, match="logits only"):
        DistillModule(student_from_teacher(teacher, [0]), teacher, num_labels=2,
                      loss=LossConfig(alpha_hidden=1.0, cache_teacher=True))


def test_gpu_switches_are_off_on_cpu(tiny_teacher, tiny_data):
    assert resolve_precision("auto", "cpu") == "32-true"
    _, _, module, trainer = train(tiny_teacher, tiny_data, cache=False, epochs=1)
    assert module.teacher.dtype == torch.float32  # the bf16 teacher cast only happens on CUDA
    assert trainer.optimizers[0].defaults["fused"] is False
    dm = trainer.datamodule
    assert dm.num_workers == 0 and trainer.train_dataloader.pin_memory is False


@pytest.mark.parametrize("extra", [{}, {"alpha_hidden": 1.0}, {"alpha_attn": 1.0}], ids=["logits", "hidden", "attn"])
def test_bf16_precision_runs_the_teacher_in_bf16_with_every_loss(tiny_teacher, tiny_data, extra):
    """The GPU's precision path, on a CPU that is asked for bf16: teacher cast to bf16, student kept in fp32 under
    autocast, and every loss term computes from bf16 outputs to about what full precision gives."""
    weights = LossConfig(**{"alpha_kd": 1.0, "alpha_ce": 0.5, "alpha_hidden": 0.0} | extra)
    fp32, _, _, _ = train(tiny_teacher, tiny_data, cache=False, epochs=1, weights=weights)
    bf16, _, module, trainer = train(tiny_teacher, tiny_data, cache=False, epochs=1, weights=weights,
                                     precision="bf16-mixed")
    assert teacher_ran_in(trainer) == {torch.bfloat16} and module.student.dtype == torch.float32
    assert len(bf16) == len(fp32) == 6
    assert bf16 == pytest.approx(fp32, rel=0.02)  # bf16 keeps 8 bits of mantissa
    assert {f"loss_{k.removeprefix('alpha_')}" for k in extra} <= trainer.callback_metrics.keys()


def test_a_bf16_teacher_gets_its_exact_weights_back_after_training(tiny_teacher, tiny_data):
    """Rank 0 scores the teacher after fit; bf16 rounding would otherwise leave teacher_score measuring other
    weights."""
    from safetensors.torch import load_file

    _, _, module, trainer = train(tiny_teacher, tiny_data, cache=False, epochs=1, precision="bf16-mixed")
    assert teacher_ran_in(trainer) == {torch.bfloat16}
    saved = load_file(str(tiny_teacher / "model.safetensors"))
    state = module.teacher.state_dict()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], v) for k, v in saved.items())
    word = saved["bert.embeddings.word_embeddings.weight"]
    assert not torch.equal(word.bfloat16().float(), word)  # a round trip through bf16 would have changed them


def test_bf16_teacher_logits_cache_like_the_live_teacher(tiny_teacher, tiny_data, tmp_path):
    assert teacher_runs_bf16("cpu", "bf16-mixed") and not teacher_runs_bf16("cpu", "auto")  # the cache key's dtype
    live, _, _, _ = train(tiny_teacher, tiny_data, cache=False, precision="bf16-mixed")
    cached, calls, module, _ = train(tiny_teacher, tiny_data, cache=True, precision="bf16-mixed",
                                     cache_file=tmp_path / "logits.safetensors")
    assert calls == 6 and module._cache.dtype == torch.float32  # bf16 logits, stored widened
    assert cached == pytest.approx(live, abs=1e-3)


def test_logit_cache_on_disk_is_reused_by_the_next_run(tiny_teacher, tiny_data, tmp_path):
    live, _, _, _ = train(tiny_teacher, tiny_data, cache=False)
    path = tmp_path / "logits" / "key.safetensors"
    first, first_calls, module, _ = train(tiny_teacher, tiny_data, cache=True, cache_file=path)
    assert path.is_file() and first_calls == 6  # written after epoch 1, the teacher's only epoch
    assert not list(path.parent.glob("*.tmp"))
    second, second_calls, _, _ = train(tiny_teacher, tiny_data, cache=True, cache_file=path)
    assert second_calls == 0  # the next run never runs the teacher
    assert first == pytest.approx(live, abs=1e-6)
    assert second == pytest.approx(live, abs=1e-6)
    stored = logit_cache.load(path, 96, 2)
    assert torch.equal(stored, module._cache.cpu())
    assert logit_cache.load(path, 95, 2) is None  # another row count is a different cache, never misread


def test_logit_cache_key_follows_teacher_data_tokenizer_length_and_dtype(tiny_teacher, tiny_data, tmp_path):
    tiny_teacher = Path(shutil.copytree(tiny_teacher, tmp_path / "teacher"))  # the fixture is shared: touch a copy
    task = load_task(data=str(tiny_data))
    tok = load_tokenizer(str(tiny_teacher))
    base = logit_cache.cache_key(str(tiny_teacher), task, tok, 128, "fp32")
    assert base == logit_cache.cache_key(str(tiny_teacher), load_task(data=str(tiny_data)), tok, 128, "fp32")
    assert base != logit_cache.cache_key(str(tiny_teacher), task, tok, 64, "fp32")
    assert base != logit_cache.cache_key(str(tiny_teacher), task, tok, 128, "bf16")
    assert base != logit_cache.cache_key(str(tiny_teacher), load_task(data=str(tiny_data), max_train=50), tok,
                                         128, "fp32")
    tok.truncation_side = "left"
    assert base != logit_cache.cache_key(str(tiny_teacher), task, tok, 128, "fp32")
    os.utime(tiny_teacher / "model.safetensors", ns=(1, 1))  # new weights (mtime) -> new key
    tok.truncation_side = "right"
    assert base != logit_cache.cache_key(str(tiny_teacher), task, tok, 128, "fp32")


def test_compiled_training_matches_eager(tiny_teacher, tiny_data):
    eager, _, _, _ = train(tiny_teacher, tiny_data, cache=False, epochs=1)
    compiled, _, module, _ = train(tiny_teacher, tiny_data, cache=False, epochs=1, compile=True)
    assert compiled == pytest.approx(eager, abs=1e-4)
    assert module.student._compiled_call_impl is None  # undone after fit: scoring and export run eager
    assert not any("_orig_mod" in k for k in module.student.state_dict())


def test_gpu_benchmark_tiny_mode_runs_every_row(tmp_path):
    """The GPU benchmark's CPU smoke mode: every row is timed through the real pipeline, the table and JSON agree."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH_GPU), "--tiny", "--json", str(out)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILED" not in proc.stderr
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["plain fp32 loop (.item() each step)", "bf16-autocast loop (.item() each step)",
                     "compress distill, live teacher", "compress distill --cache_teacher, epoch 2",
                     "student alone on cached logits (bound)", "compress distill + hidden-state MSE",
                     "compress distill + attention KL (eager)"]
    for r in result["rows"]:
        assert r["ms_per_step"] > 0 and r["samples_per_s"] == pytest.approx(4 / (r["ms_per_step"] / 1e3))
        assert r["name"][:20] in proc.stdout
    assert result["device"] == "cpu" and result["bf16_matmul_tflops"] > 0
    assert [t["check"] for t in result["targets"]] == [
        "live teacher >= 2x the bf16-autocast loop", "live teacher >= 7.5x the fp32 loop",
        "cached epochs >= 0.8x the student-alone bound"]
    assert result["skipped"] == [] and not out.with_name("bench.json.tmp").exists()
    assert result["checkpoint_save"]["seconds"] > 0 and result["checkpoint_save"]["mb"] > 1  # student + AdamW state
    assert all(r["host_syncs_per_step"] is None for r in result["rows"])  # counted on a GPU only
    assert "checkpoint save (" in proc.stdout


def test_gpu_benchmark_counts_each_sync_warning_in_its_window():
    """The counter behind the table's syncs/step: every sync-debug warning between start and stop, repeats included,
    and nothing after stop. (On a GPU the warnings come from torch.cuda.set_sync_debug_mode; here they are raised
    by hand.)"""
    import importlib.util
    import warnings

    spec = importlib.util.spec_from_file_location("bench_distill_gpu", BENCH_GPU)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counter = bench.SyncCount("cpu")
    counter.start()
    for _ in range(3):
        warnings.warn("called a synchronizing CUDA operation (from the same line each time)", stacklevel=1)
    warnings.warn("something else", stacklevel=1)
    counter.stop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    assert counter.count == 3


def test_gpu_benchmark_budget_skips_rows_and_still_writes_its_json(tmp_path):
    """Past --budget_s no row starts; the run still ends cleanly with a JSON that says what it skipped."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH_GPU), "--tiny", "--budget_s", "1e-9", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rows"] == [] and result["targets"] == []
    assert len(result["skipped"]) == 7 and result["skipped"][0] == "plain fp32 loop (.item() each step)"
    assert "skipped (--budget_s)" in proc.stdout


def test_gpu_padding_rounds_batches_up_to_a_multiple_of_8():
    from compress.data.datamodule import PadCollator

    rows = [{"input_ids": [2, 7, 3], "label": 0, "idx": 0}, {"input_ids": [2, 3], "label": 1, "idx": 1}]
    assert PadCollator(0)(rows)["input_ids"].shape == (2, 3)
    batch = PadCollator(0, multiple=8)(rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]


def test_teacher_placed_over_devices_with_layers_on_disk_trains_like_a_plain_one(tiny_teacher, tiny_data, tmp_path):
    """--teacher_device_map: the CPU stand-in for a teacher larger than one card is half its layers offloaded to
    disk, streamed in by accelerate's hooks as they run. Lightning must neither move it nor checkpoint it, and every
    loss (logits, hidden states, attentions) must be what the same teacher gives in one piece."""
    layout = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "cpu",
              "bert.encoder.layer.2": "disk", "bert.encoder.layer.3": "disk", "bert.pooler": "cpu", "classifier": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(layout))
    placement = load_placement(str(tmp_path / "map.json"), bf16=False)
    weights = LossConfig(alpha_kd=1.0, alpha_ce=0.5, alpha_hidden=1.0, alpha_attn=0.5)
    whole, _, _, _ = train(tiny_teacher, tiny_data, cache=False, epochs=1, weights=weights)
    placed, calls, module, trainer = train(tiny_teacher, tiny_data, cache=False, epochs=1, weights=weights,
                                           placement=placement)
    assert calls == 6 and module.teacher_placed
    assert placed == pytest.approx(whole, abs=1e-5)
    assert module.teacher.hf_device_map == layout
    assert not [n for n, _ in module.named_parameters() if n.startswith("teacher")]  # outside Lightning's reach
    assert module.teacher.bert.encoder.layer[3].output.dense.weight.device.type == "meta"  # still on disk

    from compress.engine.scoring import score, score_in_place

    dm = trainer.datamodule
    plain = load_classifier(str(tiny_teacher), ["0", "1"])
    assert score_in_place(module.teacher, dm, "accuracy", 2) == score(plain, dm, "accuracy", 2, "cpu", "32-true")


def test_teacher_device_map_errors(tmp_path):
    with pytest.raises(CompressError, match="--teacher_device_map .*nope.json: not one of auto"):
        load_placement(str(tmp_path / "nope.json"), bf16=False)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CompressError, match="module names to devices"):
        load_placement(str(tmp_path / "list.json"), bf16=False)
    assert load_placement("auto", bf16=True)["device_map"] == "auto"


class SaveSteps(pl.Callback):
    def __init__(self):
        self.steps = []

    def on_save_checkpoint(self, trainer, module, checkpoint):
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize(("when", "saved_at"), [
    ({}, []),  # the default, 5 minutes of training: a run of seconds writes none by time
    ({"checkpoint_minutes": 1e-9}, list(range(1, 13))),  # past the interval at every step
    ({"checkpoint_every": 5}, [5, 10]),
])
def test_checkpoints_go_by_training_time_unless_steps_are_asked_for(tiny_teacher, tiny_data, tmp_path, when, saved_at):
    """A save blocks training, so a fast GPU must not pay for one every 100 steps: by default they go by time."""
    task = load_task(data=str(tiny_data))
    student = load_classifier(str(tiny_teacher), task.label_names)
    module = DistillModule(student, num_labels=2, training=TrainingConfig(lr=1e-3))
    dm = TaskDataModule(task, load_tokenizer(str(tiny_teacher)), batch_size=16, seed=0)  # 96 rows: 6 steps an epoch
    saves = SaveSteps()
    trainer = build_trainer(epochs=2, accelerator="cpu", precision="32-true", logger=None, ckpt_dir=tmp_path / "ckpt",
                            runtime=RuntimeConfig(devices=1, progress=False, **when), callbacks=[saves])
    trainer.fit(module, datamodule=dm)
    assert saves.steps == [*saved_at, 12]  # and one when fit ends (12 steps), which a stop after fit resumes from
    assert len(list((tmp_path / "ckpt").glob("step???????.ckpt"))) == min(2, len(saved_at))  # the two newest timed
    assert [p.name for p in (tmp_path / "ckpt").glob("*-end.ckpt")] == ["step0000012-end.ckpt"]
