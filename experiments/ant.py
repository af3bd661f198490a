"""Why the ant's base model does not learn where to go: the experiments behind the lab notes
(experiments/README.md, section 6).

  python experiments/ant.py pretrain --encoder ego|linear|grid --steps 2000 [--oracle [colour|direction|target]]
                                    [--train-episodes N]
      the ant-cpu base model pretrained on the ant run's data (runs/ant-cpu-s0, made by `python etarl.py --env ant
      --force` or made here) with another observation encoder ("ego": the torso-frame view, deviation 22; "linear":
      the preset's; "grid": "ego" plus the grid world's agent-centred lookups of the cells the observation implies,
      AntGridEncoder, not the paper's), the preset's schedule cut to --steps (the cosine decays over the cut
      length), seed 0. With --oracle the true target colour (one-hot) is added to the model's input, through an
      embedding of its own, and is never a target of the observation head: how much better would the model predict
      the expert's torques if it knew where the expert was going? With --oracle direction it is instead the
      direction the expert's gait walks at that step, a unit vector in the torso's frame (replayed from the
      episodes' seeds, cached in experiments/ant_directions_<N>_<seed>.npy): can the model learn to walk where it is
      told, with no planning left to do? With --oracle target it is the unit vector from the torso straight to the
      next colour's cell, in the torso's frame (cached likewise): is heading straight for the colour, without the
      planner's way around walls and other colours, enough? The quality gate (held-out action R^2, colour probe at
      L/2) is printed every 1,000 steps. Writes experiments/ant_<encoder>[_oracle|_direction|_target]_<steps>
      [_n<N>].json (history, probes per layer) and the model (.pt). About 8-14 minutes per 1,000 steps on one thread
      beside other jobs on 2 cores. With --train-episodes N it trains on N noisy expert episodes instead of the
      run's 800 (the same seeds 0..N-1, so the run's 800 among them; generated on 2 worker processes, about 0.07 s
      each, and cached in experiments/ant_train_<N>.npz): does the colour probe leave chance when the same number of
      draws comes from more distinct episodes?

  python experiments/ant.py steer --steps 2000 [--encoder ego|grid] [--greedy] [--train-episodes N]
      the colour-oracle model of `pretrain --encoder ego|grid --oracle --steps 2000` in 128 episodes of random
      pretraining tasks, told the true next colour, then a wrong one (the true one shifted by 1-3 per episode):
      which colour does it enter first? Writes experiments/ant_steer[_grid]_2000[_n<N>][_greedy].json. About a
      minute.

  python experiments/ant.py walk --steps 2000 [--oracle direction|target] [--greedy] [--train-episodes N]
      the vector-oracle model of `pretrain --oracle direction|target --steps 2000` in 128 episodes of random
      pretraining tasks, told the true vector at every step, then that vector turned by 90-270 degrees: its speed
      along and across the told direction, task progress and success; and the plain ego model's speed along the
      true vector, which it is not told. Writes experiments/ant_walk_<oracle>_2000[_n<N>][_greedy].json. Under a
      minute.

  python experiments/ant.py cardinal [--episodes 100]
      the expert with its gait steered the paper's way, by a cardinal command from the centre of the current cell
      to the centre of the neighbour its planner picks, instead of our aim from where the torso is with a push
      away from forbidden cells (deviation 15): its success, noise-free, on random pretraining tasks and on
      0-1-2-3. About 20 s per 100 episodes.

  python experiments/ant.py turns --steps 2000 [--train-episodes N]
      held-out action NLL of the two saved models (`pretrain --encoder ego` with and without --oracle) on the steps
      0-4, 5-19 and 20 or more steps after the target colour changed. Under a minute.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import etarl   # noqa: E402

N_COLOURS = 4
ORACLE_WIDTH = {"colour": N_COLOURS, "direction": 2, "target": 2}   # what an oracle appends to each observation


def world_vector(env: etarl.envs.AntPinpad, oracle: str) -> np.ndarray:
    """What a vector oracle tells, as a unit vector in the world frame: the expert's direction
    (envs.ant_expert_direction), or the direction from the torso to the centre of the next colour's cell (straight
    there, without the planner's way around walls and other colours)."""
    if oracle == "direction":
        return etarl.envs.ant_expert_direction(env)
    offset = etarl.envs.ant_cell_centre(env.colour_cells[etarl.envs.ant_expert_target(env)], env.G) - env.data.qpos[:2]
    return offset / (np.linalg.norm(offset) + 1e-9)


def replay_oracle(data: etarl.AntEpisodes, seed: int, oracle: str) -> np.ndarray:
    """(N, Tmax, 2) the vector oracle's input at each step of each episode, in the torso's frame (envs.torso_frame
    of world_vector; zeros after the end). Episode i is replayed from AntPinpad.reset(seed=seed + i) with its
    stored torques, which reproduces it exactly (checked)."""
    out = np.zeros(data.actions.shape[:2] + (2,), np.float32)
    for i in range(len(data)):
        env = etarl.envs.AntPinpad()
        env.reset(seed=seed + i)
        for t in range(data.lengths[i]):
            out[i, t] = etarl.envs.torso_frame(env.data.qpos, world_vector(env, oracle))
            obs = env.step(data.actions[i, t])[0]
        if not np.array_equal(obs, data.obs[i, data.lengths[i]]):
            raise RuntimeError(f"episode {i} (seed {seed + i}) does not replay: made from other seeds?")
    return out


def with_oracle(data: etarl.AntEpisodes, oracle: str, seed: int) -> etarl.AntEpisodes:
    """The same episodes with the oracle's input appended to every observation (zeros after the end): the
    target colour's one-hot, or a vector in the torso frame (`world_vector`, replayed from seeds seed..)."""
    if oracle == "colour":
        target = np.concatenate([data.subgoal, np.full((len(data), 1), -1)], 1)        # (N, Tmax + 1)
        extra = (target[..., None] == np.arange(N_COLOURS)).astype(np.float32)
    else:
        path = Path(__file__).with_name(f"ant_{oracle}s_{len(data)}_{seed}.npy")
        if not path.exists():
            np.save(path, replay_oracle(data, seed, oracle))
        extra = np.concatenate([np.load(path), np.zeros((len(data), 1, 2), np.float32)], 1)
    return etarl.AntEpisodes(obs=np.concatenate([data.obs, extra], -1), actions=data.actions,
                             lengths=data.lengths, subgoal=data.subgoal, success=data.success, task_id=data.task_id)


class OracleEncoder(nn.Module):
    """The model's own encoder on the observation, plus a learned linear embedding of the appended oracle input."""

    def __init__(self, inner: nn.Module, d_model: int, width: int):
        super().__init__()
        self.inner, self.oracle, self.width = inner, nn.Linear(width, d_model), width

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.inner(obs[..., :-self.width]) + self.oracle(obs[..., -self.width:])


class OracleModel(etarl.BaseModel):
    """Eq. 5 as BaseModel.loss, except that the observation head predicts the real observation only."""

    def loss(self, batch: dict, control=None, obs_loss: bool = True, shortest: bool = False) -> dict:
        if shortest:
            raise ValueError("the shortest-path action loss is the grid's")
        out = super().loss(batch, control, obs_loss=False)
        if obs_loss:
            real, m = batch["obs"][:, 1:, :-self.encoder.width], batch["mask"].float()
            obs_nll = ((0.5 * (self.obs_head(out["out"]["h"]) - real) ** 2).sum(-1) * m).sum() / m.sum()
            out.update(obs_nll=obs_nll, loss=out["action_nll"] + self.cfg.obs_weight * obs_nll)
        return out


class AntGridEncoder(nn.Module):
    """The torso-frame view (etarl.AntEgoEncoder) plus the grid world's agent-centred lookups (as etarl.EgoEncoder)
    on the cells the observation implies: one learned vector per (object, offset of its cell from the torso's
    cell) and one per torso cell; and a linear embedding of the cosine and sine of the torso's yaw, which turn a
    direction on the grid into the torso's frame. Not the paper's; a diagnostic: can the ant's model plan when
    its input names the cells, as the grid model's does?"""

    def __init__(self, ego: etarl.AntEgoEncoder, d_model: int, grid_size: int = 4):
        super().__init__()
        G, n = grid_size, ego.n_objects
        self.ego, self.G, self.S = ego, G, 2 * G - 1
        self.objects = nn.Embedding(n * self.S ** 2, d_model)
        self.agent_cell = nn.Embedding(G * G, d_model)
        self.yaw = nn.Linear(2, d_model)
        for table in (self.objects, self.agent_cell):      # small, so as not to drown the torso-frame view at first
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        G, S, n, metres = self.G, self.S, self.ego.n_objects, etarl.envs.ANT_CELL
        first = etarl.AntEgoEncoder.OBJECTS                            # envs.AntPinpad's layout: torso x, y just before
        torso = obs[..., first - 2: first] * G * metres / 2
        objects = torso[..., None, :] + obs[..., first: first + 2 * n].unflatten(-1, (n, 2)) * G * metres
        cell = lambda xy: ((G / 2 - xy[..., 1] / metres).floor().clamp(0, G - 1).long(),   # (row, col), as
                           (xy[..., 0] / metres + G / 2).floor().clamp(0, G - 1).long())   # envs.ant_cell
        (row, col), (orow, ocol) = cell(torso), cell(objects)
        offset = (orow - row[..., None] + G - 1) * S + (ocol - col[..., None] + G - 1)
        yaw = etarl.AntEgoEncoder.yaw(obs)
        return (self.ego(obs) + self.objects(offset + S * S * torch.arange(n, device=obs.device)).sum(-2)
                + self.agent_cell(row * G + col) + self.yaw(torch.stack([yaw.cos(), yaw.sin()], -1)))


def new_model(cfg: etarl.ModelConfig, oracle: str | None, encoder: str = "ego") -> etarl.BaseModel:
    """A fresh ant base model of `cfg` (with encoder "grid": "ego" plus AntGridEncoder's lookups), with the
    oracle's extra input ("colour", "direction" or "target") if asked."""
    cfg = dataclasses.replace(cfg, encoder="ego" if encoder == "grid" else encoder)
    if oracle:
        model = OracleModel(cfg, obs_dim=etarl.envs.ant_obs_dim(), n_actions=8, env="ant")
    else:
        model = etarl.build_model(cfg, "ant")
    if encoder == "grid":
        model.encoder = AntGridEncoder(model.encoder, cfg.d_model)
    if oracle:
        model.encoder = OracleEncoder(model.encoder, cfg.d_model, ORACLE_WIDTH[oracle])
    return model


def result_name(kind: str, steps: int, episodes: int, oracle: str | None = None) -> str:
    """The file stem of a saved result: ant_<kind>[_oracle|_direction|_target]_<steps>[_n<episodes>]."""
    tag = {None: "", "colour": "_oracle"}.get(oracle, f"_{oracle}")
    return f"ant_{kind}{tag}_{steps}{f'_n{episodes}' if episodes else ''}"


def saved_model(steps: int, oracle: str | None, episodes: int = 0, encoder: str = "ego") -> etarl.BaseModel:
    """The model saved by `pretrain --encoder <encoder> [--oracle KIND] --steps <steps> [--train-episodes N]`,
    frozen."""
    model = new_model(etarl.get_preset("cpu", "ant").model, oracle, encoder)
    name = result_name(encoder, steps, episodes, oracle) + ".pt"
    model.load_state_dict(torch.load(Path(__file__).with_name(name)))
    return etarl.freeze(model).eval()


def data_seeds(run: etarl.Run) -> tuple[int, int]:
    """The first seeds of the run's training and held-out episodes (etarl.Run.data)."""
    return run.seed * 10**7, run.seed * 10**7 + 5 * 10**6


def more_episodes(run: etarl.Run, n: int) -> etarl.AntEpisodes:
    """n noisy training episodes from the run's seeds 0..n-1 (a superset of the run's own), cached."""
    path = Path(__file__).with_name(f"ant_train_{n}.npz")
    if not path.exists():
        c = run.cfg.data
        etarl.generate_ant_episodes(n, data_seeds(run)[0], noise=c.noise, progress=True, workers=2).save(path)
    return etarl.AntEpisodes.load(path)


def pretrain(args) -> None:
    run = etarl.Run("cpu", env="ant")
    train, test = run.data()
    if args.train_episodes:
        train = more_episodes(run, args.train_episodes)
    if args.oracle:
        train, test = (with_oracle(d, args.oracle, s) for d, s in zip((train, test), data_seeds(run)))
    cfg = run.cfg
    cfg.pretrain.steps = args.steps
    torch.manual_seed(0)
    model = new_model(cfg.model, args.oracle, args.encoder)
    t0 = time.time()
    history = etarl.pretrain(model, train, test, cfg.pretrain, 0, cfg.probe)
    probes = etarl.probe_layers(etarl.freeze(model), test, cfg.probe).tolist()
    name = result_name(args.encoder, args.steps, args.train_episodes, args.oracle)
    result = {"args": vars(args), "seconds": time.time() - t0, "probes": probes, "history": history}
    Path(__file__).with_name(f"{name}.json").write_text(json.dumps(result, indent=1))
    torch.save(model.state_dict(), Path(__file__).with_name(f"{name}.pt"))
    print(name, "probes per layer", np.round(probes, 3).tolist(), f"{result['seconds']:.0f} s")


def play(model: etarl.BaseModel, args, told_input):
    """Roll out `model` in args.episodes episodes of random pretraining tasks (AntPinpadVec.reset(seed=args.seed)),
    with sampled torques, or their means with args.greedy. Before each step, told_input(env) gives what is appended
    to the observations (None: nothing). Yields (env, info, live, moved) after each step: live marks the episodes
    that were still running, moved is their torsos' displacement (live episodes only)."""
    env = etarl.envs.AntPinpadVec(args.episodes)
    obs, _ = env.reset(seed=args.seed)
    gen, cache = torch.Generator().manual_seed(args.seed), model.new_cache()
    while not env.done.all():
        live, extra, xy = ~env.done, told_input(env), env.xy.copy()
        x = obs if extra is None else np.concatenate([obs, extra], -1)
        params = model.step(torch.as_tensor(x, dtype=torch.float32), cache)["logits"]
        action = model.action_head.mode(params) if args.greedy else model.action_head.sample(params, gen)
        obs, _, _, _, info = env.step(action.numpy())
        yield env, info, live, (env.xy - xy)[live]


@torch.no_grad()
def steer(args) -> None:
    """Does the oracle model walk to the colour it is told? Episodes on random pretraining tasks, told the true
    next colour, or a wrong one: the true one shifted by 1-3 (drawn per episode). Reports which colour each
    episode entered first (the told one, the task's true first colour, or another), and the progress made."""
    model = saved_model(args.steps, "colour", args.train_episodes, args.encoder)
    rows = {}
    for told in ("true", "shifted"):
        shift = np.random.default_rng(args.seed).integers(1, N_COLOURS, args.episodes) if told == "shifted" else 0
        first, first_told, target = np.full(args.episodes, -1), np.full(args.episodes, -1), None

        def onehot(env):
            nonlocal target
            target = (env.target + shift) % N_COLOURS
            return (target[:, None] == np.arange(N_COLOURS)).astype(np.float32)

        for env, info, _, _ in play(model, args, onehot):
            entered = (info["visited"] >= 0) & (first < 0)
            first[entered], first_told[entered] = info["visited"][entered], target[entered]
        true_first = env.tasks[:, 0]
        rows[told] = {"entered_told_colour_first": float(np.mean((first >= 0) & (first == first_told))),
                      "entered_true_first_colour_first": float(np.mean((first >= 0) & (first == true_first))),
                      "entered_no_colour": float(np.mean(first < 0)),
                      "progress_counts": np.bincount(env.progress, minlength=4).tolist(),
                      "mean_length": float(env.t.mean())}
        print(told, rows[told])
    kind = "steer" if args.encoder == "ego" else f"steer_{args.encoder}"
    name = result_name(kind, args.steps, args.train_episodes) + ("_greedy" if args.greedy else "") + ".json"
    Path(__file__).with_name(name).write_text(json.dumps(rows, indent=1))


@torch.no_grad()
def walk(args) -> None:
    """Does a vector-oracle model walk where it is told? Episodes on random pretraining tasks, told the true
    `world_vector` at every step (turned into the torso frame), or that vector turned by a random angle of 90-270
    degrees (drawn per episode). Reports the mean speed along the told world direction and across it (m per env
    step; the expert's gait: about 0.05 along), the task progress and success; and the same for the plain ego
    model (`pretrain --encoder ego`), which is told nothing, measured against the true vector."""
    rows = {}
    for name, oracle, turned in (("plain", None, False), ("told", args.oracle, False), ("turned", args.oracle, True)):
        model = saved_model(args.steps, oracle, args.train_episodes)
        turn = np.random.default_rng(args.seed).uniform(np.pi / 2, 3 * np.pi / 2, args.episodes) * turned
        along, across, steps, told = 0.0, 0.0, 0, None

        def direction(env):
            nonlocal told
            told = np.zeros((args.episodes, 2))                       # the told direction, a unit vector in world axes
            for i in np.flatnonzero(~env.done):
                (x, y), c, s = world_vector(env.envs[i], args.oracle), np.cos(turn[i]), np.sin(turn[i])
                told[i] = c * x - s * y, s * x + c * y
            if oracle:
                return np.array([etarl.envs.torso_frame(e.data.qpos, d) for e, d in zip(env.envs, told)], np.float32)

        for env, _, live, moved in play(model, args, direction):
            (dx, dy), (tx, ty) = moved.T, told[live].T
            along, across = along + (dx * tx + dy * ty).sum(), across + np.abs(dx * ty - dy * tx).sum()
            steps += live.sum()
        rows[name] = {"speed_along": float(along / steps), "speed_across": float(across / steps),
                      "mean_length": float(env.t.mean()),
                      "success": float(np.mean(env.progress == env.task_len)),
                      "progress_counts": np.bincount(env.progress, minlength=4).tolist()}
        print(name, {k: np.round(v, 4).tolist() for k, v in rows[name].items()})
    name = result_name("walk", args.steps, args.train_episodes, args.oracle) + ("_greedy" if args.greedy else "")
    Path(__file__).with_name(name + ".json").write_text(json.dumps(rows, indent=1))


def cardinal_direction(env: etarl.envs.AntPinpad) -> np.ndarray:
    """The paper's kind of command: the unit cardinal direction from the current cell's centre to the centre of
    the neighbour the expert's planner picks (envs.ant_expert_next_cell), with no aim from where the torso is and
    no push away from forbidden cells."""
    if env.cell < 0:                                            # off the grid (the episode is over anyway)
        return etarl.envs.ant_expert_direction(env)
    centre = lambda cell: etarl.envs.ant_cell_centre(cell, env.G)
    step = centre(etarl.envs.ant_expert_next_cell(env)) - centre(env.cell)
    return step / (np.linalg.norm(step) + 1e-9)                 # zero in a dead end: the gait marks time


def cardinal(args) -> None:
    """The ant expert's success with its gait steered by cardinal_direction instead of its own aim, noise-free,
    on args.episodes random pretraining tasks (seeds 123..) and as many of 0-1-2-3 (seeds 10^8..)."""
    for task, seed in ((None, 123), ("0-1-2-3", 10**8)):
        success = [etarl.envs.ant_expert_episode(seed + i, task, direction=cardinal_direction)[3]
                   for i in range(args.episodes)]
        print(f"task {task or 'random pretraining'}: cardinal-command expert success {np.mean(success):.3f}"
              f" over {args.episodes} episodes")


@torch.no_grad()
def turns(args) -> None:
    """Held-out action NLL of the plain ego model and the oracle model (both saved by `pretrain`), by the number of
    steps since the target colour changed (t = 0 counts as a change)."""
    run = etarl.Run("cpu", env="ant", progress=False)
    test = run.data()[1]
    nll = {}
    for name, oracle in (("plain", None), ("oracle", "colour")):
        model = saved_model(args.steps, oracle, args.train_episodes)
        data = with_oracle(test, oracle, data_seeds(run)[1]) if oracle else test
        b = data.batch(np.arange(len(data)), "cpu")
        nll[name] = -model.action_head.log_prob(model(b["obs"][:, :-1])["logits"], b["actions"]).numpy()
    mask, goal = b["mask"].numpy(), test.subgoal[:, : b["mask"].shape[1]]
    since = np.zeros_like(goal)
    for t in range(1, goal.shape[1]):
        since[:, t] = np.where(goal[:, t] != goal[:, t - 1], 0, since[:, t - 1] + 1)
    for lo, hi in ((0, 5), (5, 20), (20, None)):
        sel = mask & (since >= lo) & (since < (hi or goal.shape[1]))
        print(f"{lo}-{hi or 'end'} steps after a target change: {sel.sum()} steps, held-out action NLL plain "
              f"{nll['plain'][sel].mean():.3f}, oracle {nll['oracle'][sel].mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--steps", type=int, default=2000, help="pretraining steps (of the saved models to use)")
    common.add_argument("--train-episodes", type=int, default=0,
                        help="training episodes (of the saved models to use; default 0: the run's 800)")
    common.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("pretrain", parents=[common], help="pretrain the ant-cpu model with another encoder or an oracle")
    p.add_argument("--encoder", choices=("ego", "linear", "grid"), default="ego")
    p.add_argument("--oracle", nargs="?", const="colour", choices=tuple(ORACLE_WIDTH),
                   help="add the true target colour (the default), or a torso-frame direction, to the input")
    p = sub.add_parser("steer", parents=[common], help="roll out the colour-oracle model told the true or a wrong one")
    p.add_argument("--encoder", choices=("ego", "grid"), default="ego", help="of the saved model")
    p.add_argument("--episodes", type=int, default=128)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--greedy", action="store_true", help="mean torques instead of sampled ones")
    p = sub.add_parser("walk", parents=[common], help="roll out a vector-oracle model told the true or a turned vector")
    p.add_argument("--oracle", choices=("direction", "target"), default="direction")
    p.add_argument("--episodes", type=int, default=128)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--greedy", action="store_true", help="mean torques instead of sampled ones")
    p = sub.add_parser("cardinal", help="the expert's success when its gait follows cardinal commands, as the paper's")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    sub.add_parser("turns", parents=[common],
                   help="held-out NLL of the plain and the oracle model by steps since a target change")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"pretrain": pretrain, "steer": steer, "walk": walk, "cardinal": cardinal, "turns": turns}[args.command](args)


if __name__ == "__main__":
    main()
