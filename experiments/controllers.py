"""Why the supervised controllers fail on the gridworld: the experiments behind the lab notes
(experiments/README.md, section 2).

Six commands, each printing one line per measurement and writing a JSON file:

  python experiments/controllers.py variants --layer 2 --rank 0 --lr 1e-3 --steps 600 [--loss-on first]
      on the cached cpu run (runs/grid-cpu-s0, made by `python etarl.py`): one set of supervised
      controllers with another layer, rank, learning rate or loss (all steps, only t = 0, only steps
      heading for the first colour of a pair, or `set`: -ln of the probability on the shortest-path
      moves, which also scores the steps after a random action). With --eps or --orders they train on
      200k fresh expert episodes instead: with random actions at rate eps (then use --loss-on set), or
      in every order of three pairs (--orders all: 36 orders, the 16 pretraining tasks among them, so
      the transitions of the post-training task are seen). With --dagger K, K rounds follow (DAgger): the
      controlled model plays 5,000 episodes (sampled, on the same tasks; 36 x 138 in every order), the states it reached are labelled
      with the expert's shortest-path moves, and the controllers train 300 more steps (loss `set`) on all its
      episodes so far mixed with as many training episodes. 4-15 minutes on 2 cores.

  python experiments/controllers.py scale --d-model 256 --layers 6 --batch 512 --lr 1e-3 --budget 180
      on a GPU: a fresh base model of another shape trained for a time budget on 1M expert episodes
      (bf16 autocast, warm-up and cosine over the budget), its quality gate and probes, then the
      cpu preset's controllers at every layer (on 200k noise-free episodes when --eps > 0). About 6 minutes on
      an H200. The cosine (etarl.lr_at) has its length estimated from the first 50 steps (on a GPU that includes
      its warm-up), and stays at its floor if the run outlasts the estimate. It also runs on a CPU (27-33 minutes
      on 2 cores at --budget 1200 with 4-6 blocks of width 128); --encoder linear trains the plain embedding instead
      of the agent-centred one (linear-under: plus the colour under the agent, UnderAgent), --save keeps the model
      (for `history --base`, `variants --base` and `metacontroller.py --base`). --model factored trains the
      diagnostic Factored model instead (the hierarchy built in: below L/2 only the colour under the agent, from
      L/2 on no history; not the paper's model).

  python experiments/controllers.py variants --edit bias    (or --edit mlp, --edit none)
      the same with another form of edit than Eq. 1's U_k e: a constant vector b_k per subgoal added to the
      stream (a steering vector), or a ReLU MLP of the normed stream per subgoal (hidden 256, zero output at
      the start), to ask whether the linear form is what limits the controllers; `none` scores the uncontrolled
      model the same way. About 5, 10 and 3 minutes. With --inside, Eq. 1's controllers act inside block --layer,
      after the attention that reads the history and before the MLP, instead of before the block.

  python experiments/controllers.py history [--base FILE]
      where the base model reads its target from the history and where it chooses its move, at each layer l:
      the history cut (each step's stream after l blocks sent through the remaining blocks as a sequence of that
      one step, so they see no earlier step) and the logit lens (the final norm and action head applied to the
      stream after l blocks, skipping the rest), both scored as shortest-path mass at t = 0 and on
      first- and second-colour steps; also the model's shortest-path mass by the number of steps since the
      current target began. About a minute.

  python experiments/controllers.py transitions [--base FILE] [--layer 2] [--episodes 500] [--orders all]
      one pair after a transition that pretraining never shows and after two that it shows: the preset's
      controllers on 0-1-2-3, 6-7-2-3 and 4-5-2-3 (500 episodes each), the colour the episodes that fail at
      colour 2 stepped onto instead, and how often those that reach colour 2 pass it when its way needs a detour
      and when it does not. With --orders all the controllers train on every order of three pairs. A few minutes.

  python experiments/controllers.py ways [--since 0] [--base FILE]
      whether the residual stream holds the way to every colour or only to those the history allows: at each
      layer, linear probes of the shortest-path moves towards a colour c at the first steps of pairs that follow
      another pair, one per colour and relation of c to the step (the target; the other pair the history allows;
      the pair pretraining never shows there; the pair just done). 15 seconds.

  python experiments/controllers.py failures [--eps 0.1 --action-loss shortest]
      where episodes fail: the rate of failing at each colour of the task among the episodes that reach it, with
      and without the preset's controllers, sampled and greedy, on the pretraining tasks, 0-1-2-3 and the
      post-training task (2,000 episodes each). The base model is the cached cpu run's, or, with --eps or
      --action-loss, a fresh one pretrained as the cpu preset on expert data with random moves at rate eps
      (cached in experiments/; about 30 minutes on 2 cores) and scored by `action_loss`.

The variants report, besides success in the real environment (sampled actions, as in etarl.controller_sweep, and
greedy ones),
the controlled model's action probability on shortest-path moves on held-out expert episodes
(teacher forcing): at t = 0, on steps heading for the first colour of a pair (also by the number of steps
since that pair began), and on the rest.
"""
import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs    # noqa: E402
import etarl   # noqa: E402

TASKS = ("0-1-4-5-0-1", "0-1-2-3", "0-1-2-3-4-5-6-7-0-1-2-3")   # a pretraining task, one and five unseen transitions


def steps_into_target(target: np.ndarray) -> np.ndarray:
    """(N, T) number of steps since each step's target (the expert's `target` labels) began; 0 where it changes."""
    since = np.zeros(target.shape, int)
    for t in range(1, target.shape[1]):
        since[:, t] = np.where(target[:, t] == target[:, t - 1], since[:, t - 1] + 1, 0)
    return since


def shortest_path_mass(model, data: etarl.Episodes, ctrl=None, n: int = 1000) -> dict:
    """Mean probability on shortest-path moves (teacher forcing) at t = 0, on first-colour steps, and the rest."""
    device = next(model.parameters()).device
    b = data.batch(np.arange(n), device)
    with torch.no_grad():
        p = model(b["obs"][:, :-1], None if ctrl is None else ctrl(b["subgoal"]))["logits"].softmax(-1)
    sp, m, target = (p * b["optimal"]).sum(-1), b["mask"], b["target"]
    first = m & (target % 2 == 0)
    since = torch.as_tensor(steps_into_target(data.target[:n, : target.shape[1]]), device=device)
    return {"sp_t0": sp[:, 0].mean().item(), "sp_first": sp[first].mean().item(), "sp_second": sp[m & ~first].mean().item(),
            "sp_first_by_steps_since_start": [sp[first & (since == k)].mean().item() for k in range(6)],
            "sp_second_by_steps_since_start": [sp[m & ~first & (since == k)].mean().item() for k in range(6)]}


class OtherEdits(torch.nn.Module):
    """One edit per subgoal in another form than Eq. 1's U_k e, for `variants --edit`: a constant vector b_k added
    to the stream ("bias": a steering vector), or b_k plus a ReLU MLP of the LayerNormed stream ("mlp", hidden 256,
    output weights starting at zero). Called with subgoal (B, T) or (B,), it gives the edit's callable for
    BaseModel.forward (anything with .layer and e -> edit)."""

    def __init__(self, n_subgoals: int, d_model: int, layer: int, form: str, hidden: int = 256):
        super().__init__()
        self.layer, self.form = layer, form
        self.b = torch.nn.Parameter(torch.zeros(n_subgoals, d_model))
        if form == "mlp":
            self.W1 = torch.nn.Parameter(torch.randn(n_subgoals, d_model, hidden) / d_model ** 0.5)
            self.b1 = torch.nn.Parameter(torch.zeros(n_subgoals, hidden))
            self.W2 = torch.nn.Parameter(torch.zeros(n_subgoals, hidden, d_model))

    def forward(self, subgoal: torch.Tensor):
        k = subgoal.clamp(min=0)
        k = k[:, None] if k.dim() == 1 else k                         # one step of a rollout: (B,) -> (B, 1)

        def edit(e):                                                  # e (B, T, D)
            if self.form == "bias":
                return self.b[k]
            one_hot = torch.nn.functional.one_hot(k, len(self.b)).to(e.dtype)          # (B, T, K)
            h = torch.relu(torch.einsum("btd,kdh->btkh", torch.nn.functional.layer_norm(e, e.shape[-1:]), self.W1)
                           + self.b1)
            return torch.einsum("btkh,btk,khd->btd", h, one_hot, self.W2) + self.b[k]
        edit.layer = self.layer
        return edit


class InsideBlock(torch.nn.Module):
    """A base model's block with a one-shot edit between its attention and its MLP: an edit armed by EditInside is
    applied in the next forward pass only, so the model runs uncontrolled unless an edit was just armed."""

    def __init__(self, block):
        super().__init__()
        self.block, self.edit = block, None

    def forward(self, x, pos, cache=None):
        x = x + self.block.mixer(self.block.norm1(x), pos, cache)
        if self.edit is not None:
            x, self.edit = x + self.edit(x), None
        return x + self.block.mlp(self.block.norm2(x))


class EditInside(torch.nn.Module):
    """Eq. 1's controllers applied inside block `layer`, after its attention (which reads the history) and before
    its MLP, for `variants --inside`. It installs InsideBlock in the model; called with subgoals (B, T) or (B,), it
    arms that block's edit and returns no control for BaseModel.forward to apply (None), so every call must be
    followed by exactly one forward pass over the same episodes (as in train_controllers, shortest_path_mass and
    rollout with drop_ended=False, as `evaluate` calls it).
    For a script only: the model is changed in place (its state_dict keys too, so do not save it), the block is
    held outside the module tree (not trained, not copied by deepcopy), and only attention blocks have this form."""

    def __init__(self, model, n_subgoals: int, layer: int, rank: int):
        super().__init__()
        if isinstance(model, Factored) and layer >= len(model.blocks) // 2:
            raise SystemExit("--inside: the factored model's blocks from L/2 on see each step alone; use a lower --layer")
        self.inner = etarl.SubgoalControllers(n_subgoals, model.cfg.d_model, layer, rank)
        if not isinstance(model.blocks[layer], InsideBlock):
            model.blocks[layer] = InsideBlock(model.blocks[layer])
        self.__dict__["block"] = model.blocks[layer]                  # not a submodule: not trained, not saved

    def forward(self, subgoal: torch.Tensor):
        control = self.inner(subgoal)
        self.block.edit = control.step_view() if subgoal.dim() == 1 else control
        return None


def control_fn(ctrl):
    """Switch the edits by the environment's current subgoal, as etarl.subgoal_control_fn does for Eq. 1's."""
    if ctrl is None:
        return None
    if isinstance(ctrl, etarl.SubgoalControllers):
        return etarl.subgoal_control_fn(ctrl)
    return lambda env: ctrl(torch.as_tensor(np.maximum(env.subgoal, 0), device=next(ctrl.parameters()).device))


def evaluate(model, ctrl, data: etarl.Episodes, episodes: int) -> dict:
    """Teacher-forced shortest-path mass and success with the controllers on TASKS (progress histogram too),
    sampled as the pipeline does, and greedy."""
    out = shortest_path_mass(model, data, ctrl)
    keep = {"drop_ended": False} if isinstance(ctrl, EditInside) else {}   # its armed edit spans every episode
    for task in TASKS:
        r = etarl.rollout(model, envs.parse_task(task), episodes, 1, control_fn(ctrl), **keep)
        out[task] = float(r["success"].mean())
        out[task + " progress"] = np.bincount(r["progress"], minlength=len(envs.parse_task(task)) + 1).tolist()
        out[task + " greedy"] = float(etarl.rollout(model, envs.parse_task(task), episodes, 1,
                                                    control_fn(ctrl), greedy=True, **keep)["success"].mean())
    return out


ORDERS = [[c for pair in o for c in (2 * pair, 2 * pair + 1)]         # every order of three pairs without a
          for o in itertools.product(range(4), repeat=3) if o[0] != o[1] and o[1] != o[2]]   # repeat: 36 tasks


def every_order(n: int, seed: int, eps: float) -> etarl.Episodes:
    """Expert episodes in every order of three pairs (ORDERS), n // 36 each."""
    return concatenate([etarl.generate_episodes(n // len(ORDERS), seed + 10**6 * i, eps=eps, task=task)
                        for i, task in enumerate(ORDERS)])


def own_episodes(model, ctrl, n: int, seed: int, orders: str) -> etarl.Episodes:
    """The controlled model's own episodes (sampled actions, oracle switching) on the pretraining tasks or in
    every order of three pairs, labelled with what the expert would have done in the states it reached."""
    tasks = [None] if orders == "pretraining" else ORDERS
    parts = []
    for i, task in enumerate(tasks):
        k, s = n // len(tasks), seed + 10**6 * i
        r = etarl.rollout(model, task, k, s, etarl.subgoal_control_fn(ctrl), record=True)
        parts.append(etarl.generate_episodes(k, s, task=task, replay=r["actions"]))
        assert ((parts[-1].lengths == r["length"]).all()
                and (parts[-1].agent == r["agent"][:, : parts[-1].agent.shape[1]]).all()), "the replay left the rollout"
    return concatenate(parts)


def train_masked(model, data, layer, rank, lr, steps, loss_on, seed=0, ctrl=None, edit="linear", inside=False):
    """etarl.train_controllers with the action NLL restricted to some steps (`loss_on`: all, t0, first), or
    with the loss -ln p(shortest-path moves) on every step (`set`); `ctrl` continues training those. `edit`
    "bias" or "mlp" trains OtherEdits instead of Eq. 1's controllers, by etarl.train_controllers with the preset's
    ControlConfig but for lr and steps; "none" returns None (no edit). `inside` trains Eq. 1's controllers inside
    block `layer` (EditInside), the same way."""
    if edit == "none":                                            # the uncontrolled model, scored the same way
        return None
    if edit != "linear" or inside:
        torch.manual_seed(seed)
        K, D, device = int(data.subgoal.max()) + 1, model.cfg.d_model, next(model.parameters()).device
        ctrl = (EditInside(model, K, layer, rank) if inside else OtherEdits(K, D, layer, edit)).to(device)
        etarl.train_controllers(model, data, layer, etarl.ControlConfig(lr=lr, steps=steps), seed, progress=False,
                                ctrl=ctrl)
        return ctrl
    if loss_on == "all" and ctrl is None:
        return etarl.train_controllers(model, data, layer, etarl.ControlConfig(rank=rank, lr=lr, steps=steps), seed,
                                       progress=False)[0]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if ctrl is None:                                              # (a given ctrl gets a fresh AdamW state)
        ctrl = etarl.SubgoalControllers(int(data.subgoal.max()) + 1, model.cfg.d_model, layer, rank).to(device)
    opt = torch.optim.AdamW(ctrl.parameters(), lr=lr, weight_decay=0.0)
    by_length = np.argsort(data.lengths, kind="stable")
    for _ in range(steps):
        b = data.batch(etarl.length_bucketed_batch(by_length, 128, rng), device)
        logits = model(b["obs"][:, :-1], ctrl(b["subgoal"]))["logits"]
        logp = model.action_head.log_prob(logits, b["actions"].clamp(min=0))
        if loss_on == "set":
            m = b["mask"] & b["optimal"].any(-1)
            logp = etarl.shortest_path_log_prob(logits, b["optimal"])
        elif loss_on == "all":
            m = b["mask"]
        elif loss_on == "first":
            m = b["mask"] & (b["target"] % 2 == 0)
        else:                                                    # t0: only the first step of each episode
            m = torch.zeros_like(b["mask"])
            m[:, 0] = True
        loss = -(logp * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return ctrl


def variants(args) -> dict:
    run = etarl.Run("cpu", progress=False)
    model = base_model(run, args.base)
    train, test = run.data()
    if args.orders == "all":
        train = every_order(200_000, 10**8, args.eps)
    elif args.eps > 0:
        train = etarl.generate_episodes(200_000, 10**8, eps=args.eps)
    t0 = time.time()
    if (args.edit != "linear" or args.inside) and (args.loss_on != "all" or args.dagger):
        raise SystemExit("--edit and --inside train with the preset's loss on every step: no --loss-on, no --dagger")
    if args.inside and args.edit != "linear":
        raise SystemExit("--inside applies Eq. 1's controllers (--edit linear) inside a block")
    ctrl = train_masked(model, train, args.layer, args.rank, args.lr, args.steps, args.loss_on, edit=args.edit,
                        inside=args.inside)
    out = {"train_s": time.time() - t0, "base": shortest_path_mass(model, test)}    # with --dagger: rounds' rollouts too
    if isinstance(ctrl, OtherEdits):                              # the vectors' size against the stream's
        with torch.no_grad():
            b = test.batch(np.arange(200), next(model.parameters()).device)
            e = model(b["obs"][:, :-1], return_residuals=True)["residuals"][args.layer][b["mask"]]
        out["b_norm"], out["stream_norm"] = ctrl.b.norm(dim=-1).tolist(), e.norm(dim=-1).mean().item()
    own, rng = None, np.random.default_rng(1)
    for k in range(args.dagger):                   # DAgger: add the controlled model's own episodes, relabelled
        out[f"round {k}"] = evaluate(model, ctrl, test, 300)
        print(k, json.dumps({key: v for key, v in out[f"round {k}"].items() if "progress" not in key}), flush=True)
        new = own_episodes(model, ctrl, args.dagger_episodes, 2 * 10**8 + 10**7 * k, args.orders)
        own = new if own is None else concatenate([own, new])
        mixed = concatenate([own, train.subset(rng.choice(len(train), len(own), replace=False))])
        ctrl = train_masked(model, mixed, args.layer, args.rank, args.lr, args.dagger_steps, "set", seed=k + 1, ctrl=ctrl)
        out["train_s"] = time.time() - t0
    return {**out, **evaluate(model, ctrl, test, 300)}


def each_step_alone(block, e: torch.Tensor) -> torch.Tensor:
    """A block applied to every step of e (B, T, D) as a sequence of that one step: its attention sees no other step."""
    B, T, D = e.shape
    return block(e.reshape(B * T, 1, D), torch.zeros(1, dtype=torch.long, device=e.device)).view(B, T, D)


def where_the_move_is_chosen(model, data: etarl.Episodes, n: int = 1000) -> dict:
    """For each layer l (the stream after l blocks): shortest-path mass when blocks l, l+1, ... (numbered from 0) see
    no earlier step (history cut), and when the final norm and action head read the stream at layer l (logit lens);
    at t = 0, on first- and second-colour steps. The cut also takes those blocks off their training distribution."""
    device = next(model.parameters()).device
    b = data.batch(np.arange(n), device)
    m, target = b["mask"], b["target"]
    first, second = m & (target % 2 == 0), m & (target % 2 == 1)
    out = {}
    with torch.no_grad():
        residuals = model(b["obs"][:, :-1], return_residuals=True)["residuals"]
        mass = lambda e: (model.readout(e)["logits"].softmax(-1) * b["optimal"]).sum(-1)   # on shortest-path moves
        for l in range(len(model.blocks) + 1):
            e = residuals[l]
            for block in model.blocks[l:]:
                e = each_step_alone(block, e)
            cut, lens = mass(e), mass(residuals[l])
            for name, sp in ((f"history cut from block {l}", cut), (f"logit lens at layer {l}", lens)):
                out[name] = {"sp_t0": sp[:, 0].mean().item(), "sp_first": sp[first].mean().item(),
                             "sp_second": sp[second].mean().item()}
                print(name, json.dumps(out[name]), flush=True)
    return out


def history(args) -> dict:
    """Where the cpu base model (or --base) reads its target from the history and chooses its move."""
    run = etarl.Run("cpu", progress=False)
    model, test = base_model(run, args.base), run.data()[1]
    if isinstance(model, Factored):
        raise SystemExit("the factored model's upper blocks see no history by construction: nothing to cut")
    return {"base": shortest_path_mass(model, test, n=2000), **where_the_move_is_chosen(model, test)}


def transitions(args) -> dict:
    """One pair after a transition that pretraining never shows and after two that it shows: the preset's
    controllers at --layer (trained on the cpu run's training episodes, seed 0; with --orders all on episodes in
    every order of three pairs, where 0-1 is followed by 2-3 too) on 0-1-2-3, 6-7-2-3 and 4-5-2-3,
    --episodes sampled episodes each; for the episodes that fail at colour 2, the colour they stepped onto instead;
    and for those that reach colour 2, how often they pass it when the way there needs a detour and when it
    does not (`detour_needed`)."""
    run = etarl.Run("cpu", progress=False)
    model = base_model(run, args.base)
    train = every_order(200_000, 10**8, 0.0) if args.orders == "all" else run.data()[0]
    ctrl, _ = etarl.train_controllers(model, train, args.layer, run.cfg.control, seed=0, progress=False)
    out, n = {}, args.episodes
    for task in ("0-1-2-3", "6-7-2-3", "4-5-2-3"):
        r = etarl.rollout(model, envs.parse_task(task), n, 1, etarl.subgoal_control_fn(ctrl), record=True)
        onto = r["colour_cells"] == r["agent"][np.arange(n), r["length"]][:, None]   # (n, O): where it ended
        failed = (r["progress"] == 2) & ~r["success"]
        detour, reached = detour_needed(r, envs.parse_task(task), 2), r["progress"] >= 2
        out[task] = {"success": float(r["success"].mean()), "failed at colour 2": int(failed.sum()),
                     "of those, stepped onto colour 0-7": onto[failed].sum(0).tolist(),
                     "of those, on no colour (time out)": int((~onto[failed].any(1)).sum()),
                     **{f"reached colour 2, {name}": [int(k.sum()), float((r["progress"][k] >= 3).mean())]
                        for name, k in (("detour needed: n, passed it", reached & detour),
                                        ("no detour: n, passed it", reached & ~detour))}}
        print(task, json.dumps(out[task]), flush=True)
    return out


def detour_needed(r: dict, task: tuple, k: int, G: int = 7) -> np.ndarray:
    """For each recorded episode that reached colour k of the task (having entered colour k-1's cell): whether the
    shortest way from there to colour k, around walls and the other colours, is longer than the Manhattan distance
    between the cells, so that heading straight for the cell is not enough. False where colour k was not reached."""
    if not 1 <= k < len(task):
        raise ValueError(f"colour k = {k} of a task of {len(task)} has no colour before it in the task")
    out, dist = np.zeros(len(r["progress"]), bool), envs.colour_distances(r["colour_cells"], r["wall_cells"], G)
    for i in np.flatnonzero(r["progress"] >= k):
        t = -1
        for colour in task[:k]:                                       # the step at which each colour was entered
            t += 1 + int(np.argmax(r["agent"][i, t + 1:] == r["colour_cells"][i, colour]))
        here, there = int(r["agent"][i, t]), int(r["colour_cells"][i, task[k]])
        out[i] = dist[i, task[k], here] > abs(here // G - there // G) + abs(here % G - there % G)
    return out


RELATIONS = ("target", "other allowed", "ruled out, unseen next", "ruled out, pair just done")


def pair_starts(data: etarl.Episodes, since: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps heading for the first colour of a pair that follows another pair, at most `since` steps after that pair
    began, and the pair completed just before: (N, Tmax) bool and (N, Tmax) pair id (-1 before the first is done)."""
    target, m = data.target, np.arange(data.target.shape[1]) < data.lengths[:, None]
    prev, done = np.full(target.shape, -1), np.full(len(target), -1)
    for t in range(1, target.shape[1]):
        new = target[:, t] != target[:, t - 1]
        prev[:, t] = done = np.where(new & (target[:, t] % 2 == 0), target[:, t - 1] // 2, done)
    return m & (target % 2 == 0) & (prev >= 0) & (steps_into_target(target) <= since), prev


def ways_to_colours(data: etarl.Episodes, ep: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(n, O, 4) bool: at step t[i] of episode ep[i], the moves on a shortest path to each colour c around the walls
    and the other colours: what the expert's `optimal` label marks for the target, for every colour at once."""
    G, O, colours = data.grid_size, data.colour_cells.shape[1], data.colour_cells[ep]
    agent = data.agent[ep, t].astype(int)
    dist = envs.colour_distances(data.colour_cells, data.wall_cells, G)[ep]              # (n, O, G*G)
    nxt = envs._move(agent[:, None], np.arange(4), data.wall_cells[ep][:, None, :], G)    # (n, 4)
    d_here = np.take_along_axis(dist, agent[:, None, None].repeat(O, 1), 2)               # (n, O, 1)
    d_next = np.take_along_axis(dist, nxt[:, None, :].repeat(O, 1), 2)                    # (n, O, 4)
    onto = colours[:, None, None, :] == nxt[:, None, :, None]                              # (n, 1, 4, O'): enters O'
    other = np.arange(O)[:, None, None] != np.arange(O)                                    # (O, 1, O'): O' is not c
    return (d_next == d_here - 1) & (nxt != agent[:, None])[:, None] & ~(onto & other).any(-1)


def ways(args) -> dict:
    """Is the way to every colour in the residual stream, or only the way to some? For each layer and colour c, a
    linear probe (softmax over the 4 moves, loss -ln p(moves on a shortest path to c)) is fitted on the held-out
    episodes' first half and scored on the second as its probability on those moves, at the first --since + 1
    steps of a pair that follows another pair. One probe per colour and relation of c to the step (RELATIONS): c is
    the target; the first colour of the other pair that pretraining allows after the pair just done; of the pair
    it never shows there (the post-training task's transition); of the pair just done (its way retraces the
    agent's last moves). The layout fixes every way, so the probes differ in what the stream has computed of it."""
    run = etarl.Run("cpu", progress=False)
    model, test = base_model(run, args.base), run.data()[1]
    follows = np.zeros((4, 4), bool)                              # [p, q]: pair q follows pair p in pretraining
    for task in envs.GRID_PRETRAIN_TASKS:
        follows[np.array(task[0:-2:2]) // 2, np.array(task[2::2]) // 2] = True
    out = etarl.collect(model, test)
    ep, t = np.nonzero(np.arange(test.target.shape[1]) < test.lengths[:, None])   # valid steps, in collect's order
    n, target, O = len(ep), test.target[ep, t], test.colour_cells.shape[1]
    way = ways_to_colours(test, ep, t)
    assert np.array_equal(way[np.arange(n), target], test.optimal[ep, t]), "the ways disagree with the expert's labels"
    starts, prev = (x[ep, t] for x in pair_starts(test, args.since))
    c = np.arange(O)[None]
    allowed = follows[prev.clip(0)][:, c[0] // 2]                                          # (n, O)
    first_colour = starts[:, None] & (c % 2 == 0) & way.any(-1)
    relation = np.full((n, O), -1)                                # index into RELATIONS; -1: not scored
    relation[first_colour & (c == target[:, None])] = 0
    relation[first_colour & (c != target[:, None]) & allowed] = 1
    relation[first_colour & ~allowed & (c // 2 != prev[:, None])] = 2
    relation[first_colour & (c // 2 == prev[:, None])] = 3
    half = ep >= len(test) // 2
    result = {"steps per relation (second half)": {r: int(((relation == i) & half[:, None]).sum())
                                                   for i, r in enumerate(RELATIONS)},
              "model, on the target's way": float((out["probs"].numpy() * way[np.arange(n), target])
                                                  .sum(-1)[starts & half].mean())}
    for l, x in enumerate(out["residuals"]):
        mass = {}
        for i, r in enumerate(RELATIONS):
            total, scored = 0.0, 0
            for k in range(O):
                fit, score = (relation[:, k] == i) & ~half, (relation[:, k] == i) & half
                if fit.sum() >= 30:
                    total += probe_way_mass(x[fit], way[fit, k], x[score], way[score, k]).sum()
                    scored += score.sum()
            mass[r] = float(total) / scored
        result[f"layer {l}"] = mass
        print(f"layer {l}", json.dumps({k: round(v, 3) for k, v in mass.items()}), flush=True)
    print("model", result["model, on the target's way"])
    return result


def probe_way_mass(x_fit, way_fit, x_score, way_score) -> np.ndarray:
    """A linear softmax probe over the moves fitted by -ln p(way) (LBFGS on standardised features); its
    probability on the way at each scored step."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-5
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_fit.shape[1], 4)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=100, line_search_fn="strong_wolfe")
    way_fit, way_score = torch.as_tensor(way_fit), torch.as_tensor(way_score)

    def closure():
        opt.zero_grad()
        nll = -etarl.shortest_path_log_prob(probe((x_fit - mean) / std), way_fit).mean()
        loss = nll + 1e-4 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (probe((x_score - mean) / std).softmax(-1) * way_score).sum(-1).numpy()


def failure_rates(progress: np.ndarray, success: np.ndarray, length: int) -> list:
    """For each colour k of a task: of the episodes that reached it, the fraction that ended there unsolved."""
    reached = np.array([(progress >= k).sum() for k in range(length)])
    ended = np.array([((progress == k) & ~success).sum() for k in range(length)])
    return [round(e / r, 3) if r else None for e, r in zip(ended, reached)]     # None: no episode got there


def failures(args) -> dict:
    run = etarl.Run("cpu", progress=False)
    clean, test = run.data()
    out = {}
    if args.eps == 0 and args.action_loss == "expert":
        model = run.base_model()[0]
    else:
        path = Path(f"experiments/base-eps{args.eps}-{args.action_loss}.pt")
        if path.exists():
            model = etarl.load_model(path)
        else:
            train = etarl.generate_episodes(run.cfg.data.n_train, 0, eps=args.eps)   # the preset's seeds, with noise
            torch.manual_seed(0)
            model = etarl.build_model(run.cfg.model)
            cfg = dataclasses.replace(run.cfg.pretrain, action_loss=args.action_loss)
            out["pretrain"] = etarl.pretrain(model, train, test, cfg, seed=0, progress=False)
            etarl.save_model(model, path)
    etarl.freeze(model)
    out["gate"] = etarl.quality_gate(model, test)
    print("gate", json.dumps(out["gate"]), flush=True)
    ctrl, _ = etarl.train_controllers(model, clean, 2, run.cfg.control, seed=0, progress=False)
    for name, fn in (("uncontrolled", None), ("controlled", etarl.subgoal_control_fn(ctrl))):
        for greedy in (False, True):
            for task in (None, (0, 1, 2, 3), envs.GRID_POST_TASK):
                r = etarl.rollout(model, task, 2000, 11, fn, greedy=greedy)
                key = f"{name} {'greedy' if greedy else 'sampled'} {'pretraining' if task is None else envs.format_task(task)}"
                out[key] = {"success": float(r["success"].mean()),
                            "fail_rate_at_colour": failure_rates(r["progress"], r["success"], 6 if task is None else len(task))}
                print(key, json.dumps(out[key]), flush=True)
    return out


def _generate(job):
    n, seed, eps = job
    return etarl.generate_episodes(n, seed, eps=eps)


def concatenate(parts: list) -> etarl.Episodes:
    """One Episodes from several, padding the time axis (the agent's last cell repeats; other fields -1 or False)."""
    T = max(p.actions.shape[1] for p in parts)
    fields = {}
    for name in ("agent", "actions", "target", "subgoal", "optimal"):
        width = T + 1 if name == "agent" else T
        padded = []
        for p in parts:
            x = getattr(p, name)
            y = (np.repeat(x[:, -1:], width, 1) if name == "agent"
                 else np.full((len(x), width) + x.shape[2:], False if name == "optimal" else -1, x.dtype))
            y[:, : x.shape[1]] = x
            padded.append(y)
        fields[name] = np.concatenate(padded)
    for name in ("colour_cells", "wall_cells", "lengths", "task_id"):
        fields[name] = np.concatenate([getattr(p, name) for p in parts])
    return etarl.Episodes(**fields, grid_size=parts[0].grid_size)


def colour_under(obs: torch.Tensor, G: int = 7, O: int = 8) -> torch.Tensor:
    """(B, T): the colour the agent stands on in grid observations (B, T, 637), O where it stands on none."""
    cell = obs.unflatten(-1, (-1, G * G)).argmax(-1)                  # (B, T, C): each object's cell
    on = cell[..., :O] == cell[..., -1:]                              # (B, T, O): the agent stands on colour c
    return torch.where(on.any(-1), on.float().argmax(-1), O)


class UnderAgent(torch.nn.Module):
    """The plain linear embedding plus a learned vector for the colour under the agent (none: its own vector), for
    `scale --encoder linear-under`: the visited colour, which the task is read from, becomes as easy to see as with
    the agent-centred encoder, while every offset a move depends on must still be computed by the blocks."""

    def __init__(self, linear: torch.nn.Linear, O: int = 8):
        super().__init__()
        self.linear = linear
        self.under = torch.nn.Embedding(O + 1, linear.out_features)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.linear(obs) + self.under(colour_under(obs))


class Factored(etarl.BaseModel):
    """A diagnostic base model with the paper's hierarchy built in rather than learned (`scale --model factored`;
    not the paper's model). The blocks below L/2 see only the colour under the agent at each step, so they can read
    the task's progress from the history but cannot navigate. At L/2 the stream gains the agent-centred embedding
    of the observation (etarl.EgoEncoder), and the blocks from L/2 on see one step each (their attention looks at
    the current step only), so they navigate without reading the history. The stream at L/2 then holds what the
    history says about the target apart from the move, which is what Eq. 1's edit at L/2 needs (lab notes,
    section 2). The residual stream at layer L/2 is taken after the observation is added, so probes, controllers
    and the metacontroller at L/2 all see it. It runs wherever etarl takes a base model (pretraining, probes,
    controllers, rollouts, the metacontroller, internal RL); save and load it with save_base and load_base.
    The paper's gridworld only (G = 7, 8 colours, 4 walls)."""

    def __init__(self, cfg: etarl.ModelConfig):
        if cfg.encoder != "ego" or cfg.mixer != "attention" or cfg.n_layers < 2:
            raise ValueError("the factored model needs encoder 'ego', mixer 'attention' and at least 2 blocks")
        super().__init__(cfg, obs_dim=(8 + 4 + 1) * 7 * 7, n_actions=len(envs.ACTIONS), grid_size=7)
        self.under = torch.nn.Embedding(8 + 1, cfg.d_model)

    def forward(self, obs, control=None, return_residuals=False, cache=None, start=0):
        pos = torch.arange(start, start + obs.shape[1], device=obs.device)
        mid = len(self.blocks) // 2
        e = self.under(colour_under(obs))
        residuals = [e]
        for l, block in enumerate(self.blocks):
            if l == mid:
                e = residuals[l] = e + self.encoder(obs)
            if control is not None and control.layer == l:
                e = e + control(e)                                    # Eq. (1)
            if l < mid:
                e = block(e, pos, None if cache is None else cache[l])
            else:
                e = each_step_alone(block, e)                         # no history
            residuals.append(e)
        return self.readout(e, residuals if return_residuals else None)


def save_base(model, path) -> None:
    """etarl.save_model's file, marked when the model is Factored."""
    torch.save({"cfg": dataclasses.asdict(model.cfg), "env": model.env, "factored": isinstance(model, Factored),
                "state": model.state_dict()}, path)


def base_model(run: etarl.Run, path: str | None) -> etarl.BaseModel:
    """The frozen base model: the one saved at path (--base), else the cpu run's."""
    return etarl.freeze(load_base(path) if path else run.base_model()[0])


def load_base(path) -> etarl.BaseModel:
    """A base model saved by etarl.save_model or by `scale --save` (which may be Factored)."""
    ckpt = torch.load(path, map_location="cpu")
    if not ckpt.get("factored"):
        return etarl.load_model(path)
    model = Factored(etarl.ModelConfig(**ckpt["cfg"]))
    model.load_state_dict(ckpt["state"])
    return model


def scale(args) -> dict:
    device = etarl.default_device()
    torch.set_float32_matmul_precision("high")
    chunk = min(50_000, args.episodes)
    with Pool(args.workers) as pool:
        train = concatenate(pool.map(_generate, [(chunk, s, args.eps) for s in range(0, args.episodes, chunk)]))
        clean = train if args.eps == 0 else concatenate(pool.map(      # the controllers train on noise-free episodes
            _generate, [(chunk, 10**7 + s, 0.0) for s in range(0, min(args.episodes, 200_000), chunk)]))
    test = etarl.generate_episodes(2000, 5 * 10**6)
    if args.encoder == "linear-under" and args.save:
        raise SystemExit("--encoder linear-under: load_base cannot rebuild its UnderAgent encoder, so no --save")
    if args.model == "factored" and args.encoder != "ego":
        raise SystemExit("--model factored adds the agent-centred embedding at L/2: use it with --encoder ego")
    encoder = "linear" if args.encoder == "linear-under" else args.encoder
    cfg = etarl.ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=4, d_mlp=512, encoder=encoder)
    torch.manual_seed(args.seed)
    model = Factored(cfg) if args.model == "factored" else etarl.build_model(cfg)
    if args.encoder == "linear-under":
        model.encoder = UnderAgent(model.encoder)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.03)
    rng, by_length = np.random.default_rng(args.seed), np.argsort(train.lengths, kind="stable")
    schedule = etarl.PretrainConfig(steps=10**9, lr=args.lr)     # the cpu preset's warm-up and cosine (deviation 2)
    step, start = 0, time.time()
    while time.time() - start < args.budget:
        if step == 50:                                            # the cosine's length: the budget in steps
            schedule.steps = int(args.budget / ((time.time() - start) / 50))
        for g in opt.param_groups:
            g["lr"] = etarl.lr_at(min(step, schedule.steps), schedule)
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(train.batch(etarl.length_bucketed_batch(by_length, args.batch, rng), device))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    out = {"steps": step, "episodes_seen": step * args.batch, "train_s": time.time() - start,
           "gate": etarl.quality_gate(model, test), "probes": etarl.probe_layers(model, test).tolist()}
    etarl.freeze(model)
    out["base"] = {**shortest_path_mass(model, test), TASKS[-1]: float(etarl.rollout(
        model, envs.parse_task(TASKS[-1]), 500, 1)["success"].mean())}
    if args.model == "transformer":                               # the factored model's upper blocks see no history
        out.update(where_the_move_is_chosen(model, test))
    if args.save:
        save_base(model, args.save)
    print(json.dumps(out), flush=True)
    for layer in range(1, args.layers):
        ctrl, _ = etarl.train_controllers(model, clean, layer, etarl.ControlConfig(), 0, progress=False)
        out[f"layer {layer}"] = evaluate(model, ctrl, test, 500)
        print(layer, json.dumps(out[f"layer {layer}"]), flush=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("variants")
    v.add_argument("--layer", type=int, default=2)
    v.add_argument("--rank", type=int, default=16, help="0: full rank")
    v.add_argument("--lr", type=float, default=1e-2)
    v.add_argument("--steps", type=int, default=600)
    v.add_argument("--loss-on", choices=("all", "t0", "first", "set"), default="all")
    v.add_argument("--eps", type=float, default=0.0, help="train on fresh expert data with random actions at this rate")
    v.add_argument("--orders", choices=("pretraining", "all"), default="pretraining",
                   help="train on fresh expert data in every order of three pairs (and roll out in them: --dagger)")
    v.add_argument("--base", default=None,
                   help="a base model file instead of the cpu run's (made by `failures` or `scale --save`)")
    v.add_argument("--dagger", type=int, default=0, help="rounds of training on the controlled model's own episodes")
    v.add_argument("--dagger-episodes", type=int, default=5000, help="own episodes added per round")
    v.add_argument("--dagger-steps", type=int, default=300, help="training steps per round (loss: set)")
    v.add_argument("--edit", choices=("linear", "bias", "mlp", "none"), default="linear",
                   help="the form of the edit: Eq. 1's U e (linear), a steering vector (bias), an MLP (OtherEdits), "
                        "or none (the uncontrolled model, scored the same way)")
    v.add_argument("--inside", action="store_true",
                   help="apply the controllers inside block --layer, after its attention, before its MLP (EditInside)")
    t = sub.add_parser("transitions")
    t.add_argument("--layer", type=int, default=2)
    t.add_argument("--episodes", type=int, default=500, help="episodes per task")
    t.add_argument("--orders", choices=("pretraining", "all"), default="pretraining",
                   help="train the controllers on 200k fresh noise-free episodes in every order of three pairs")
    h = sub.add_parser("history")
    s = sub.add_parser("scale")
    s.add_argument("--d-model", type=int, default=256)
    s.add_argument("--layers", type=int, default=6)
    s.add_argument("--batch", type=int, default=512)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--budget", type=float, default=180, help="training seconds")
    s.add_argument("--episodes", type=int, default=1_000_000)
    s.add_argument("--eps", type=float, default=0.0, help="the expert's random-action rate in the pretraining data")
    s.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    s.add_argument("--encoder", choices=("ego", "linear", "linear-under"), default="ego",
                   help="the observation embedding (deviation 1); linear-under: linear plus the colour under the agent")
    s.add_argument("--model", choices=("transformer", "factored"), default="transformer",
                   help="factored: the diagnostic Factored model (the hierarchy built in), not the paper's")
    s.add_argument("--seed", type=int, default=0, help="the model's initialisation and the batches (the data stay)")
    s.add_argument("--save", default=None, help="save the trained base model to this file")
    w = sub.add_parser("ways")
    w.add_argument("--since", type=int, default=0, help="score the first SINCE + 1 steps of each pair")
    f = sub.add_parser("failures")
    f.add_argument("--eps", type=float, default=0.0, help="pretrain a fresh base model on data with random moves")
    f.add_argument("--action-loss", choices=("expert", "shortest"), default="expert",
                   help="its action loss (PretrainConfig.action_loss)")
    for p in (t, h, w):
        p.add_argument("--base", default=None, help="a base model file instead of the cpu run's (e.g. `scale --save`)")
    for p in (v, s, f, h, t, w):
        p.add_argument("--out", default=None, help="JSON file (default: experiments/<command>-<time>.json)")
    args = ap.parse_args()
    commands = {"variants": variants, "scale": scale, "history": history, "failures": failures,
                "transitions": transitions, "ways": ways}
    result = {"args": vars(args), **commands[args.command](args)}
    path = args.out or f"experiments/{args.command}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    Path(path).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if "progress" not in k}, indent=1))
