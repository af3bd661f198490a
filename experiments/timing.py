"""Seconds per pretraining step of the paper presets (grid transformer, ant Hawk SSM) on this machine's device.

  python experiments/timing.py            # on a GPU: the paper's shapes and batch sizes (1024 grid, 512 ant)

Times one AdamW step of each paper-preset base model (fp32 with TF32 matmuls, then bf16 autocast) and scales it
to the paper's number of steps. The grid step uses real expert batches built on the device; the ant step uses
random observations of the right shape (T = 500), which cost the same. Without a GPU it runs small stand-ins.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs    # noqa: E402
import etarl   # noqa: E402


def seconds_per_call(fn, n: int, device) -> float:
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.time() - start) / n


def main() -> dict:
    device = etarl.default_device()
    torch.set_float32_matmul_precision("high")
    small = device.type == "cpu"                       # a quick check of the script, not a timing
    result = {"device": torch.cuda.get_device_name() if not small else "cpu (small stand-in models)"}
    for env in ("grid", "ant"):
        preset = etarl.get_preset("paper", env)
        model_cfg = preset.model if not small else etarl.ModelConfig(
            d_model=32, n_layers=2, **({} if env == "grid" else etarl.ANT))
        model = etarl.build_model(model_cfg, env).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.03)
        B = preset.pretrain.batch_size if not small else 8
        if env == "grid":
            data, rng = etarl.generate_episodes(4 * B, 0), np.random.default_rng(0)
            by_length = np.argsort(data.lengths, kind="stable")
            batch = lambda: data.batch(etarl.length_bucketed_batch(by_length, B, rng), device)
            result["grid batch build s"] = seconds_per_call(batch, 10, device)
        else:
            T = 500 if not small else 50
            fixed = {"obs": torch.randn(B, T + 1, envs.ant_obs_dim(), device=device),
                     "actions": torch.randn(B, T, 8, device=device), "mask": torch.ones(B, T, dtype=torch.bool, device=device)}
            batch = lambda: fixed
        for precision in ("fp32", "bf16"):
            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16" and not small):
                    loss = model.loss(batch())["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            s = seconds_per_call(step, 10 if env == "grid" else 3, device)
            result[f"{env} {precision} s/step"] = s
            result[f"{env} {precision} paper pretraining h"] = s * preset.pretrain.steps / 3600
            print(f"{env} {precision} batch {B}: {s:.3f} s/step, the paper's {preset.pretrain.steps:,} steps "
                  f"{s * preset.pretrain.steps / 3600:.1f} h", flush=True)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
