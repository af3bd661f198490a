"""Why the metacontroller collapses on the gridworld, and what it learns when it does not: the diagnostics
behind the lab notes (experiments/README.md, section 3).

Every command runs on the cached cpu run (runs/grid-cpu-s0, made by `python etarl.py`), prints one line per
measurement and writes a JSON file. `oracle` and `decoder` can hand the truth (subgoal labels, boundaries, the
task) to parts of the metacontroller, which the method itself never sees, to find out which part fails; `codes`,
`replay` and `rl` analyse and use a label-free metacontroller that `oracle --gate learned --save` trained (or, given
`pipeline` for ORACLE.json, the pipeline's own, runs/grid-cpu-s0/meta.pt). `oracle` and
`decoder` take another base model with --base FILE (one saved by `controllers.py scale --save`, such as its
diagnostic Factored model); `codes`, `replay` and `rl` read it from the oracle run's JSON.

  python experiments/metacontroller.py oracle [--gate oracle] [--code-input subgoal|boundary|task]
                                              [--alpha 0.1] [--steps 1500] [--kl-delay 0] [--logvar-bias 0]
                                              [--code gaussian|categorical]
      the cpu preset's Eq. 3 metacontroller training (Preset.meta_eq3, frozen base model), with parts replaced by the truth:
      --gate oracle takes a new code exactly at the true subgoal boundaries (beta = 1 there and at t = 0,
      0 elsewhere); --code-input replaces the learned sequence embedding s that the encoder reads by the
      current subgoal (one-hot, every step), the new subgoal at the boundaries only (zeros elsewhere), or
      the task (one-hot). --kl-delay trains with alpha = 0 for its first steps (MetaConfig.kl_delay);
      --logvar-bias starts the encoder's log-variance there (MetaConfig.logvar_init); --encoder-reads s zeroes the
      encoder's other inputs (e_t, h_t-1), so that it reads nothing but s (h-s: zeroes e_t only);
      --per-step-embedding makes the learned s per step (MetaConfig.per_step_embedding); --code categorical makes
      z~ one of n_z one-hot codes with a uniform prior (CategoricalCode, not the paper's); --set FIELD=VALUE sets
      any other MetaConfig field (kl_warmup, read_norm, gumbel_switch, switch_bias, ...); --save keeps the trained
      metacontroller's weights. Reports the held-out action NLL, KL and the switching statistics of
      etarl.metacontroller_stats, and where a soft gate puts its weight (mean beta at the true boundaries and
      elsewhere, switch F1 at lower thresholds). About 5-6 minutes on one thread.

  python experiments/metacontroller.py codes ORACLE.json [--weights W.pt] [--injection]
      what the codes of a metacontroller saved by `oracle --gate learned --save W.pt` encode (ORACLE.json: the
      JSON that run wrote, which names its options and weights): over the held-out segments between switches,
      probes (softmax regression and an MLP, trained on half the segments) from the segment's code to its
      subgoal, the colour the expert heads to at its start and the expert's first move, and a linear fit of that
      colour's row and column; --injection adds etarl.code_injection. A few minutes on one thread, more with
      --injection.

  python experiments/metacontroller.py rl ORACLE.json [--weights W.pt] [--task 0-1-2-...] [--episodes 6144]
                                          [--lrs 3e-4 3e-3] [--seeds 3] [--method internal|raw_action]
      internal RL (the pipeline's etarl.InternalRL and etarl.rl_experiment) on such a saved metacontroller:
      success and episode progress per batch, and the uncontrolled model's on the same task. About 10-15 s per
      RL run of 6,144 episodes on the 12-colour task on one thread (most episodes end early); about 4 minutes per
      100,000 episodes of 0-1-2-3 or 0-1-4-5-0-1. --method raw_action runs baseline 1 instead (etarl.RawActionRL,
      every base-model parameter trains; the metacontroller is unused): about 14 minutes per 25,600 episodes of
      0-1-4-5-0-1, where its episodes grow long as it learns.

  python experiments/metacontroller.py replay ORACLE.json [--weights W.pt] [--tasks 0-1-2-3 ...] [--episodes 500]
                                              [--code-scale 1] [--edit-scale 1] [--fit-steps 0]
      are the codes good actions on the layout they were inferred from? The encoder reads the expert's noise-free
      episode of the task on a layout; then the controlled model plays that layout (same seed) in closed loop, and
      at the frozen gate's k-th firing takes the k-th code inferred (a reference point, not a bound, for a policy
      that picks codes, such as internal RL's); against the next episode's codes (another layout) and no control.
      Sampled and greedy actions; --code-scale and --edit-scale make every replayed code, or the edit it decodes
      to, that many times stronger. --fit-steps N also replays codes fitted to the expert's actions on the layout
      (fit_codes: the gate's segmentation held fixed, N Adam steps on the teacher-forced action NLL from the
      inferred codes): do codes exist that steer better than the ones the encoder infers? About a minute per task
      on one thread, and about 4 more minutes per task with --fit-steps 200 on 0-1-2-3.

  python experiments/metacontroller.py curve [--steps 0] [--every 500] [--episodes 500] [--seed 0] [--threads 1]
                                             [--set FIELD=VALUE] [--resume] [--env grid|ant] [--aligned] [--save W.pt]
      the pipeline's own metacontroller (`python etarl.py`'s: the cpu preset's MetaConfig, seeded the same way) on
      the cpu run's base model, with switch F1, switches per episode, quasi-binary beta, purity, NLL and KL on the
      first --episodes held-out episodes every --every steps. With --threads 2 (the pipeline's, on this machine) it
      trains exactly the pipeline's metacontroller; --set changes a field of its MetaConfig (e.g. lr_decay_from);
      --resume trains on from the pipeline's trained metacontroller (e.g. at another alpha) instead of a new one.
      About 0.27 s per step on two threads, after about a minute building the stream cache. --env ant does the
      same on the ant pipeline's run (runs/ant-cpu-s0, whose base model fails the quality gate; about 0.7 s per
      step on two threads, 1 s on one) and adds where the switches fall against the torso's cell crossings and
      the expert gait's cycle, and what the codes say of the way walked (ant_rhythm); --aligned applies
      etarl.ALIGNED, the grid cpu preset's remedies, before --set (the ant preset trains by Eq. 3; not with
      --resume, whose saved metacontroller keeps its own settings); --save keeps the trained weights.

  python experiments/metacontroller.py decoder [--steps 1500] [--lr 1e-3] [--code subgoal|target-cell] [--layer L]
      the metacontroller's hypernetwork alone, fed the true subgoal as a clean code (one-hot; no encoder, no noise, no
      KL), trained by action NLL: can the decoder express what knowing the subgoal is worth? With --code
      target-cell the code is instead the cell of the colour the expert heads to (one-hot over the G^2 cells): is
      a place worth more than a name to the steered base model? --layer L writes the edit before block L instead
      of L/2 (block 2 at the cpu preset). Also the held-out action NLL of the base model without control and with
      the preset's supervised controllers at the same layer. About 4-7 minutes on one thread.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs    # noqa: E402
import etarl   # noqa: E402
from controllers import base_model   # noqa: E402  (experiments/ is on the path of a script run from it)


class Oracle(etarl.Metacontroller):
    """The metacontroller with its gate and/or its sequence embedding replaced by the truth of each batch,
    which `Labelled` hands it. The gate's oracle returns logits of +-30 (beta = 1 or about 1e-13)."""

    def __init__(self, d_model: int, layer: int, cfg: etarl.MetaConfig, gate: str, code_input: str,
                 reads: str = "all"):
        super().__init__(d_model, layer, cfg)
        self.gate, self.code_input, self.labels = gate, code_input, None
        if reads != "all":                            # zero the encoder's e_t input (h-s), and h_t-1 too (s)
            keep = torch.ones(d_model + cfg.n_h + cfg.n_s)
            keep[:d_model + (cfg.n_h if reads == "s" else 0)] = 0
            self.encoder = torch.nn.Sequential(Mask(keep), self.encoder)

    def sequence_embedding(self, e, lengths):
        if self.code_input == "learned":
            return super().sequence_embedding(e, lengths)
        subgoal, boundary, task = self.labels
        if self.code_input == "task":
            return F.one_hot(task, self.cfg.n_s).float()[:, None].expand(-1, e.shape[1], -1)
        s = F.one_hot(subgoal.clamp(min=0), self.cfg.n_s).float()
        return s * boundary[..., None] if self.code_input == "boundary" else s

    def switch_logits(self, e, h_prev):
        if self.gate == "learned":
            return super().switch_logits(e, h_prev)
        return lambda t, z_prev: 60 * self.labels[1][:, t, None] - 30


class CategoricalCode:
    """A mixin for a metacontroller class whose code z~ is one of n_z choices, not a Gaussian (NOT the paper's):
    the encoder's first n_z outputs are logits (the rest unused); in training z~ is a straight-through
    Gumbel-softmax one-hot sample, otherwise the argmax; the rate is KL(q || uniform) = sum_k q_k ln(n_z q_k),
    at most ln n_z. With n_z = 4, no code can say where on a new layout to go, only which of four things to do.
    Internal RL's Gaussian policy cannot drive it (`rl` refuses)."""

    def sample_code(self, logits, logvar, sample=True):
        if sample:
            return F.gumbel_softmax(logits, tau=1.0, hard=True)
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)

    def rate(self, logits, logvar):
        return logits.softmax(-1) * (logits.log_softmax(-1) + np.log(logits.shape[-1]))


class CategoricalOracle(CategoricalCode, Oracle):
    pass


class CategoricalMetacontroller(CategoricalCode, etarl.Metacontroller):
    pass


class Mask(torch.nn.Module):
    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, x):
        return x * self.keep


class Labelled:
    """Episodes whose every batch also hands its true labels (subgoal, boundary, task) to an Oracle."""

    def __init__(self, data: etarl.Episodes, oracle: Oracle):
        self.data, self.oracle = data, oracle

    def __len__(self):
        return len(self.data)

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batch(self, idx, device):
        b = self.data.batch(idx, device)
        boundary = torch.as_tensor(etarl.true_boundaries(b["subgoal"].cpu().numpy(), b["mask"].cpu().numpy())).float()
        boundary[:, 0] = 1                                            # t = 0 always takes a code
        task = torch.as_tensor(self.data.task_id[np.sort(np.asarray(idx))], device=device)
        self.oracle.labels = (b["subgoal"], boundary.to(device), task)
        return b


def curve(values: list, every: int = 250) -> list:
    return [round(float(np.mean(values[i:i + 100])), 4) for i in range(0, len(values), every)]


def oracle(args) -> dict:
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    run = etarl.Run("cpu", progress=False)
    model, (train, test) = base_model(run, args.base), run.data()
    cfg = meta_config(run, vars(args))
    torch.manual_seed(args.seed)
    kind = CategoricalOracle if args.code == "categorical" else Oracle
    meta = kind(model.cfg.d_model, len(model.blocks) // 2, cfg, args.gate, args.code_input, args.encoder_reads)
    t = time.time()
    meta, history = etarl.train_metacontroller(model, Labelled(train, meta), cfg, args.seed, progress=False, meta=meta)
    held_out = etarl.meta_outputs(model, meta, Labelled(test, meta))
    out = {"train_time_s": time.time() - t, "train_steps": len(history["loss"]), "train_nll": curve(history["action_nll"]),
           "train_kl": curve(history["kl"]), **etarl.metacontroller_stats(held_out)}
    out["objective"] = out["action_nll"] + cfg.alpha * out["kl"]
    out.update(soft_switching(held_out))
    print(json.dumps(out), flush=True)
    if args.save:                                     # the Oracle's own state_dict (rebuild it with the same options)
        torch.save(meta.state_dict(), args.save)
    return out


def pipeline_curve(args) -> dict:
    """The pipeline's own metacontroller (Run.metacontroller's training: the preset's MetaConfig, seeded the same
    way) on the cpu run's base model, with its switching statistics on the first --episodes held-out episodes
    every --every steps. Evaluating does not change the training (a test checks this). With --resume the
    training goes on from the pipeline's trained metacontroller (its weights; a fresh optimiser) instead of a new
    one, with the preset's MetaConfig changed by --set for the training (alpha and its schedule, steps, lr, batch),
    and its statistics are printed at step 0 too. --env ant does all this on the ant pipeline's run (its base model
    fails the gate, which is not asked here) and adds ant_rhythm's measures; --aligned sets etarl.ALIGNED first."""
    if args.resume and args.aligned:                                 # a saved metacontroller keeps its own settings
        raise SystemExit("--aligned sets up a new metacontroller; with --resume the saved one keeps its own settings")
    run = etarl.Run("cpu", env=args.env, progress=False)
    model, test = etarl.freeze(run.base_model()[0]), run.data()[1]
    held_out, rows, t = test.subset(np.arange(min(args.episodes, len(test)))), [], time.time()
    keys = ("f1", "precision", "recall", "switches_per_episode", "quasi_binary", "code_purity", "action_nll", "kl",
            "regime")

    def evaluate(step, meta):
        if step % args.every == 0 or step == cfg.steps:
            out = etarl.meta_outputs(model, meta.eval(), held_out)
            stats = etarl.metacontroller_stats(out)
            meta.train()
            rows.append({"step": step, "seconds": round(time.time() - t), **{k: stats[k] for k in keys},
                         **(ant_rhythm(out, held_out) if args.env == "ant" else {})})
            print(json.dumps(rows[-1]), flush=True)

    cfg = dataclasses.replace(run.cfg.meta, **{**(etarl.ALIGNED if args.aligned else {}),
                                               "steps": args.steps or run.cfg.meta.steps, **dict(args.set)})
    meta = None
    if args.resume:
        meta = pipeline_meta(run)
        evaluate(0, meta)
    meta, _ = etarl.train_metacontroller(model, run.meta_data(), cfg, args.seed, progress=False, meta=meta,
                                         callback=evaluate)
    if args.save:
        etarl.save_meta(meta, args.save)
    return {"curve": rows}


def ant_rhythm(out: dict, data: etarl.AntEpisodes) -> dict:
    """Where an ant metacontroller's switches fall besides the subgoal boundaries, and what its codes carry.

    cell_*: precision, recall and F1, within one step (as etarl.switch_alignment), against the steps at which the
    torso enters another cell of the grid (every subgoal boundary is one); cells_per_episode counts the cells
    entered, the first included. recall_by_chance: the recall that boundaries at random steps would get, the
    fraction of steps t > 0 within one step of a switch. bursts_per_episode: switches at t > 0 without one at t - 1.
    steps_per_segment: valid steps per switch-delimited segment (t = 0 counts as a switch). The expert gait's phase
    is ANT_GAIT's omega x t plus a constant (a cycle of about 9.4 steps, in which each diagonal leg pair swings once,
    so its half-cycle is a step of the trot): cycle_locking and half_cycle_locking are the resultant lengths of the
    bursts' phases at omega and 2 omega, 1 when every burst starts at one phase, near 0 when many spread evenly
    (about 1 / sqrt(bursts) by chance; None without switches). heading_r2: the R^2 of a linear fit, from a segment's
    code, of the direction the torso moved over it (the unit vector from its first step to the step after its last;
    segments of 3 steps or more; None for 20 or fewer), pooled over the two components."""
    mask, T, G = out["mask"], out["mask"].shape[1], 4                # G: the ant world's grid (AntPinpad's default)
    xy = data.obs[:, :T + 1, 27:29] * (G * envs.ANT_CELL / 2)        # the observation's scaled torso x, y
    cells = etarl.switch_alignment(out["beta"], envs.ant_cell(xy[:, :T], G), mask)
    switch = (out["beta"] > 0.5) & mask
    switch[:, 0] = False
    near = switch | np.pad(switch[:, 1:], ((0, 0), (0, 1))) | np.pad(switch[:, :-1], ((0, 0), (1, 0)))
    burst = switch & ~np.pad(switch[:, :-1], ((0, 0), (1, 0)))
    t = np.nonzero(burst)[1]
    locking = lambda k: float(abs(np.exp(1j * k * envs.ANT_GAIT["omega"] * t).mean())) if len(t) else None
    seg = etarl.segments(out)
    seg = seg[seg[:, 2] - seg[:, 1] >= 3]
    moved = xy[seg[:, 0], seg[:, 2]] - xy[seg[:, 0], seg[:, 1]]
    heading = moved / np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-9)
    return {"cell_f1": cells["f1"], "cell_precision": cells["precision"], "cell_recall": cells["recall"],
            "cells_per_episode": cells["subgoals_per_episode"],
            "recall_by_chance": float(near[:, 1:][mask[:, 1:]].mean()),
            "bursts_per_episode": float(burst.sum(1).mean()), "cycle_locking": locking(1),
            "half_cycle_locking": locking(2), "steps_per_segment": float(mask.sum() / (switch.sum() + len(mask))),
            "heading_r2": linear_r2(out["z"][seg[:, 0], seg[:, 2] - 1], heading) if len(seg) > 20 else None}


def meta_config(run: etarl.Run, args: dict) -> etarl.MetaConfig:
    """The MetaConfig of an `oracle` run from its arguments (args of this run, or the "args" of its JSON)."""
    return dataclasses.replace(run.meta_eq3, **{"alpha": args["alpha"], "steps": args["steps"],
                                                "kl_delay": args["kl_delay"], "per_step_embedding": args["per_step_embedding"],
                                                "logvar_init": args["logvar_bias"], **dict(args["set"])})


def pipeline_meta(run: etarl.Run) -> etarl.Metacontroller:
    """The metacontroller of `python etarl.py` (the run folder's meta.pt), which is never retrained here (that
    takes about 27 minutes, and on other threads its float rounding, so its result, would differ)."""
    if not (run.dir / "meta.pt").exists():
        command = "python etarl.py" + (" --env ant --force" if run.env == "ant" else "")
        raise SystemExit(f"{run.dir / 'meta.pt'} is missing: run `{command}` first")
    return run.metacontroller()[0]


def load_saved(oracle_json: str, weights: str | None):
    """The frozen base model (the cpu run's, or the run's --base), held-out episodes and the metacontroller that an
    `oracle --gate learned --save W.pt` run trained (its options read from the JSON it wrote), as a plain
    etarl.Metacontroller; oracle_json "pipeline" names the cpu run's own instead (runs/grid-cpu-s0/meta.pt)."""
    if oracle_json == "pipeline":
        if weights:
            raise SystemExit("`pipeline` is the metacontroller of `python etarl.py`; it takes no --weights")
        run = etarl.Run("cpu", progress=False)
        return run, etarl.freeze(run.base_model()[0]), run.data()[1], pipeline_meta(run)
    spec = json.loads(Path(oracle_json).read_text())["args"]
    if spec.get("command") != "oracle":
        raise SystemExit(f"{oracle_json} was written by `{spec.get('command')}`; give the JSON of an `oracle` run")
    if (spec["gate"], spec["code_input"], spec["encoder_reads"]) != ("learned", "learned", "all"):
        raise SystemExit(f"{oracle_json}: this needs a metacontroller without oracle parts (--gate learned, "
                         f"--code-input learned, --encoder-reads all); this one had --gate {spec['gate']} --code-input "
                         f"{spec['code_input']} --encoder-reads {spec['encoder_reads']}")
    if not (weights or spec["save"]):
        raise SystemExit(f"{oracle_json}: that run kept no weights (no --save); pass them with --weights")
    run = etarl.Run("cpu", progress=False)
    model, (_, test) = base_model(run, spec.get("base")), run.data()
    device = next(model.parameters()).device
    kind = CategoricalMetacontroller if spec.get("code") == "categorical" else etarl.Metacontroller
    meta = kind(model.cfg.d_model, len(model.blocks) // 2, meta_config(run, spec))
    meta.load_state_dict(torch.load(weights or spec["save"], map_location=device))
    return run, model, test, meta.to(device).eval()


def internal_rl(args) -> dict:
    """Internal RL (etarl.InternalRL, the pipeline's RL code) on a metacontroller saved by `oracle --save`, or
    with --method raw_action the same RL on the base model's actions (etarl.RawActionRL): for each run at the
    chosen lr, the mean batch success and progress (colours completed per episode) over its first and last 8
    batches and how many batches had unequal returns (the others give PPO no update); and the uncontrolled base
    model's success and progress on the same task."""
    run, model, test, meta = load_saved(args.oracle_json, args.weights)
    if isinstance(meta, CategoricalCode):
        raise SystemExit(f"{args.oracle_json}: a categorical code; internal RL's policy is Gaussian over z")
    stats = etarl.metacontroller_stats(etarl.meta_outputs(model, meta, test))
    print(json.dumps({k: stats[k] for k in ("f1", "switches_per_episode", "quasi_binary", "code_purity")}), flush=True)
    cfg = dataclasses.replace(run.cfg.rl, episodes=args.episodes, lrs=tuple(args.lrs), seeds=args.seeds,
                              task=args.task, methods=(args.method,))
    task, t = envs.parse_task(cfg.task), time.time()
    learner = {"internal": lambda: etarl.InternalRL(model, meta, cfg.hidden),
               "raw_action": lambda: etarl.RawActionRL(model)}
    result = etarl.rl_experiment({args.method: learner[args.method]}, task, cfg, progress=False)[args.method]
    ends = lambda v: [round(float(np.mean(v[:8])), 4), round(float(np.mean(v[-8:])), 4)]
    uncontrolled = etarl.rollout(model, task, 2000, 10**8)
    out = {"meta": stats, "seconds_per_rl_run": (time.time() - t) / (len(cfg.lrs) + cfg.seeds - 1),
           "lr": result["lr"], "scan": result["scan"], "final_success": result["final_success"],
           "success_first_last_8": [ends(h["success"]) for h in result["runs"]],
           "progress_first_last_8": [ends(h["progress"]) for h in result["runs"]],
           "batches_with_unequal_returns": [sum(0 < v < 1 for v in h["success"]) for h in result["runs"]],
           "uncontrolled_success": float(uncontrolled["success"].mean()),
           "uncontrolled_progress": float(uncontrolled["progress"].mean()), "runs": result["runs"]}
    print(json.dumps({k: v for k, v in out.items() if k not in ("meta", "runs")}), flush=True)
    return out


def probe_accuracy(x: np.ndarray, y: np.ndarray, hidden: int, seed: int = 0, steps: int = 3000) -> tuple:
    """Held-out accuracy of a classifier of y from x (softmax regression, or an MLP with two hidden layers),
    trained on a random half of the rows, and the majority class's share of the other half, where it is tested."""
    torch.manual_seed(seed)
    idx = np.random.default_rng(seed).permutation(len(y))
    train, test = idx[:len(y) // 2], idx[len(y) // 2:]
    majority = float(np.bincount(y[test]).max() / len(test))
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    k = int(y.max()) + 1
    layers = [torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
              torch.nn.Linear(hidden, k)] if hidden else [torch.nn.Linear(x.shape[1], k)]
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(net(x[train]), y[train])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((net(x[test]).argmax(1) == y[test]).float().mean()), majority


def linear_r2(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 of the least-squares affine fit of y from x (in-sample; x has few columns against many rows)."""
    x1 = np.c_[x, np.ones(len(x))]
    w = np.linalg.lstsq(x1, y, rcond=None)[0]
    return float(1 - ((y - x1 @ w) ** 2).mean() / y.var())


def codes(args) -> dict:
    """What a saved metacontroller's codes encode: for every switch-delimited held-out segment, its code (z at
    its last step) against the segment's subgoal, the colour the expert heads to at its start, that colour's row
    and column on the grid, and the expert's first move; then code injection (etarl.code_injection)."""
    _, model, test, meta = load_saved(args.oracle_json, args.weights)
    out = etarl.meta_outputs(model, meta, test)
    seg = etarl.segments(out)
    z, subgoal = etarl.segment_codes(out)
    i, a = seg[:, 0], seg[:, 1]
    colour = test.target[i, a]
    row, col = np.divmod(test.colour_cells[i, colour], test.grid_size)
    labels = {"subgoal": subgoal, "target_colour": colour, "first_move": test.actions[i, a]}
    result = {"segments": len(seg), "code_purity": etarl.code_purity(out),
              "code_std": [round(float(v), 3) for v in z.std(0)],
              "target_row_r2": linear_r2(z, row), "target_col_r2": linear_r2(z, col)}
    for name, y in labels.items():
        result[f"{name}_linear_probe"], result[f"{name}_majority"] = probe_accuracy(z, y.astype(np.int64), 0)
        result[f"{name}_mlp_probe"] = probe_accuracy(z, y.astype(np.int64), 256)[0]
    print(json.dumps(result), flush=True)
    if args.injection:
        result["injection"] = etarl.code_injection(model, meta, test, n=200)
        print(json.dumps(result["injection"]), flush=True)
    return result


class CodeReplay(etarl.InternalAgent):
    """Internal RL's hook with the policy replaced by a list: the frozen gate's k-th firing in episode i takes
    codes[i][k] (the last one if the gate fires more often than the expert's episode switched), times code_scale;
    the decoded edit U_t e_t is multiplied by edit_scale. `at` and `keep_episodes` are InternalAgent's."""

    def __init__(self, meta: etarl.Metacontroller, codes: list, code_scale: float = 1.0, edit_scale: float = 1.0):
        n, self.meta, self.layer = len(codes), meta, meta.layer
        self.code_scale, self.edit_scale = code_scale, edit_scale
        device = next(meta.parameters()).device
        self.codes = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(c) for c in codes], batch_first=True).to(device)
        self.last = torch.as_tensor([len(c) - 1 for c in codes], device=device)
        self.rows, self.k = torch.arange(n, device=device), torch.zeros(n, dtype=torch.long, device=device)
        self.z = torch.zeros(n, meta.cfg.n_z, device=device)
        self.gate_state, self.state, self.obs = None, None, None        # no policy, so its state stays None

    @torch.no_grad()
    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        fire, self.gate_state = self.meta.gate_step(self.gate_state, e[:, 0], self.obs[self.rows], self.z)
        k = torch.minimum(self.k[self.rows], self.last[self.rows])
        self.z = torch.where(fire[:, None], self.code_scale * self.codes[self.rows, k], self.z)
        self.k[self.rows] += fire.long()
        return self.edit_scale * self.meta.decode(self.z[:, None])(e)


def fit_codes(model, meta, data: etarl.Episodes, fire: np.ndarray, z: np.ndarray, steps: int, lr: float = 0.05):
    """Each episode's segment codes, with the gate's segmentation of the expert's episode held fixed, started at
    the encoder's and fitted by Adam to the expert's actions (teacher-forced action NLL, all episodes at once): the
    codes that best explain what the expert did, whether or not the encoder would infer them. Returns the codes
    per episode and the NLL before and after."""
    device, (n, _), K = next(model.parameters()).device, fire.shape, int(fire.sum(1).max())
    start = np.zeros((n, K, meta.cfg.n_z), np.float32)
    for i in range(n):
        start[i, :fire[i].sum()] = z[i][fire[i]]
    segment = torch.as_tensor(np.clip(np.cumsum(fire, 1) - 1, 0, K - 1), device=device)[..., None]   # (n, T, 1)
    Z, b = torch.nn.Parameter(torch.tensor(start, device=device)), data.batch(np.arange(n), device)
    opt, nll = torch.optim.Adam([Z], lr=lr), []
    for step in range(steps + 1):
        loss = model.loss(b, meta.decode(Z.gather(1, segment.expand(-1, -1, Z.shape[-1]))), obs_loss=False)
        nll.append(loss["action_nll"].item())
        if step < steps:
            opt.zero_grad(set_to_none=True)
            loss["action_nll"].backward()
            opt.step()
    return [Z.detach()[i, :fire[i].sum()].cpu().numpy() for i in range(n)], nll[0], nll[-1]


def replay(args) -> dict:
    """The codes inferred from the expert's episode on a layout (and, with --fit-steps, codes fitted to it),
    played back on that layout and on another one."""
    _, model, _, meta = load_saved(args.oracle_json, args.weights)
    meta, result, seed, n = etarl.freeze(meta), {}, 10**8, args.episodes
    for text in args.tasks:
        task = envs.parse_task(text)
        data = etarl.generate_episodes(n, seed, task=task)
        out = etarl.meta_outputs(model, meta, data)
        fire = (out["beta"] > 0.5) & out["mask"]
        codes = {"same_layout": [z[f] for z, f in zip(out["z"], fire)]}       # the k-th switch's code, in order
        row = {"switches_inferred": float(fire.sum(1).mean())}
        if args.fit_steps:
            codes["fitted_same_layout"], row["nll_inferred"], row["nll_fitted"] = fit_codes(
                model, meta, data, fire, out["z"], args.fit_steps)
        for name in list(codes):
            codes[name.replace("same", "other")] = codes[name][1:] + codes[name][:1]       # the next episode's
        for name, given in codes.items():
            for greedy in (False, True):
                hook = CodeReplay(meta, given, args.code_scale, args.edit_scale)
                r = etarl.rollout(model, task, n, seed, hook.at, greedy=greedy)
                key = f"{name}_{'greedy' if greedy else 'sampled'}"
                row[key], row[f"{key}_progress"] = float(r["success"].mean()), float(r["progress"].mean())
                row[f"{key}_switches"] = float(hook.k.float().mean())           # the gate's firings, in closed loop
        for greedy in (False, True):
            r = etarl.rollout(model, task, n, seed, greedy=greedy)
            row[f"uncontrolled_{'greedy' if greedy else 'sampled'}"] = float(r["success"].mean())
        result[text] = row
        print(text, json.dumps(row), flush=True)
    return result


def soft_switching(out: dict) -> dict:
    """Where a soft gate puts its weight: the mean switch probability sigmoid(logit) (beta itself, unless the
    switch is binary) at the true boundaries and at the other steps (t > 0), and the switch F1 when a switch is
    counted at a probability > threshold instead of 0.5."""
    later, p = out["mask"].copy(), out["switch_prob"]
    later[:, 0] = False
    boundary = etarl.true_boundaries(out["subgoal"], out["mask"])
    f1 = {f"f1_beta_above_{c}": etarl.switch_alignment((p > c).astype(float), out["subgoal"], out["mask"])["f1"]
          for c in (0.05, 0.1, 0.2, 0.3)}
    return {"beta_at_boundaries": float(p[boundary].mean()),
            "beta_elsewhere": float(p[later & ~boundary].mean()), **{k: float(v) for k, v in f1.items()}}


@torch.no_grad()
def held_out_nll(model, data: etarl.Episodes, control_of, batch_size: int = 256) -> float:
    """Action NLL per valid step on `data` under control_of(batch, idx) (a Control, or None)."""
    total, steps = 0.0, 0
    for i in range(0, len(data), batch_size):
        idx = np.arange(i, min(i + batch_size, len(data)))
        b = data.batch(idx, "cpu")
        n = b["mask"].sum().item()
        total, steps = total + model.loss(b, control_of(b, idx), obs_loss=False)["action_nll"].item() * n, steps + n
    return total / steps


def true_code(kind: str, data: etarl.Episodes, b: dict, idx, n_z: int) -> torch.Tensor:
    """A clean one-hot code (n_z wide) per step: the current subgoal (4 pairs), or the cell of the colour the
    expert heads to (n_z = G^2 cells; a place, not a name)."""
    if kind == "subgoal":
        return F.one_hot(b["subgoal"].clamp(min=0), n_z).float()
    idx = np.sort(idx)                                # the batch's order
    cells = np.take_along_axis(data.colour_cells[idx], data.target[idx, :b["mask"].shape[1]].clip(0), 1)
    return F.one_hot(torch.as_tensor(cells, dtype=torch.long), n_z).float()


def decoder(args) -> dict:
    run = etarl.Run("cpu", progress=False)
    model, (train, test) = base_model(run, args.base), run.data()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = run.meta_eq3 if args.code == "subgoal" else dataclasses.replace(run.meta_eq3, n_z=train.grid_size ** 2)
    layer = len(model.blocks) // 2 if args.layer is None else args.layer
    if not 0 <= layer < len(model.blocks):
        raise SystemExit(f"--layer {layer}: the base model has layers 0 .. {len(model.blocks) - 1} (an edit before "
                         "that block)")
    meta = etarl.Metacontroller(model.cfg.d_model, layer, cfg)
    control = lambda data: lambda b, idx: meta.decode(true_code(args.code, data, b, idx, cfg.n_z))   # noise-free
    opt = torch.optim.AdamW(meta.hyper.parameters(), lr=args.lr, weight_decay=cfg.weight_decay)
    by_length, history, t = np.argsort(train.lengths, kind="stable"), [], time.time()
    for _ in range(args.steps):
        idx = etarl.length_bucketed_batch(by_length, cfg.batch_size, rng)
        b = train.batch(idx, "cpu")
        loss = model.loss(b, control(train)(b, idx), obs_loss=False)["action_nll"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(meta.hyper.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
    out = {"train_time_s": time.time() - t, "train_nll": curve(history), "layer": layer,
           "code": args.code, "decoder_nll": held_out_nll(model, test, control(test)),
           "uncontrolled_nll": held_out_nll(model, test, lambda b, idx: None)}
    ctrl, _ = etarl.train_controllers(model, train, layer, run.cfg.control, args.seed, progress=False)
    out["supervised_controllers_nll"] = held_out_nll(model, test, lambda b, idx: ctrl(b["subgoal"]))
    print(json.dumps(out), flush=True)
    return out


def meta_field(text: str) -> tuple:
    """'kl_warmup=500' -> ('kl_warmup', 500), typed by MetaConfig's field; a clear error otherwise."""
    name, _, value = text.partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(etarl.MetaConfig)}
    if name not in fields or not value:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with FIELD one of {', '.join(fields)}; got {text!r}")
    kind = (fields[name] if isinstance(fields[name], str) else fields[name].__name__).split(" | ")[0]   # int | None
    if kind == "bool":
        if value.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"{name} takes true or false, not {value!r}")
        return name, value.lower() in ("true", "1")
    try:
        return name, {"int": int, "float": float}.get(kind, float)(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} takes a number, not {value!r}") from None


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    o = sub.add_parser("oracle")
    o.add_argument("--gate", choices=("learned", "oracle"), default="oracle")
    o.add_argument("--code-input", choices=("learned", "subgoal", "boundary", "task"), default="learned",
                   help="what the encoder reads as s: the learned embedding, or a one-hot truth")
    o.add_argument("--encoder-reads", choices=("all", "h-s", "s"), default="all",
                   help="h-s: its e_t input zeroed; s: e_t and h_t-1 zeroed")
    o.add_argument("--alpha", type=float, default=0.1)
    o.add_argument("--steps", type=int, default=1500)
    o.add_argument("--kl-delay", type=int, default=0, help="steps with alpha = 0 first")
    o.add_argument("--logvar-bias", type=float, default=0.0,
                   help="initial bias of the encoder's log-variances (MetaConfig.logvar_init)")
    o.add_argument("--per-step-embedding", action="store_true", help="the learned s is per step (MetaConfig option)")
    o.add_argument("--save", default=None, help="save the trained metacontroller's state_dict here")
    o.add_argument("--code", choices=("gaussian", "categorical"), default="gaussian",
                   help="categorical: z~ is one of n_z one-hot codes (CategoricalCode; not the paper's)")
    o.add_argument("--set", type=meta_field, action="append", default=[], metavar="FIELD=VALUE",
                   help="any other MetaConfig field, e.g. --set gumbel_switch=true --set kl_warmup=500")
    cv = sub.add_parser("curve")
    cv.add_argument("--steps", type=int, default=0, help="training steps (default: the preset's)")
    cv.add_argument("--every", type=int, default=500, help="evaluate every this many steps")
    cv.add_argument("--episodes", type=int, default=500, help="held-out episodes per evaluation")
    cv.add_argument("--set", type=meta_field, action="append", default=[], metavar="FIELD=VALUE",
                    help="change a field of the preset's MetaConfig, e.g. --set lr_decay_from=2500")
    d = sub.add_parser("decoder")
    d.add_argument("--steps", type=int, default=1500)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--code", choices=("subgoal", "target-cell"), default="subgoal",
                   help="the clean code: the subgoal's name, or the place the expert heads to")
    d.add_argument("--layer", type=int, default=None,
                   help="edit the stream before this block (default: L/2, where the metacontroller writes)")
    r, c, rp = sub.add_parser("rl"), sub.add_parser("codes"), sub.add_parser("replay")
    for p in (r, c, rp):                              # all three use a saved metacontroller (`oracle --save`, or
                                                      # the pipeline's)
        p.add_argument("oracle_json", help="the JSON an `oracle --gate learned --save W.pt` run wrote, or "
                                           "`pipeline` for the metacontroller of `python etarl.py`")
        p.add_argument("--weights", default=None, help="its saved weights (default: the --save path it names)")
    r.add_argument("--task", default=etarl.RLConfig.task)
    r.add_argument("--episodes", type=int, default=etarl.RLConfig.episodes, help="episodes per RL run")
    r.add_argument("--lrs", type=float, nargs="+", default=list(etarl.RLConfig.lrs), help="the lr scan (seed 0)")
    r.add_argument("--seeds", type=int, default=etarl.RLConfig.seeds)
    r.add_argument("--method", choices=("internal", "raw_action"), default="internal",
                   help="raw_action: baseline 1, the same RL on the base model's own actions "
                        "(the metacontroller unused)")
    rp.add_argument("--tasks", nargs="+", default=["0-1-4-5-0-1", "0-1-2-3", etarl.RLConfig.task])
    rp.add_argument("--episodes", type=int, default=500, help="episodes per task")
    rp.add_argument("--code-scale", type=float, default=1.0, help="multiply every replayed code by this")
    rp.add_argument("--edit-scale", type=float, default=1.0, help="multiply the decoded edit U_t e_t by this")
    rp.add_argument("--fit-steps", type=int, default=0,
                    help="also replay codes fitted to the expert's actions by this many Adam steps (fit_codes)")
    c.add_argument("--injection", action="store_true", help="also run code injection (App. B.3.2; a few more minutes)")
    cv.add_argument("--seed", type=int, default=0, help="the metacontroller's seed (the base model is seed 0's)")
    cv.add_argument("--env", choices=etarl.WORLDS, default="grid",
                    help="ant: the ant pipeline's base model and data (runs/ant-cpu-s0); its base model fails the gate")
    cv.add_argument("--save", default=None, help="save the trained metacontroller (etarl.save_meta) to this file")
    cv.add_argument("--aligned", action="store_true",
                    help="apply etarl.ALIGNED, the grid cpu preset's remedies, before --set (the ant preset has none)")
    cv.add_argument("--resume", action="store_true",
                    help="train on from the pipeline's trained metacontroller (meta.pt of runs/grid-cpu-s0, or of "
                         "runs/ant-cpu-s0 with --env ant)")
    for p in (o, d):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--base", default=None, help="a base model file instead of the cpu run's (`controllers.py "
                                                    "scale --save`; rl, codes and replay read it from the oracle JSON)")
    for p in (o, d, r, c, rp, cv):
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", default=None, help="JSON file (default: experiments/<command>-<time>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = {"oracle": oracle, "decoder": decoder, "rl": internal_rl, "codes": codes, "replay": replay,
               "curve": pipeline_curve}[args.command]
    result = {"args": vars(args), **command(args)}
    path = args.out or f"experiments/metacontroller-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    Path(path).write_text(json.dumps(result, indent=1))
