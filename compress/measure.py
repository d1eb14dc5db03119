"""Size and speed, measured the same way for every model so that ratios between them mean something."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_mb(model_dir: str | Path) -> float:
    """Size on disk of the weight files, in MB (10^6 bytes)."""
    files = [f for f in Path(model_dir).iterdir() if f.suffix in (".safetensors", ".bin", ".onnx")]
    return sum(f.stat().st_size for f in files) / 1e6


@torch.inference_mode()
def latency_ms(
    models: dict[str, torch.nn.Module], *, batch: int = 32, seq: int = 128, device: str = "cpu",
    warmup: int = 1, reps: int = 5, vocab_size: int = 1000,
) -> dict[str, float]:
    """Median forward latency of each model on the same random batch, in interleaved rounds.

    Interleaving (A, B, A, B, ...) rather than all-A-then-all-B keeps thermal and background drift from
    favouring whichever model ran first.
    """
    ids = torch.randint(1, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    cuda = device.startswith("cuda")
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval().to(device)
    for rnd in range(warmup + reps):
        for name, model in models.items():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                if cuda:
                    torch.cuda.synchronize()
            if rnd >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}
