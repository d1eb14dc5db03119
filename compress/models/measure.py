"""Size and speed, measured the same way for every model so that ratios between them mean something."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_mb(model: str | Path) -> float:
    """Size on disk of one model's weights, in MB (10^6 bytes): an .onnx file with its external data, or a saved
    model folder's PyTorch weights. An exported folder also holds model.onnx and model.int8.onnx, other models of
    the same network, so counting every weight file there reported several times the size."""
    path = Path(model)
    if path.suffix == ".onnx":
        files = [path, path.with_name(path.name + ".data")]  # weights over protobuf's 2 GB go beside the graph
    else:
        # what transformers loads: safetensors when there are any (hub repos often carry a .bin duplicate as well),
        # else pytorch_model*.bin, leaving out training_args.bin and the like
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


def interleaved_ms(
    runners: dict[str, Callable[[], object]], *, warmup: int = 1, reps: int = 5, sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Wall time of each runner, in ms, over `reps` interleaved rounds after `warmup` untimed ones.

    A runner is one forward pass of any kind of model (PyTorch, onnxruntime, ...). Interleaving (A, B, A, B, ...)
    rather than all-A-then-all-B keeps thermal and background drift from favouring whichever model ran first.
    `sync` (e.g. torch.cuda.synchronize) runs before and after each timed call, so queued GPU work is counted.
    """
    times: dict[str, list[float]] = {name: [] for name in runners}
    for rnd in range(warmup + reps):
        for name, run in runners.items():
            if sync:
                sync()
            start = time.perf_counter()
            run()
            if sync:
                sync()
            if rnd >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return times


@torch.inference_mode()
def latency_ms(
    models: dict[str, torch.nn.Module], *, batch: int = 32, seq: int = 128, device: str = "cpu",
    warmup: int = 1, reps: int = 5, vocab_size: int = 1000,
) -> dict[str, float]:
    """Median forward latency of each model on the same random batch, in interleaved rounds (see interleaved_ms)."""
    ids = torch.randint(1, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    cuda = device.startswith("cuda")
    for model in models.values():
        model.eval().to(device)

    def runner(model: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                return model(input_ids=ids, attention_mask=mask)

        return run

    times = interleaved_ms({name: runner(m) for name, m in models.items()}, warmup=warmup, reps=reps,
                           sync=torch.cuda.synchronize if cuda else None)
    return {name: statistics.median(t) for name, t in times.items()}
