"""Training loss of ``--adapter-precision bf16`` (fused kernels in the compute dtype) vs ``fp32`` (the official
numerics) on the offline demo setup (tiny random FLUX.1-Kontext + tiny CLIP + synthetic analogies), bf16 autocast,
the same seed, data order, timesteps and noise for both runs.

    .venv/bin/python benchmarks/adapter_precision_loss.py --out /tmp/adapter_precision [--steps 40]

Writes OUT/adapter_precision.json (both loss curves and their differences) and OUT/adapter_precision.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_mixed_lora: provenance helpers, positive_int
import bench_mixed_lora  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the tiny models, data, runs and the record")
    parser.add_argument("--steps", type=bench_mixed_lora.positive_int, default=40,
                        help="training steps of each run (default 40)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the tiny models, the data and both runs (default 0)")
    args = parser.parse_args()

    from lorweb_fast import demo
    from lorweb_fast.training import TrainConfig, train

    out = Path(args.out)
    models = out / "models"
    if not (models / "flux-kontext-tiny").is_dir():
        demo.build_tiny_kontext_pipeline(models / "flux-kontext-tiny", seed=args.seed)
        demo.build_tiny_clip(models / "clip-tiny", seed=args.seed)
        demo.make_synthetic_analogies(out / "data", 16, seed=args.seed)
    curves = {}
    for precision in ("bf16", "fp32"):
        cfg = TrainConfig(data=str(out / "data"), out=str(out / f"train-{precision}"),
                          model=str(models / "flux-kontext-tiny"), encoder=str(models / "clip-tiny"),
                          steps=args.steps, batch_size=2, learning_rate=1e-2, mixed_precision="bf16",
                          adapter_precision=precision, long_edge=2 * demo.DEMO_CELL, resize="long-edge",
                          max_sequence_length=demo.DEMO_MAX_SEQUENCE_LENGTH, num_loras=8, rank=2, key_dim=8,
                          checkpoint_every=args.steps, num_workers=0, seed=args.seed, progress=False,
                          nan_loss="raise")  # every step compared: a NaN stops the run instead of a gap
        train(cfg)
        rows = [json.loads(line) for line in (Path(cfg.out) / "loss.jsonl").read_text().splitlines()]
        curves[precision] = [r["loss"] for r in rows]
    bf16, fp32 = curves["bf16"], curves["fp32"]
    rel = [abs(a - b) / abs(b) for a, b in zip(bf16, fp32)]
    tail = max(1, len(bf16) // 4)
    import torch

    from lorweb_fast.ops import backend_status

    summary = {"commit": bench_mixed_lora.git_commit(),
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "device": bench_mixed_lora.device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
               "torch": torch.__version__, "backend_status": backend_status(),
               "steps": args.steps, "seed": args.seed, "loss_bf16": bf16, "loss_fp32": fp32,
               "max_relative_difference": max(rel), "mean_relative_difference": sum(rel) / len(rel),
               "first_loss": {"bf16": bf16[0], "fp32": fp32[0]},
               f"mean_loss_last_{tail}": {"bf16": sum(bf16[-tail:]) / tail, "fp32": sum(fp32[-tail:]) / tail}}
    (out / "adapter_precision.json").write_text(json.dumps(summary, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = list(range(1, len(bf16) + 1))
    ax.plot(steps, fp32, label="--adapter-precision fp32 (official numerics)")
    ax.plot(steps, bf16, "--", label="--adapter-precision bf16 (compute dtype, default)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("demo run, bf16 autocast, same seed")
    fig.tight_layout()
    fig.savefig(out / "adapter_precision.png", dpi=120)
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("loss_")}, indent=2))


if __name__ == "__main__":
    main()
