"""Seconds per pretraining step of the paper presets (grid transformer, ant Hawk SSM) on this machine's device.

  python experiments/timing.py            # on a GPU: the paper's shapes and batch sizes (1024 grid, 512 ant)
  python experiments/timing.py rollouts   # in the folder of `python etarl.py`: rollouts with and without the cut
  python experiments/timing.py metacontroller [REV [THREADS]]   # there too: metacontroller training, against REV's
  python experiments/timing.py bf16       # there too: a cpu-preset pretraining step in float32 and in bfloat16

Times one AdamW step of each paper-preset base model (fp32 with TF32 matmuls, then bf16 autocast) and scales it
to the paper's number of steps. The grid step uses real expert batches built on the device; the ant step uses
random observations of the right shape (T = 500), which cost the same. Then the RG-LRU's two ways of running
(etarl.linear_loop and etarl.linear_scan, forward and backward at T = 500) over batch x width, and one step of
the ant-cpu preset's model with each (the code picks the loop on a CPU). Without a GPU it runs small stand-ins
for the paper presets and times the RG-LRU at batch 16 x width 128 only.

`rollouts` times etarl.rollout on the cpu run's base model (runs/grid-cpu-s0) on the post-training task, with
ended episodes dropped from the batch (the default) and kept (drop_ended=False): 2,000 uncontrolled episodes (one
chunk of the pipeline's estimate of the base model's success), 500 with supervised controllers (the controller
sweep's evaluation; controllers trained for 50 steps, which is enough to steer) and 256 under internal RL's hook
(one RL batch, with the run's metacontroller and an untrained policy). Best of three calls each.

`metacontroller` times etarl.train_metacontroller on the cpu run's base model and training episodes, on one
thread (or THREADS, given after REV): Eq. 3's config (MetaConfig(), batch 64) and the lead of the lab notes,
experiments/README.md section 3 (batch 256 with read_norm, Gumbel switches and the KL paid per switch), 40 and 12
steps. With a git revision REV (say 540ba8c, before the low-rank edit mixed shared banks and the switching unit's
e, h part was computed for all steps at once) it loads that revision's etarl.py too and times the two in turn,
twice each. Then, as the cpu preset trains (MetaConfig(cache_stream=True)): the StreamCache of the whole training
set (its build time) and both configs' steps on it (Eq. 3's is the forced-switch baseline's, without the forcing),
again in turn with REV's if REV has the cache (e93568a and later; say 1b3737f, before Eq. 13's embedding ran
unpacked).

`bf16` times one AdamW step of the cpu preset's pretraining (batch 64 of the run's training episodes) in float32
and under the bfloat16 autocast of PretrainConfig(bf16=True), 20 steps each, two rounds in turn, best of the two;
then the ant-cpu preset's (batch 16 of random observations, T = 500), 5 steps each.
With ONEDNN_MAX_CPU_ISA=AVX512_CORE (or AVX2) in its environment, oneDNN leaves out the bfloat16 instructions
(or all of AVX-512), as on a CPU that lacks them, and takes its slower paths.
"""
import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
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


def ant_batch(B: int, T: int, device) -> dict:
    return {"obs": torch.randn(B, T + 1, envs.ant_obs_dim(), device=device),
            "actions": torch.randn(B, T, 8, device=device), "mask": torch.ones(B, T, dtype=torch.bool, device=device)}


def train_step(model, batch, bf16: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.03)

    def step():
        with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(batch())["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def rglru(device, small: bool) -> dict:
    """The RG-LRU's loop and scan (forward and backward, T = 500), and a whole ant-cpu step with each."""
    result, T = {}, 500
    sizes = ((16, 128), (64, 128), (128, 128), (128, 256), (256, 256), (512, 128), (512, 256))
    for B, W in sizes if not small else sizes[:1]:
        a = torch.rand(B, T, W, device=device).mul(0.1).add(0.9).requires_grad_()
        b, h0 = torch.randn(B, T, W, device=device).requires_grad_(), torch.zeros(B, W, device=device)
        loop, scan = (seconds_per_call(lambda: f(a, b, h0).sum().backward(), 3, device)
                      for f in (etarl.linear_loop, etarl.linear_scan))
        result[f"rglru {B}x{W} loop/scan"] = loop / scan
        print(f"RG-LRU batch {B} x width {W}: loop {loop * 1e3:.1f} ms, scan {scan * 1e3:.1f} ms, "
              f"loop/scan {loop / scan:.2f}", flush=True)
    cfg = etarl.get_preset("cpu", "ant")
    model = etarl.build_model(cfg.model if not small else etarl.ModelConfig(d_model=32, n_layers=2, **etarl.ANT), "ant")
    batch = ant_batch(cfg.pretrain.batch_size, T, device)
    default = etarl.RGLRU.scan_max
    try:
        for scan_max in (0, default):                              # 0: always the loop
            etarl.RGLRU.scan_max = scan_max
            s = seconds_per_call(train_step(model.to(device), lambda: batch), 5 if not small else 1, device)
            how = "loop" if scan_max == 0 else "as the code chooses"
            result[f"ant-cpu step s ({how})"] = s
            print(f"ant-cpu preset, one step at batch {cfg.pretrain.batch_size}: {s:.3f} s ({how})", flush=True)
    finally:
        etarl.RGLRU.scan_max = default
    return result


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
        B = preset.pretrain.batch_size if not small else 8
        if env == "grid":
            data, rng = etarl.generate_episodes(4 * B, 0), np.random.default_rng(0)
            by_length = np.argsort(data.lengths, kind="stable")
            batch = lambda: data.batch(etarl.length_bucketed_batch(by_length, B, rng), device)
            result["grid batch build s"] = seconds_per_call(batch, 10, device)
        else:
            fixed = ant_batch(B, 500 if not small else 50, device)
            batch = lambda: fixed
        for precision in ("fp32", "bf16"):
            step = train_step(model, batch, bf16=precision == "bf16" and not small)
            s = seconds_per_call(step, 10 if env == "grid" else 3, device)
            result[f"{env} {precision} s/step"] = s
            result[f"{env} {precision} paper pretraining h"] = s * preset.pretrain.steps / 3600
            print(f"{env} {precision} batch {B}: {s:.3f} s/step, the paper's {preset.pretrain.steps:,} steps "
                  f"{s * preset.pretrain.steps / 3600:.1f} h", flush=True)
    return {**result, **rglru(device, small)}


def rollouts() -> dict:
    run = etarl.Run("cpu", progress=False)
    model, train = etarl.freeze(run.base_model()[0]), run.data()[0]
    ctrl, _ = etarl.train_controllers(model, train, 2, etarl.ControlConfig(steps=50), 0, progress=False)
    learner = etarl.InternalRL(model, run.metacontroller()[0], run.cfg.rl.hidden)
    task, result = envs.parse_task(run.cfg.rl.task), {}

    def internal(n):
        agent = etarl.InternalAgent(learner.meta, learner.policy, n, torch.Generator().manual_seed(0))
        return agent.at
    for name, n, control in (("uncontrolled", 2000, lambda n: None), ("controllers", 500,
                             lambda n: etarl.subgoal_control_fn(ctrl)), ("internal RL", 256, internal)):
        best = {}
        for drop in (False, True):
            times = []
            for _ in range(3):
                start = time.time()
                out = etarl.rollout(model, task, n, 1, control(n), drop_ended=drop)
                times.append(time.time() - start)
            best[drop] = result[f"{name} {n} episodes, {'drop' if drop else 'keep'} ended s"] = min(times)
        print(f"{name}, {n} episodes (mean length {out['length'].mean():.1f}, longest {out['length'].max()}): "
              f"{best[False]:.2f} s keeping ended episodes, {best[True]:.2f} s dropping them", flush=True)
    return result


def load_revision(rev: str):
    """etarl.py (and envs.py) as they were at git revision `rev`, imported as a separate module."""
    root, folder = Path(__file__).resolve().parents[1], Path(tempfile.mkdtemp())
    for name in ("etarl.py", "envs.py"):
        show = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=root, capture_output=True, text=True)
        if show.returncode:
            sys.exit(f"git show {rev}:{name} failed: {show.stderr.strip()}")
        (folder / name).write_text(show.stdout)
    sys.path.insert(0, str(folder))                    # its `import envs` finds its own envs.py first
    saved = sys.modules.pop("envs")
    spec = importlib.util.spec_from_file_location(f"etarl_{rev}", folder / "etarl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                    # dataclasses look their module up there
    spec.loader.exec_module(module)
    sys.path.pop(0)
    sys.modules["envs"] = saved
    return module


def metacontroller(rev: str | None = None, threads: str = "1") -> dict:
    torch.set_num_threads(int(threads))
    versions = {"this checkout": etarl, **({rev: load_revision(rev)} if rev else {})}
    lead = dict(read_norm=True, gumbel_switch=True, kl_per_switch=True, switch_temperature=0.5, batch_size=256,
                logvar_init=-6.0)
    result, configs = {}, (("Eq. 3, batch 64", {}, 40), ("lead, batch 256", lead, 12))

    def best_of_two(where: str, data_for) -> None:
        """Each config's seconds per step, best of two calls, in each version that data_for(E) gives data to."""
        for name, over, steps in configs:
            for _ in range(2):
                for version, E in versions.items():
                    data = data_for(E)
                    if data is None:
                        continue
                    model = E.freeze(E.load_model("runs/grid-cpu-s0/base.pt"))
                    cfg = dataclasses.replace(E.MetaConfig(), steps=steps, **over)         # Eq. 3's, or the lead
                    start = time.time()
                    E.train_metacontroller(model, data, cfg, seed=0, progress=False)
                    key, s = f"{name}{where}, {version} s/step", (time.time() - start) / steps
                    result[key] = min(result.get(key, s), s)
                    print(f"{name}{where}, {version}: {s:.3f} s/step", flush=True)

    best_of_two("", lambda E: E.Episodes.load("runs/grid-cpu-s0/train.npz"))
    model = etarl.freeze(etarl.load_model("runs/grid-cpu-s0/base.pt"))
    train = etarl.Episodes.load("runs/grid-cpu-s0/train.npz")
    start = time.time()                                # the cpu preset's way: on a StreamCache
    cache = etarl.StreamCache(model, train, len(model.blocks) // 2)
    result["stream cache build s"] = time.time() - start
    print(f"stream cache build: {result['stream cache build s']:.0f} s", flush=True)
    best_of_two(", on the stream cache", lambda E: cache if hasattr(E, "StreamCache") else None)   # REV may lack it
    return result


def bf16() -> dict:
    cpu, steps = torch.device("cpu"), 20
    result = {"ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", "(unset)"), "threads": torch.get_num_threads()}

    def best_of_two(name: str, model, batches: list, n: int) -> None:
        """Seconds per step in float32 and in bfloat16, in turn, twice; each on the same batches (2 warm-up + n)."""
        for _ in range(2):
            for precision in ("fp32", "bf16"):
                s = seconds_per_call(train_step(model, functools.partial(next, iter(batches)), precision == "bf16"),
                                     n, cpu)
                result[f"{name}{precision} s/step"] = min(s, result.get(f"{name}{precision} s/step", s))
        result[f"{name}bf16 / fp32"] = result[f"{name}bf16 s/step"] / result[f"{name}fp32 s/step"]

    run = etarl.Run("cpu", progress=False)
    train = run.data()[0]
    rng, by_length = np.random.default_rng(0), np.argsort(train.lengths, kind="stable")
    batches = [train.batch(etarl.length_bucketed_batch(by_length, run.cfg.pretrain.batch_size, rng), "cpu")
               for _ in range(2 + steps)]                 # the same batches for every timing: their lengths vary
    best_of_two("", etarl.build_model(run.cfg.model), batches, steps)
    ant = etarl.get_preset("cpu", "ant")                          # and the ant-cpu preset's Hawk, at T = 500
    best_of_two("ant ", etarl.build_model(ant.model, "ant"), [ant_batch(ant.pretrain.batch_size, 500, "cpu")] * 7, 5)
    return result


if __name__ == "__main__":
    commands = {"paper": main, "rollouts": rollouts, "metacontroller": metacontroller, "bf16": bf16}
    name, *rest = sys.argv[1:] or ["paper"]
    if name not in commands or len(rest) > 2 * (name == "metacontroller"):   # only metacontroller takes arguments
        sys.exit("usage: python experiments/timing.py [rollouts | metacontroller [REV [THREADS]] | bf16]")
    print(json.dumps(commands[name](*rest), indent=1))
