"""ETARL's tests, each named and docstringed by the property it checks: reference equivalence (vector
env = single env, cached = full forward, low-rank edit = e + U e), contracts (gymnasium's checker, seeds,
clear errors) and small runs that assert learning happened. `pytest` runs them all in a few minutes."""
import dataclasses
import json
from collections import deque
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from gymnasium.utils.env_checker import check_env

import envs
import etarl
from envs import (GRID_POST_TASK, GRID_PRETRAIN_TASKS, MOVES, AntPinpad, GridPinpad, GridPinpadVec, expert_actions,
                  format_task, grid_distance_to, grid_observation, parse_task, sample_layout)


def expert_returns(env: GridPinpadVec, rng, eps=0.0, seed=0):
    """Run the expert until every episode is done; return per-episode reward and the step records."""
    env.reset(seed)
    total = np.zeros(env.num_envs)
    while not env.done.all():
        total += env.step(expert_actions(env, rng, eps))[1]
    return total


def test_gymnasium_env_checker_passes():
    """GridPinpad follows the Gymnasium API (env_checker) and is registered as GridPinpad-v0."""
    check_env(GridPinpad(task="0-1-2-3", render_mode="rgb_array").unwrapped)
    check_env(GridPinpad().unwrapped)
    env = gymnasium.make("GridPinpad-v0", task="0-1")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (637,) and env.observation_space.contains(obs)


def test_same_seed_same_episode():
    """Resetting with the same seed gives the same task, layout and trajectory under the same actions."""
    runs = []
    for _ in range(2):
        env = GridPinpad()
        obs, info = env.reset(seed=123)
        steps = [env.step(a) for a in [0, 1, 2, 3, 1, 1, 2]]
        runs.append((obs, info["task"], [(s[0], s[1], s[2], s[3]) for s in steps]))
    assert runs[0][1] == runs[1][1]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][2], runs[1][2]):
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:] == b[1:]


@pytest.mark.parametrize("policy", ["random", "expert"])
@pytest.mark.parametrize("task", [None, "0-1-2", ["0-1", "2-3-4", "5-6-7-0-1", "7"] * 10])
def test_vec_env_equals_single_env(policy, task):
    """Episode i of GridPinpadVec.reset(seed) equals GridPinpad().reset(seed=seed+i) step by step."""
    N, seed, T = 40, 7, 30
    vec = GridPinpadVec(N, task=task, T=T)
    singles = [GridPinpad(task=t, T=T) for t in (task if isinstance(task, list) else [task] * N)]
    obs, info = vec.reset(seed)
    for i, env in enumerate(singles):
        o, inf = env.reset(seed=seed + i)
        np.testing.assert_array_equal(obs[i], o)
        assert inf["task"] == tuple(vec.tasks[i, :vec.task_len[i]]) and info["agent"][i] == inf["agent"]
    rng, alive = np.random.default_rng(0), np.ones(N, bool)
    for _ in range(T + 2):
        actions = expert_actions(vec, rng, eps=0.1) if policy == "expert" else rng.integers(4, size=N)
        frozen = (vec.agent.copy(), vec.progress.copy())
        obs, reward, terminated, truncated, info = vec.step(actions)
        for i, env in enumerate(singles):
            if not alive[i]:  # ended: the vec env keeps the episode frozen
                assert reward[i] == 0 and not terminated[i] and not truncated[i] and vec.done[i]
                assert vec.agent[i] == frozen[0][i] and vec.progress[i] == frozen[1][i]
                continue
            o, r, te, tr, inf = env.step(actions[i])
            np.testing.assert_array_equal(obs[i], o)
            assert (reward[i], terminated[i], truncated[i]) == (r, te, tr)
            for key in ("agent", "progress", "subgoal", "visited"):
                assert info[key][i] == inf[key], key
            alive[i] = not (te or tr)
    assert not alive.any() and vec.done.all()


def hand_built(task, agent, colours, walls=(40, 41, 42, 43)):
    """A GridPinpad whose state is set by hand after reset (cells are row * 7 + col)."""
    env = GridPinpad(task=task)
    env.reset(seed=0)
    env.agent, env.colour_cells, env.wall_cells = agent, np.array(colours), np.array(walls)
    return env


def test_visit_rule_and_wrong_colour_terminates():
    """Entering the next colour advances the task, completing it pays 1; entering another colour fails."""
    # agent at (3, 3) = 24; colour 0 right of it, colour 1 left, colour 2 above; colours 3..7 far away
    colours = [25, 23, 17, 0, 1, 2, 3, 4]
    env = hand_built("0-1", 24, colours)
    assert env.step(1)[1:4] == (0.0, False, False) and env.progress == 1  # onto colour 0
    *_, info = env.step(3)  # back to the empty cell: no visit
    assert info["visited"] == -1 and info["subgoal"] == 0
    _, reward, terminated, truncated, info = env.step(3)  # onto colour 1: task complete
    assert (reward, terminated, truncated, info["progress"], info["subgoal"]) == (1.0, True, False, 2, -1)
    env = hand_built("0-1", 24, colours)
    _, reward, terminated, _, info = env.step(0)  # onto colour 2: wrong colour
    assert (reward, terminated, info["visited"], info["progress"]) == (0.0, True, 2, 0)


def test_moves_into_walls_and_off_grid_are_noops():
    """Moving off the grid or into a wall leaves the agent in place (and still counts as a step)."""
    env = hand_built("0", 0, [48, 47, 46, 45, 44, 39, 38, 37], walls=(1, 10, 11, 12))
    for action in (0, 3, 1):  # up and left: off the grid; right: wall at cell 1
        _, _, terminated, _, info = env.step(action)
        assert info["agent"] == 0 and not terminated
    assert env.step(2)[-1]["agent"] == 7 and env.t == 4
    np.testing.assert_array_equal(MOVES[2], [1, 0])


def test_bumping_the_edge_on_a_colour_is_not_a_revisit():
    """Standing on a colour and bumping into the grid edge does not visit it again."""
    env = hand_built("0-1", 1, [0, 48, 47, 46, 45, 44, 39, 38])
    assert env.step(3)[-1]["visited"] == 0 and env.progress == 1  # onto colour 0 at the corner
    for action in (3, 0):  # left and up: off the grid, stays on colour 0
        _, reward, terminated, truncated, info = env.step(action)
        assert (info["visited"], info["progress"], reward, terminated, truncated) == (-1, 1, 0.0, False, False)
    env = hand_built("0-0", 1, [0, 48, 47, 46, 45, 44, 39, 38])  # repeating a colour needs leaving it
    env.step(3), env.step(3)
    assert env.progress == 1
    env.step(1)
    assert env.step(3)[1:3] == (1.0, True)


@pytest.mark.parametrize("bad", ["0--1", "0,1", "a-b", " ", "", "0-8", "-1", "1-", " 1", "0-1 ", "٣",
                                 [], [0, 1.5], [True], 3, None, {0: 1}, np.array(3), [0, [1, 2]]])
def test_bad_tasks_raise_clear_errors(bad):
    """Malformed, empty, out-of-range or wrongly typed tasks raise ValueError naming the problem."""
    with pytest.raises(ValueError, match="task|colour"):
        parse_task(bad)
    with pytest.raises(ValueError):
        GridPinpad(task=bad) if bad is not None else GridPinpad(G=5)
    if bad is not None:                                               # None: the vector env's random tasks
        with pytest.raises(ValueError):
            GridPinpadVec(2, task=bad)


def test_task_round_trip_and_tables():
    """parse_task and format_task invert each other; the tables hold 16 distinct pair-built tasks."""
    assert parse_task("0-1-4-5") == (0, 1, 4, 5) == parse_task(np.array([0, 1, 4, 5]))
    assert format_task(parse_task("7-0-3")) == "7-0-3"
    assert len(set(GRID_PRETRAIN_TASKS)) == 16 and all(len(t) == 6 for t in GRID_PRETRAIN_TASKS)
    assert all(t[i] % 2 == 0 and t[i + 1] == t[i] + 1 for t in GRID_PRETRAIN_TASKS for i in (0, 2, 4))
    with pytest.raises(ValueError, match="O \\+ W"):
        GridPinpad(task="0", G=3, O=8, W=1)


def test_grid_observation_channels():
    """Channel c < O is colour c, channel O + w is wall w, the last is the agent; one 1 per channel; broadcasts."""
    agent, colours, walls = np.array([[5, 6], [7, 8]]), np.arange(10, 18)[None, None], np.array([[[30, 31, 32, 33]]])
    colours = np.broadcast_to(colours, (2, 1, 8))
    obs = grid_observation(agent, colours, walls)  # agent (2, 2) against (2, 1, O)
    assert obs.shape == (2, 2, 13 * 49) and obs.dtype == np.float32
    maps = obs.reshape(2, 2, 13, 49)
    assert (maps.sum(-1) == 1).all()
    np.testing.assert_array_equal(maps.argmax(-1)[1, 0], [*range(10, 18), 30, 31, 32, 33, 7])
    as_t = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.long)
    torch_obs = etarl.grid_observation_torch(as_t(agent), as_t(colours), as_t(walls))   # what a GPU batch uses
    np.testing.assert_array_equal(torch_obs.numpy(), obs)


def test_render_draws_the_grid():
    """render gives a uint8 RGB image with the agent as a black disc in its cell."""
    env = hand_built("0", 8, [0, 48, 47, 46, 45, 44, 39, 38])
    env.render_mode = "rgb_array"
    image = env.render()
    assert image.dtype == np.uint8 and image.shape == (169, 169, 3)
    assert (image[36, 36] == 0).all() and (image[12, 12] != 0).any()  # agent centre (1, 1); colour 0 at (0, 0)


def test_distance_matches_reference_bfs():
    """grid_distance_to equals a plain breadth-first search on random blocked grids."""
    rng, G = np.random.default_rng(0), 7
    blocked = rng.random((50, G * G)) < 0.3
    targets = rng.integers(G * G, size=50)
    dist = grid_distance_to(targets, blocked, G)
    for n in range(50):
        ref, queue = {targets[n]: 0}, deque([targets[n]])
        while queue:
            cell = queue.popleft()
            r, c = divmod(cell, G)
            for dr, dc in MOVES:
                nb = (r + dr) * G + c + dc
                if 0 <= r + dr < G and 0 <= c + dc < G and not blocked[n, nb] and nb not in ref:
                    ref[nb] = ref[cell] + 1
                    queue.append(nb)
        for cell in range(G * G):
            if cell in ref:
                assert dist[n, cell] == ref[cell]
            elif not blocked[n, cell]:
                assert dist[n, cell] >= 4 * G * G


def test_layouts_are_distinct_and_solvable():
    """sample_layout draws distinct cells; every colour is reachable from the start avoiding other colours."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        agent, colours, walls = sample_layout(rng)
        assert len({agent, *colours, *walls}) == 13


def test_expert_solves_every_task():
    """With eps = 0 the expert succeeds in all 500 episodes of each pretraining task and of the post task.

    The post task (twelve colours) needs more than T = 100 steps on about 0.4% of layouts, so it gets T = 200
    here; at T = 100 its expert success is about 0.996.
    """
    tasks = [t for t in GRID_PRETRAIN_TASKS for _ in range(500)]
    success = expert_returns(GridPinpadVec(len(tasks), task=tasks), np.random.default_rng(0))
    assert success.reshape(16, 500).mean(1).tolist() == [1.0] * 16
    assert expert_returns(GridPinpadVec(500, task=GRID_POST_TASK, T=200), np.random.default_rng(0)).mean() == 1.0
    assert expert_returns(GridPinpadVec(500, task=GRID_POST_TASK), np.random.default_rng(0)).mean() > 0.98
    assert envs.grid_expert_success(GRID_PRETRAIN_TASKS[3], 200) == 1.0


def test_expert_steps_off_and_back_on_to_visit_a_colour_twice_in_a_row():
    """On a task that repeats a colour ("0-0"), standing on the target after its first visit, the expert's
    shortest path steps off and back on; every step off that enters no other colour is optimal."""
    for task in ("0-0", "3-3-4-4", "5-5-5"):
        assert envs.grid_expert_success(task, 300) == 1.0
    env = GridPinpadVec(1, task="0-0")
    env.reset(0)
    while env.progress[0] == 0:
        env.step(expert_actions(env, np.random.default_rng(0)))
    optimal, steps = envs.optimal_moves(env)[0], MOVES[np.arange(4)]
    row, col = divmod(int(env.agent[0]), env.G)
    off = [0 <= row + dr < env.G and 0 <= col + dc < env.G and (row + dr) * env.G + col + dc not in
           set(env.wall_cells[0]) | set(env.colour_cells[0]) for dr, dc in steps]
    assert optimal.tolist() == off and any(off)


def test_bad_actions_raise_clear_errors():
    """A move outside 0..3 (say the data's padding value -1) is refused, not read as MOVES[-1]; the vector env
    checks the moves of running episodes only."""
    env = GridPinpad(task="0-1")
    env.reset(seed=0)
    for bad in (-1, 4, 1.5, 2.0, float("nan"), None, [0], True):
        with pytest.raises(ValueError, match="action"):
            env.step(bad)
    for good in (1, np.int64(2), np.array(3), torch.tensor(0)):
        env.step(good)
    vec = GridPinpadVec(2, task="0-1")
    vec.reset(0)
    for bad in (np.array([0, -1]), np.array([0, 1, 2]), np.array([0.0, 1.0])):
        with pytest.raises(ValueError, match="actions"):
            vec.step(bad)
    vec.step(torch.tensor([1, 2]))
    vec.done[1] = True
    vec.step(np.array([0, -1]))                                        # an ended episode's action is ignored


@pytest.mark.parametrize("eps", [0.2, 1.0])
def test_expert_noise_never_enters_a_wrong_colour(eps):
    """Random eps-actions never end an episode on a wrong colour; at eps = 0.2 the expert still nearly always
    succeeds."""
    env = GridPinpadVec(2000, T=100)
    env.reset(3)
    rng, success, failed = np.random.default_rng(0), np.zeros(2000), np.zeros(2000, bool)
    while not env.done.all():
        _, reward, terminated, _, _ = env.step(expert_actions(env, rng, eps))
        success += reward
        failed |= terminated & (reward == 0)
    assert not failed.any()
    if eps == 0.2:
        assert success.mean() > 0.95


def test_expert_moves_are_shortest_path_moves():
    """Every eps = 0 expert move lowers the distance to the current target by exactly one."""
    env = GridPinpadVec(1000)
    env.reset(11)
    rng, rows = np.random.default_rng(0), np.arange(1000)
    while not env.done.all():
        live, target = ~env.done, env.target
        dist = env.colour_distance[rows, np.maximum(target, 0)]
        before = dist[rows, env.agent]
        env.step(expert_actions(env, rng))
        np.testing.assert_array_equal(dist[rows, env.agent][live], before[live] - 1)



# ==================================================================================================
# Base model, control, pretraining, probes (etarl.py)
# ==================================================================================================

def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = etarl.ModelConfig(**{"d_model": 32, "n_layers": 3, "n_heads": 2, "d_mlp": 64, **kw})
    return etarl.build_model(cfg).eval()


@pytest.fixture(scope="module")
def data():
    return etarl.generate_episodes(300, seed=0), etarl.generate_episodes(200, seed=10**6)


@pytest.fixture(scope="module")
def trained():
    """A small model trained for a few hundred steps (shared by the learning tests)."""
    train, test = etarl.generate_episodes(3000, seed=0), etarl.generate_episodes(400, seed=10**6)
    torch.manual_seed(0)
    model = etarl.build_model(etarl.ModelConfig(d_model=64, n_layers=2, n_heads=2, d_mlp=128, obs_weight=0.0))
    cfg = etarl.PretrainConfig(steps=400, batch_size=32, lr=3e-3, warmup=20, eval_every=400)
    history = etarl.pretrain(model, train, test, cfg, progress=False)
    return model, history, train, test


def test_episode_data_replays_in_the_environment(data):
    """Stored actions, replayed in the env from the stored layout, give the stored agent cells; every
    expert action is a shortest-path move; labels agree with the task table."""
    eps = data[0].subset(slice(0, 50))
    for i in range(len(eps)):
        env = GridPinpad()
        _, info = env.reset(seed=i)                                     # episode i was drawn with seed 0 + i
        assert info["task"] == GRID_PRETRAIN_TASKS[eps.task_id[i]]
        np.testing.assert_array_equal(info["colour_cells"], eps.colour_cells[i])
        assert info["agent"] == eps.agent[i, 0]
        for t in range(eps.lengths[i]):
            assert eps.optimal[i, t, eps.actions[i, t]]
            assert eps.subgoal[i, t] == eps.target[i, t] // 2 == info["subgoal"]
            _, reward, terminated, _, info = env.step(int(eps.actions[i, t]))
            assert info["agent"] == eps.agent[i, t + 1]
        assert terminated and reward == 1.0


def test_replayed_actions_are_labelled_with_the_experts_moves():
    """generate_episodes(replay=...) makes the given moves and labels each state with the expert's: replaying
    the expert's own actions gives its data back; replaying a model's rollout follows the rollout's cells,
    and its labels are the shortest-path moves toward the task's next colour from there."""
    expert = etarl.generate_episodes(200, seed=5, eps=0.2)
    again = etarl.generate_episodes(200, seed=5, replay=expert.actions)
    for f in ("agent", "actions", "lengths", "target", "subgoal", "optimal", "colour_cells", "task_id"):
        np.testing.assert_array_equal(getattr(again, f), getattr(expert, f))
    r = etarl.rollout(_model(), "0-1-2-3", n=40, seed=7, record=True)
    own = etarl.generate_episodes(40, seed=7, task="0-1-2-3", replay=r["actions"])
    np.testing.assert_array_equal(own.lengths, r["length"])
    np.testing.assert_array_equal(own.agent, r["agent"][:, : own.agent.shape[1]])
    live = np.arange(own.actions.shape[1]) < own.lengths[:, None]
    np.testing.assert_array_equal(own.actions[live], r["actions"][:, : own.actions.shape[1]][live])
    for i in range(40):                                  # the target runs through the task as the model progresses
        targets = own.target[i, : own.lengths[i]]
        changes = targets[np.r_[True, targets[1:] != targets[:-1]]]
        np.testing.assert_array_equal(changes, [0, 1, 2, 3][: min(r["progress"][i] + 1, 4)])
        assert all(own.optimal[i, t].any() for t in range(own.lengths[i]))
    assert not own.optimal[live][np.arange(live.sum()), own.actions[live]].all()   # the model strays: labels differ
    for bad in (r["actions"][:, :2], r["actions"][:30], np.full_like(r["actions"], -1)):
        with pytest.raises(ValueError, match="replay"):
            etarl.generate_episodes(40, seed=7, task="0-1-2-3", replay=bad)


def test_episodes_save_and_load(tmp_path, data):
    """Episodes round-trip through a file unchanged."""
    data[0].save(tmp_path / "d.npz")
    loaded = etarl.Episodes.load(tmp_path / "d.npz")
    for f in ("agent", "actions", "lengths", "optimal", "subgoal", "colour_cells"):
        np.testing.assert_array_equal(getattr(loaded, f), getattr(data[0], f))


def test_low_rank_edit_equals_explicit_matrix():
    """Control(A, B) applies U e with U = B A^T built explicitly (not a diagonal gain), shared or per token."""
    torch.manual_seed(0)
    e = torch.randn(3, 5, 16)
    for A, B in [(torch.randn(16, 4), torch.randn(16, 4)), (torch.randn(3, 5, 16, 4), torch.randn(3, 5, 16, 4))]:
        U = B @ A.transpose(-1, -2)                                    # (..., D, D)
        explicit = torch.einsum("...ij,...j->...i", U.expand(3, 5, 16, 16), e)
        torch.testing.assert_close(etarl.Control(0, A=A, B=B)(e), explicit)
        torch.testing.assert_close(etarl.Control(0, U=U)(e), explicit)


def test_low_rank_mixture_edit_equals_explicit_factors():
    """A low-rank hypernetwork and low-rank subgoal controllers mix shared banks per token instead of building
    A and B per token, and still apply U e = B A^T e with the factors they define: in a whole-sequence pass, in
    one step of a rollout (step_view) and for some of the episodes (rows)."""
    torch.manual_seed(0)
    e, hyper, z = torch.randn(3, 5, 16), etarl.mlp(8, 6, 2 * 16 * 4), torch.randn(3, 5, 8)
    A, B = hyper(z).unflatten(-1, (2, 16, 4)).unbind(-3)              # the factors, per token
    torch.testing.assert_close(etarl.hyper_control(hyper, z, 0, 16, rank=4)(e), etarl.Control(0, A=A, B=B)(e))
    step = etarl.hyper_control(hyper, z[:, 0], 0, 16, rank=4).step_view()
    torch.testing.assert_close(step(e[:, :1]), etarl.Control(0, A=A[:, :1], B=B[:, :1])(e[:, :1]))
    rows = torch.tensor([2, 0])
    explicit = etarl.Control(0, A=A[rows, :1], B=B[rows, :1])(e[rows, :1])
    torch.testing.assert_close(step.rows(rows)(e[rows, :1]), explicit)
    ctrl = etarl.SubgoalControllers(4, 16, layer=0, rank=4)
    torch.nn.init.normal_(ctrl.B)
    k = torch.randint(0, 4, (3, 5))
    torch.testing.assert_close(ctrl(k)(e), etarl.Control(0, A=ctrl.A[k], B=ctrl.B[k])(e))


def test_full_rank_mixture_edit_equals_explicit_matrix():
    """The full-rank forms never build a D x D matrix per token and still apply U e exactly: a mixture of
    shared matrices, a full-rank hypernetwork (U = W h + b) and full-rank subgoal controllers."""
    torch.manual_seed(0)
    e, bank, bias, mix = torch.randn(3, 5, 16), torch.randn(6, 16, 16), torch.randn(16, 16), torch.randn(3, 5, 6)
    U = torch.einsum("btj,jde->btde", mix, bank) + bias
    torch.testing.assert_close(etarl.Control(0, mix=mix, bank=bank, bias=bias)(e), etarl.Control(0, U=U)(e))
    hyper, z = etarl.mlp(8, 6, 16 * 16), torch.randn(3, 5, 8)
    explicit = etarl.Control(0, U=hyper(z).unflatten(-1, (16, 16)))(e)
    torch.testing.assert_close(etarl.hyper_control(hyper, z, 0, 16, rank=0)(e), explicit)
    ctrl = etarl.SubgoalControllers(4, 16, layer=0, rank=0)
    torch.nn.init.normal_(ctrl.U)
    k = torch.randint(0, 4, (3, 5))
    torch.testing.assert_close(ctrl(k)(e), etarl.Control(0, U=ctrl.U[k])(e))
    torch.testing.assert_close(ctrl(k[:, 0]).step_view()(e[:, :1]), etarl.Control(0, U=ctrl.U[k[:, 0], None])(e[:, :1]))


def test_zero_controller_leaves_the_model_unchanged(data):
    """A freshly made controller (B = 0) and U = 0 give exactly the base model's logits."""
    model, batch = _model(), data[0].batch(np.arange(8), "cpu")
    obs = batch["obs"][:, :-1]
    ctrl = etarl.SubgoalControllers(4, 32, layer=1, rank=4)
    base = model(obs)["logits"]
    torch.testing.assert_close(model(obs, ctrl(batch["subgoal"]))["logits"], base, rtol=0, atol=0)
    zero = etarl.Control(1, U=torch.zeros(32, 32))
    torch.testing.assert_close(model(obs, zero)["logits"], base, rtol=0, atol=0)


def test_control_edits_the_residual_stream_at_its_layer(data):
    """A control at layer l leaves residuals 0..l untouched and changes every later one; one at a layer the
    model has no block before (l >= L) is an error, not an edit that silently never happens."""
    model, obs = _model(), data[0].batch(np.arange(4), "cpu")["obs"]
    torch.manual_seed(1)
    control = etarl.Control(2, A=torch.randn(32, 4), B=torch.randn(32, 4))
    base = model(obs, return_residuals=True)["residuals"]
    edited = model(obs, control, return_residuals=True)["residuals"]
    for l in range(3):
        torch.testing.assert_close(edited[l], base[l], rtol=0, atol=0)
    assert (edited[3] - base[3]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="layer"):
        model(obs, etarl.Control(len(model.blocks), A=torch.randn(32, 4), B=torch.randn(32, 4)))


@pytest.mark.parametrize("controlled", [False, True])
def test_cached_step_by_step_equals_full_forward(data, controlled):
    """Stepping with the key/value cache gives the full forward pass's logits (with and without a
    per-episode control), so rollouts score actions exactly as training does."""
    model, batch = _model(), data[0].batch(np.arange(6), "cpu")
    obs = batch["obs"]
    control = None
    if controlled:
        torch.manual_seed(2)
        control = etarl.Control(1, A=torch.randn(6, 32, 4), B=torch.randn(6, 32, 4))
    full = model(obs, None if control is None else etarl.Control(1, control.A[:, None], control.B[:, None]))["logits"]
    cache = model.new_cache()
    step = [model.step(obs[:, t], cache, None if control is None else control.step_view())["logits"]
            for t in range(obs.shape[1])]
    torch.testing.assert_close(torch.stack(step, 1), full, atol=1e-5, rtol=1e-4)


def _short_and_padded(eps):
    """The shortest episode as a batch of its own length, and the same episode followed by 10 masked steps
    of another episode's frames."""
    short = eps.batch([int(np.argmin(eps.lengths))], "cpu")
    garbage = eps.batch([int(np.argmax(eps.lengths))], "cpu")
    padded = dict(short)
    for k in ("obs", "actions"):
        padded[k] = torch.cat([short[k], garbage[k][:, :10]], 1)
    padded["mask"] = torch.cat([short["mask"], torch.zeros(1, 10, dtype=torch.bool)], 1)
    return short, padded


def test_padding_does_not_change_the_loss(data):
    """Padded steps (mask False) contribute nothing: a batch cut to one episode's length and the same
    episode padded with garbage frames give the same loss."""
    model = _model()
    short, padded = _short_and_padded(data[0])
    a, b = model.loss(short), model.loss(padded)
    torch.testing.assert_close(a["action_nll"], b["action_nll"])
    torch.testing.assert_close(a["obs_nll"], b["obs_nll"])


def test_shortest_path_loss_scores_the_set_of_shortest_moves():
    """loss(shortest=True) is -ln p(any shortest-path move): with the set cut to the move taken it equals the
    expert NLL; with ties it is lower (the tied moves' mass adds up); a random move off every shortest path is
    scored by the shortest moves, not by itself, so data with random moves does not teach the model to make them."""
    model = _model()
    noisy = etarl.generate_episodes(64, seed=3, eps=0.3).batch(np.arange(64), "cpu")
    taken = noisy["optimal"].gather(-1, noisy["actions"].clamp(min=0)[..., None])[..., 0] & noisy["mask"]
    assert 0 < (~taken & noisy["mask"]).sum() < noisy["mask"].sum()          # some random moves, not all
    only_taken = dict(noisy, optimal=F.one_hot(noisy["actions"].clamp(min=0), 4).bool() & noisy["mask"][..., None])
    torch.testing.assert_close(model.loss(only_taken, shortest=True)["action_nll"], model.loss(noisy)["action_nll"])
    clean = dict(noisy, mask=taken)                                           # steps whose move was a shortest one
    assert model.loss(clean, shortest=True)["action_nll"] < model.loss(clean)["action_nll"]
    moved = dict(noisy, actions=(noisy["actions"] + 1) % 4)                  # other moves, the same labels
    torch.testing.assert_close(model.loss(moved, shortest=True)["action_nll"],
                               model.loss(noisy, shortest=True)["action_nll"])
    few, calls = etarl.generate_episodes(8, 0), []
    loss = model.loss
    model.loss = lambda batch, **kw: calls.append(kw) or loss(batch, **kw)                  # pretrain asks for it
    etarl.pretrain(model, few, few, etarl.PretrainConfig(steps=1, batch_size=4, action_loss="shortest"), progress=False)
    assert calls == [{"shortest": True}]
    with pytest.raises(ValueError, match="action_loss"):
        etarl.pretrain(model, few, few, etarl.PretrainConfig(action_loss="best"))
    ant = etarl.build_model(etarl.ModelConfig(d_model=16, n_layers=2, d_mlp=32, **etarl.ANT), "ant")
    with pytest.raises(ValueError, match="shortest-path labels"):
        etarl.pretrain(ant, few, few, etarl.PretrainConfig(action_loss="shortest"))


def test_model_save_and_load_give_the_same_outputs(tmp_path, data):
    model, obs = _model(), data[0].batch(np.arange(3), "cpu")["obs"]
    etarl.save_model(model, tmp_path / "m.pt")
    torch.testing.assert_close(etarl.load_model(tmp_path / "m.pt")(obs)["logits"], model(obs)["logits"])


def test_pretraining_learns_to_navigate(trained):
    """A few hundred steps lower the action NLL below ln 4 and put more probability on shortest-path
    moves than a uniform policy does."""
    model, history, _, test = trained
    assert np.mean(history["action_nll"][-20:]) < np.mean(history["action_nll"][:20]) - 0.1
    gate = etarl.quality_gate(model, test)
    uniform = test.optimal[test.actions >= 0].mean()                  # mass a uniform policy puts there
    assert gate["sp_all"] > uniform + 0.1


@pytest.mark.parametrize("n, batch_size", [(400, 16), (800, 16), (100, 64)])
def test_length_bucketed_batches_draw_every_episode_equally_often(n, batch_size):
    """Batches hold distinct episodes of similar length, and no episode is drawn more or less often than
    another: not the shortest or the longest either (a window sliding over the sorted order would draw the
    extreme tenths of the ant-cpu sets at about a quarter to a third of the rate of the rest)."""
    rng, by_length = np.random.default_rng(0), np.random.default_rng(1).permutation(n)
    rank, counts, draws = np.argsort(by_length), np.zeros(n), 4000
    for _ in range(draws):
        idx = etarl.length_bucketed_batch(by_length, batch_size, rng)
        assert len(np.unique(idx)) == len(idx) == min(batch_size, n)
        assert np.ptp(rank[idx]) < (16 * batch_size if n >= 8 * batch_size else n)   # within one bucket
        counts[idx] += 1
    rate = counts[by_length] / (draws * min(batch_size, n) / n)      # by length; 1.0: drawn as often as the average
    tenths = rate.reshape(10, -1).mean(1)
    assert np.abs(tenths - 1).max() < 0.15, tenths                    # the sliding window: 0.23-0.38 at the ends


@pytest.mark.parametrize("world", ["grid", "ant"])
def test_bf16_autocast_changes_the_loss_only_by_rounding(world, data):
    """Under the bfloat16 autocast of PretrainConfig(bf16=True) the losses come out in float32 and within
    rounding of the float32 ones, and the residual stream stays float32 (the ant's linear encoder included)."""
    if world == "grid":
        model, batch = _model(), data[0].batch(np.arange(16), "cpu")
    else:
        model, gen = _hawk(), torch.Generator().manual_seed(0)
        batch = {"obs": torch.randn(4, 13, model.obs_dim, generator=gen),
                 "actions": torch.randn(4, 12, 8, generator=gen), "mask": torch.ones(4, 12, dtype=torch.bool)}
    exact, m = model.loss(batch), batch["mask"].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.loss(batch)
        stream = model(batch["obs"][:, :-1], return_residuals=True)["residuals"]
        logits = mixed["out"]["logits"]                               # the head ran in bfloat16, the loss reads
        read = -(model.action_head.log_prob(logits.float(), batch["actions"]) * m).sum() / m.sum()   # it in float32
    assert logits.dtype == torch.bfloat16 and mixed["action_nll"].item() == read.item()
    assert mixed["loss"].dtype == torch.float32 and all(e.dtype == torch.float32 for e in stream)
    for k in ("action_nll", "obs_nll"):
        assert abs(mixed[k].item() - exact[k].item()) < 0.02 * abs(exact[k].item())
        assert mixed[k].item() != exact[k].item()                     # the autocast did act


def test_pretrain_runs_in_bf16_only_when_asked(data):
    """PretrainConfig(bf16=True) moves pretraining's losses by rounding only; without it they are exactly repeatable."""
    losses = {False: [], True: []}
    for bf16 in (False, True, False):
        cfg = etarl.PretrainConfig(steps=3, batch_size=16, warmup=1, eval_every=10**6, bf16=bf16)
        losses[bf16].append(etarl.pretrain(_model(), *data, cfg, progress=False)["loss"])
    assert losses[False][0] == losses[False][1]
    assert losses[True][0] != losses[False][0] and np.allclose(losses[True][0], losses[False][0], rtol=0.02)


def test_rglru_recurrence_ignores_a_bf16_autocast():
    """The RG-LRU runs in float32 under a bfloat16 autocast, where a_t up to 0.999 would round to 0.996 or 1:
    same input, bit-identical states; a bfloat16 input gives float32 states."""
    rglru, x = _hawk().blocks[0].mixer.rglru, torch.randn(2, 50, 32)
    y = rglru(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rglru(x)[0], y) and rglru(x.bfloat16())[0].dtype == torch.float32


def test_bf16_run_is_its_own_configuration(tmp_path):
    """Run(bf16=True) pretrains in mixed precision without touching the preset, and a run folder made one way
    refuses the other."""
    run = etarl.Run("tiny", out=str(tmp_path), progress=False, bf16=True)
    assert run.cfg.pretrain.bf16 and not etarl.get_preset("tiny").pretrain.bf16
    with pytest.raises(ValueError, match=r"another configuration \(pretrain.bf16: True in the folder, False now\)"):
        etarl.Run("tiny", out=str(tmp_path), progress=False)


def test_probe_recovers_a_linear_code_and_not_noise():
    """The probe finds a linearly encoded label (~1.0) and stays near chance on random labels."""
    torch.manual_seed(0)
    y = torch.randint(0, 4, (2000,))
    x = torch.randn(2000, 16) + 6 * F.one_hot(y, 16).float()
    cfg = etarl.ProbeConfig()
    assert etarl.fit_probe(x[:1000], y[:1000], x[1000:], y[1000:], 4, cfg) > 0.95
    noise = torch.randint(0, 4, (2000,))
    assert etarl.fit_probe(x[:1000], noise[:1000], x[1000:], noise[1000:], 4, cfg) < 0.32


def test_supervised_controllers_lower_the_action_nll(trained):
    """Controllers selected by the true subgoal explain the expert's actions better than the base model."""
    model, _, train, test = trained
    cfg = etarl.ControlConfig(rank=8, steps=200, batch_size=32, lr=1e-2)
    ctrl, _ = etarl.train_controllers(model, train, layer=1, cfg=cfg, progress=False)
    batch = test.batch(np.arange(200), "cpu")
    with torch.no_grad():
        base = model.loss(batch)["action_nll"]
        controlled = model.loss(batch, ctrl(batch["subgoal"]))["action_nll"]
    assert controlled < base - 0.02


def test_train_controllers_trains_a_given_module(trained):
    """A module passed as `ctrl` is the one trained and returned, whatever its form (the experiments train other
    edits than Eq. 1's this way): here full-rank controllers although the config asks for rank 8."""
    model, _, train, _ = trained
    given = etarl.SubgoalControllers(4, model.cfg.d_model, layer=1, rank=0)
    cfg = etarl.ControlConfig(rank=8, steps=20, batch_size=16, lr=1e-2)
    ctrl, history = etarl.train_controllers(model, train, layer=1, cfg=cfg, progress=False, ctrl=given)
    assert ctrl is given and given.U.abs().sum() > 0 and len(history["action_nll"]) == 20


def test_frozen_base_model_does_not_change(trained):
    """Training controllers leaves every base-model parameter untouched."""
    model, _, train, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    etarl.train_controllers(model, train, layer=1, cfg=etarl.ControlConfig(rank=4, steps=5, batch_size=16),
                            progress=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_rollout_replays_the_recorded_episode(data):
    """Greedy actions chosen step by step in the environment equal the argmax of a full forward pass
    over the recorded observations (no off-by-one between acting and training)."""
    model = _model()
    out = etarl.rollout(model, "0-1-2-3", n=8, seed=3, greedy=True, record=True)
    T = out["obs"].shape[1] - 1
    logits = model(torch.as_tensor(out["obs"][:, :T]))["logits"]
    live = np.arange(T) < out["length"][:, None]
    np.testing.assert_array_equal(logits.argmax(-1).numpy()[live], out["actions"][live])


@pytest.mark.parametrize("control", [None, "subgoal", "subgoal full rank", "internal", "compile"])
def test_rollout_that_drops_ended_episodes_plays_the_same_episodes(control, data):
    """rollout cuts ended episodes out of its batch. Sampled grid episodes (so the random streams must line up too)
    are the ones the full batch plays, action for action: without control, with the supervised controllers switched
    by subgoal (low rank, and full rank, a per-episode mixture), and under internal RL's hook over the
    metacontroller's gate and over CompILE's (which reads the observations), whose records agree on every step
    before each end."""
    learner, n = _internal(), 64
    if control == "compile":
        torch.manual_seed(0)
        cpl = _compile(learner.model).eval()
        with torch.no_grad():                                        # a gate that fires about half the time,
            cpl.boundary.weight.mul_(30)                             # by what it reads
            hazard = cpl.boundary(cpl.boundary_rnn(cpl.embed(data[0].batch(np.arange(64), "cpu")["obs"]))[0])
            cpl.boundary.bias -= hazard.median()
        learner = etarl.InternalRL(learner.model, cpl, hidden=16)
    with torch.no_grad():
        learner.policy.mean.weight.normal_(0, 0.3)                   # the policy's state matters to its codes
    ctrl = etarl.SubgoalControllers(4, 32, layer=1, rank=0 if control == "subgoal full rank" else 4)
    with torch.no_grad():
        for p in ctrl.parameters():
            p.normal_(0, 0.3)                                        # an edit with a visible effect
    runs, records = [], []
    for drop in (True, False):
        agent = etarl.InternalAgent(learner.meta, learner.policy, n, torch.Generator().manual_seed(0))
        hooked = control in ("internal", "compile")
        fn = agent.at if hooked else None if control is None else etarl.subgoal_control_fn(ctrl)
        runs.append(etarl.rollout(learner.model, "0-1-2-3", n, seed=5, control_fn=fn, record=True, drop_ended=drop))
        records.append(agent.record() if hooked else {})
    cut, full = runs
    assert (full["length"] < full["length"].max()).mean() >= 0.25   # so the batch was cut at least once
    for k in ("length", "progress", "success"):
        np.testing.assert_array_equal(cut[k], full[k])
    live = np.arange(full["actions"].shape[1]) < full["length"][:, None]
    np.testing.assert_array_equal(cut["actions"][live], full["actions"][live])
    np.testing.assert_allclose(cut["logp"][live], full["logp"][live], rtol=0, atol=1e-5)
    for k in records[0]:
        torch.testing.assert_close(records[0][k][torch.as_tensor(live)], records[1][k][torch.as_tensor(live)])
    if records[0]:
        assert 0.1 < records[0]["fire"][:, 1:][torch.as_tensor(live[:, 1:])].float().mean() < 0.9


def test_cut_cache_steps_the_kept_episodes_as_the_whole_batch():
    """What the ant's rollout relies on when it drops ended episodes, checked directly (a whole ant rollout
    cannot be: a smaller batch rounds its matmuls differently, 1e-7, and the physics grows that into other
    episodes, differently on one thread and on two): after BaseModel.keep_episodes, the attention's key/value
    cache and the Hawk's recurrent state step the kept episodes exactly as the whole batch steps them."""
    for model in (_model(), _hawk()):
        obs = torch.randn(6, 10, model.obs_dim)
        keep = torch.tensor([0, 2, 5])
        whole, cut = model.new_cache(), model.new_cache()
        for t in range(10):
            if t == 4:
                model.keep_episodes(cut, keep)
            full = model.step(obs[:, t], whole)["logits"]
            part = model.step(obs[keep if t >= 4 else slice(None), t], cut)["logits"]
            torch.testing.assert_close(part, full[keep] if t >= 4 else full, rtol=0, atol=1e-5)


def test_quality_gate_refuses_a_bad_model():
    """Later stages refuse a base model that fails the gate, with a message naming the gate."""
    with pytest.raises(RuntimeError, match="quality gate"):
        etarl.require_gate({"passed": False, "sp_determined": 0.5, "probe_mid": 0.25}, "metacontroller")
    etarl.require_gate({"passed": True, "sp_determined": 0.97, "probe_mid": 0.6}, "metacontroller")


def test_bad_configuration_raises_clear_errors():
    """Unknown presets, environments and encoders are named in the error."""
    with pytest.raises(ValueError, match="preset"):
        etarl.get_preset("huge")
    with pytest.raises(ValueError, match="environment"):
        etarl.build_model(etarl.ModelConfig(), env="mars")
    with pytest.raises(ValueError, match="n_heads"):
        etarl.build_model(etarl.ModelConfig(d_model=30, n_heads=4))
    with pytest.raises(ValueError, match="encoder"):
        etarl.build_model(etarl.ModelConfig(encoder="conv3d"))
    with pytest.raises(ValueError, match="max_distance"):
        etarl.build_model(etarl.ModelConfig(max_distance=16))
    with pytest.raises(ValueError, match="n_buckets"):
        etarl.build_model(etarl.ModelConfig(n_buckets=1))
    with pytest.raises(ValueError, match="batch_episodes"):
        etarl.train_rl(None, "0-1", etarl.RLConfig(batch_episodes=1), lr=1e-3)
    bandit = _Bandit()
    with pytest.raises(ValueError, match="2 episodes"):
        etarl.ppo_update(bandit, torch.optim.AdamW(bandit.parameters()), bandit.act(None, 1, 0), etarl.RLConfig())
    with pytest.raises(SystemExit):
        etarl.main(["--env", "mars"])


def test_tiny_pipeline_writes_its_artefacts_and_resumes(tmp_path):
    """`python etarl.py --preset tiny` writes results.json, figures and a report; a second call reuses them."""
    results = etarl.Run("tiny", seed=0, out=str(tmp_path), progress=False).results()
    for f in ("results.json", "report.md", "pretrain.png", "probes_controllers.png", "base.pt", "train.npz"):
        assert (tmp_path / f).exists(), f
    assert json.loads((tmp_path / "results.json").read_text())["gate_passed"] == results["gate_passed"]
    mtime = (tmp_path / "base.pt").stat().st_mtime
    run = etarl.Run("tiny", seed=0, out=str(tmp_path), progress=False)
    run.results()
    assert (tmp_path / "base.pt").stat().st_mtime == mtime
    if not results["gate_passed"]:                                    # the tiny model fails the gate
        assert "meta_f1" not in results
        with pytest.raises(RuntimeError, match="quality gate"):
            run.metacontroller()


def test_pipeline_metacontroller_uses_the_remedies_and_its_baselines_eq3(tmp_path, monkeypatch):
    """The cpu and tiny presets train their own metacontroller with the remedies that make it switch at the
    subgoal boundaries (the KL paid per switch, binary switches: deviation 7), and the forced-switch and
    co-trained baselines and Fig. 7's sweep by the paper's Eq. 3, with every remedy at MetaConfig's default. The
    metacontroller's StreamCache, built once, also serves the forced-switch baseline (its base model is as frozen)."""
    plain = etarl.MetaConfig()
    for name in ("cpu", "tiny"):
        cfg = etarl.get_preset(name)
        assert cfg.meta.kl_per_switch and cfg.meta.gumbel_switch and cfg.meta.read_norm
        assert all(getattr(cfg.meta_eq3, k) == getattr(plain, k) for k in etarl.ALIGNED), name
    trained, train = [], etarl.train_metacontroller
    monkeypatch.setattr(etarl, "train_metacontroller", lambda *a, **k: trained.append(a[1:3]) or train(*a, **k))
    run = etarl.Run("tiny", out=str(tmp_path), progress=False)
    run.metacontroller(force=True), run.meta_forced(), run.co_trained(), run.rate_distortion(force=True)
    (main_data, main), (forced_data, forced), (co_data, co), *sweep = trained
    assert isinstance(main_data, etarl.StreamCache) and forced_data is main_data and co_data is run.meta_data()
    sweep = [c for _, c in sweep]
    assert main == run.cfg.meta
    assert forced == dataclasses.replace(run.cfg.meta_eq3, force_switch=True)
    assert co == dataclasses.replace(run.cfg.meta_eq3, co_train=True, steps=run.cfg.sweep.co_train_steps)
    varied = dict(alpha=0.0, co_train=False, steps=0)                # the only fields a sweep point sets
    assert len(sweep) == 4 and all(dataclasses.replace(c, **varied) == dataclasses.replace(run.cfg.meta_eq3, **varied)
                                   for c in sweep)


# ==================================================================================================
# Metacontroller (etarl.py section 7)
# ==================================================================================================
def _meta(model, **kw):
    torch.manual_seed(0)
    return etarl.Metacontroller(model.cfg.d_model, len(model.blocks) // 2, etarl.MetaConfig(**kw))


def test_gate_beta_one_takes_the_new_code_and_beta_zero_keeps_the_old(data):
    """Eq. (17) with the paper's direction: beta = 1 gives z_t = z~_t, beta = 0 keeps z_t-1."""
    model, batch = _model(), data[0].batch(np.arange(4), "cpu")
    e = model(batch["obs"][:, :-1], return_residuals=True)["residuals"][1]
    lengths = batch["mask"].sum(1)
    forced = _meta(model, force_switch=True)(e, lengths, sample=False)
    torch.testing.assert_close(forced["z"], forced["mu"])              # z~ = mu without sampling
    closed = _meta(model, switch_bias=-100.0)(e, lengths, sample=False)  # a gate that never opens...
    assert (closed["beta"][:, 0] == 1).all() and closed["beta"][:, 1:].max() < 1e-6
    torch.testing.assert_close(closed["z"], closed["mu"][:, :1].expand_as(closed["z"]))   # ...keeps z_0 = z~_0
    meta = _meta(model)                      # a switching unit that fires while z_t-1 is the zero start, then never
    first_step = lambda t, z_prev: torch.where((z_prev == 0).all(-1, keepdim=True), 100.0, -100.0)
    meta.switch_logits = lambda e, h_prev: first_step
    out = meta(e, lengths, sample=False)
    assert out["beta"][:, 0].min() > 0.999 and out["beta"][:, 1:].max() < 1e-6
    torch.testing.assert_close(out["z"], out["mu"][:, :1].expand_as(out["z"]))   # the first code, kept


def test_metacontroller_low_rank_controller_is_b_a_transpose(data):
    """The decoded controller applies e + U e with U = B A^T, built explicitly, per step."""
    model = _model()
    meta = _meta(model)
    torch.manual_seed(3)
    z, e = torch.randn(2, 5, 8), torch.randn(2, 5, 32)
    control = meta.decode(z)                                          # banks (J, D, R) mixed per token
    A, B = (torch.einsum("btj,jdr->btdr", control.mix, bank) for bank in (control.A, control.B))
    U = B @ A.transpose(-1, -2)
    torch.testing.assert_close(control(e), torch.einsum("btij,btj->bti", U, e))


def test_rate_distortion_sweep_resumes_from_its_finished_points(data, tmp_path, monkeypatch):
    """A sweep killed during its last point trains only that point again: the finished ones come from the
    points file unchanged, and the rows come back in sweep order."""
    model, cfg, path = etarl.freeze(_model()), etarl.get_preset("tiny"), tmp_path / "points.json"
    sweep = lambda: etarl.rate_distortion(model, model.cfg, data[0], data[1], cfg.meta_eq3, cfg.sweep, False, path)
    rows = sweep()
    assert [(r["base"], r["alpha"]) for r in rows] == [("frozen", 0.0), ("frozen", 1.0), ("co-trained", 0.0),
                                                       ("co-trained", 1.0)]
    path.write_text(json.dumps(json.loads(path.read_text())[:-1]))   # as if killed during the last point
    trained, train = [], etarl.train_metacontroller
    monkeypatch.setattr(etarl, "train_metacontroller", lambda *a, **k: trained.append(a[2].alpha) or train(*a, **k))
    again = sweep()
    assert trained == [rows[-1]["alpha"]] and again[:-1] == rows[:-1]
    assert [(r["base"], r["alpha"]) for r in again] == [(r["base"], r["alpha"]) for r in rows]


def test_rate_distortion_seeds_start_at_first_seed(data, tmp_path, monkeypatch):
    """A sweep's seeds are first_seed, first_seed + 1, ... (Run passes 3 x --seed): its finished points of
    those seeds are kept from the points file, and points of other seeds are not."""
    model, cfg, path = etarl.freeze(_model()), etarl.get_preset("tiny"), tmp_path / "points.json"
    path.write_text(json.dumps([{"base": base, "alpha": alpha, "seed": seed} for seed in (0, 2)
                                for base in ("frozen", "co-trained") for alpha in cfg.sweep.alphas]))
    monkeypatch.setattr(etarl, "train_metacontroller", lambda *a, **k: pytest.fail("a finished point trained again"))
    for first in (2, 0):
        rows = etarl.rate_distortion(model, model.cfg, data[0], data[1], cfg.meta_eq3, cfg.sweep, False, path, first)
        assert len(rows) == 2 * len(cfg.sweep.alphas) and {r["seed"] for r in rows} == {first}


def test_every_metacontroller_parameter_gets_a_gradient(data):
    """The loss reaches every parameter, the switching unit and the non-causal embedding included."""
    model, batch = _model(), data[0].batch(np.arange(8), "cpu")
    etarl.freeze(model)
    meta = _meta(model)
    etarl.meta_loss(model, meta, batch, alpha=0.1)["loss"].backward()
    for name, p in meta.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_metacontroller_loss_ignores_padding(data):
    """Appending masked garbage steps changes neither the action NLL nor the KL."""
    model = etarl.freeze(_model())
    meta = _meta(model)
    short, padded = _short_and_padded(data[0])
    a = etarl.meta_loss(model, meta, short, 0.1, sample=False)
    b = etarl.meta_loss(model, meta, padded, 0.1, sample=False)
    torch.testing.assert_close(a["action_nll"], b["action_nll"])
    torch.testing.assert_close(a["kl"], b["kl"])


def test_metacontroller_evaluation_does_not_depend_on_its_batches(data):
    """meta_outputs split into batches of a few episodes (as a step budget splits the ant's) gives what one batch
    gives on every valid step: the same beta and z, and the same means over those steps."""
    model = etarl.freeze(_model())
    meta, test = _meta(model).eval(), data[1].subset(np.arange(20))
    whole, split = etarl.meta_outputs(model, meta, test), etarl.meta_outputs(model, meta, test, batch_size=3)
    m = whole["mask"]
    for k in ("beta", "z"):
        np.testing.assert_allclose(whole[k][m], split[k][m], atol=1e-5)
    for k in ("action_nll", "kl"):
        assert whole[k] == pytest.approx(split[k], rel=1e-5)
    binary = _meta(model, gumbel_switch=True)                          # left in training mode: still no noise
    a, b = etarl.meta_outputs(model, binary.train(), test), etarl.meta_outputs(model, binary.eval(), test)
    np.testing.assert_array_equal(a["beta"], b["beta"])


def test_evaluation_batches_cover_every_episode_once_within_the_step_budget():
    """Long episodes (the ant's 500 steps) shrink the batches to the step budget; short ones keep batch_size."""
    long = etarl.evaluation_batches(np.array([500] * 200), batch_size=256, max_steps=25_600)
    short = etarl.evaluation_batches(np.array([100] * 600), batch_size=256, max_steps=25_600)
    assert [len(b) for b in long] == [51, 51, 51, 47] and [len(b) for b in short] == [256, 256, 88]
    for batches, n in ((long, 200), (short, 600)):
        assert np.array_equal(np.concatenate(batches), np.arange(n))


def test_per_step_embedding_reads_the_future_and_ignores_padding():
    """MetaConfig(per_step_embedding=True): s_t changes when a later step changes, not when padding does; the
    default s is one vector for the whole episode."""
    torch.manual_seed(0)
    e, lengths = torch.randn(3, 7, 32), torch.tensor([7, 4, 2])
    later, padding = e.clone(), e.clone()
    later[0, 6] += 1.0
    padding[1, 4:] = 99.0
    meta = etarl.Metacontroller(32, 1, etarl.MetaConfig(rank=4, per_step_embedding=True))
    s = meta.sequence_embedding(e, lengths)
    assert s.shape == (3, 7, meta.cfg.n_s)
    assert not torch.allclose(s[0, 0], meta.sequence_embedding(later, lengths)[0, 0])
    torch.testing.assert_close(s[1, :4], meta.sequence_embedding(padding, lengths)[1, :4])
    whole = etarl.Metacontroller(32, 1, etarl.MetaConfig(rank=4)).sequence_embedding(e, lengths)
    torch.testing.assert_close(whole, whole[:, :1].expand_as(whole))


def test_sequence_embedding_equals_a_bidirectional_gru_over_packed_sequences():
    """Eq. 13 run as two GRUs over the padded batch, the backward one on each episode reversed in place, gives what a
    bidirectional nn.GRU with the same weights gives over packed sequences: its two end states, and its per-step
    states (zero on padding); with episodes of one step and padding past the longest too. Weights saved from such a
    bidirectional GRU (`embed`, as before the split) load into the two."""
    torch.manual_seed(0)
    e, lengths = torch.randn(3, 9, 32), torch.tensor([7, 4, 1])
    for per_step in (False, True):
        meta = etarl.Metacontroller(32, 1, etarl.MetaConfig(rank=4, per_step_embedding=per_step))
        both = nn.GRU(32, meta.cfg.n_s, batch_first=True, bidirectional=True)
        with torch.no_grad():
            for name, p in meta.embed_fwd.named_parameters():
                getattr(both, name).copy_(p), getattr(both, name + "_reverse").copy_(getattr(meta.embed_bwd, name))
        packed = nn.utils.rnn.pack_padded_sequence(e, lengths, batch_first=True, enforce_sorted=False)
        states, last = both(packed)
        if per_step:
            states, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True, total_length=9)
            want = meta.embed_out(states)
        else:
            want = meta.embed_out(torch.cat([last[0], last[1]], -1))[:, None].expand(-1, 9, -1)
        torch.testing.assert_close(meta.sequence_embedding(e, lengths), want)
    old = {k: v for k, v in meta.state_dict().items() if not k.startswith(("embed_fwd.", "embed_bwd."))}
    old.update({f"embed.{k}": v for k, v in both.state_dict().items()})
    loaded = etarl.Metacontroller(32, 1, meta.cfg)
    loaded.load_state_dict(old)
    for (name, a), b in zip(meta.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_read_norm_reads_the_stream_up_to_scale_and_edits_it_raw():
    """MetaConfig(read_norm=True): the metacontroller reads LayerNorm(e_t), so scaling the residual stream leaves
    its gate and codes unchanged (not so by default), and its edit U_t e_t, applied to the raw stream, scales along."""
    torch.manual_seed(0)
    e, lengths = torch.randn(2, 6, 32) + 0.5, torch.tensor([6, 4])
    for read_norm in (True, False):
        meta = etarl.Metacontroller(32, 1, etarl.MetaConfig(rank=4, read_norm=read_norm)).eval()
        a, b = meta(e, lengths, sample=False), meta(3 * e, lengths, sample=False)
        same = torch.allclose(a["beta"], b["beta"], atol=1e-5) and torch.allclose(a["mu"], b["mu"], atol=1e-5)
        assert same == read_norm
        edit = etarl.MetaControl(meta, lengths, sample=False)
        assert torch.allclose(edit(3 * e), 3 * edit(e), atol=1e-4) == read_norm
        z = torch.zeros(2, meta.cfg.n_z)                            # the internal-RL gate reads the same way
        (_, h), (_, h3) = meta.gate_step(None, e[:, 0], None, z), meta.gate_step(None, 3 * e[:, 0], None, z)
        assert torch.allclose(h, h3, atol=1e-5) == read_norm


def test_step_by_step_gate_fires_where_training_time_beta_exceeds_a_half():
    """Internal RL's gate (gate_step, one step at a time from e_t, h_t-1 and z_t-1) fires exactly where the
    training-time forward pass, which computes the switching unit's e_t, h_t-1 part for all steps at once, has
    beta > 0.5, given the same codes."""
    torch.manual_seed(0)
    meta = etarl.Metacontroller(32, 1, etarl.MetaConfig(rank=4)).eval()
    e = 5 * torch.randn(5, 12, 32)                                     # betas from about 0.36 to 0.73
    out = meta(e, torch.full((5,), 12), sample=False)
    state, fired = None, []
    for t in range(12):
        fire, state = meta.gate_step(state, e[:, t], None, out["z"][:, t - 1] if t else None)
        fired.append(fire)
    fired, beta = torch.stack(fired, 1), out["beta"]
    assert 0.1 < fired[:, 1:].float().mean() < 0.9                   # both decisions occur (t = 0 always fires)
    away = (beta - 0.5).abs() > 1e-4                                  # not on the threshold itself
    assert torch.equal(fired[away], (beta > 0.5)[away]) and away.float().mean() > 0.95
    h, z = torch.randn(5, 12, 32), torch.randn(5, 8)                  # the split is the MLP on [e_t, h_t-1, z_t-1]
    torch.testing.assert_close(meta.switch_logits(e, h)(7, z), meta.switch(torch.cat([e[:, 7], h[:, 7], z], -1)))


def test_binary_switch_metacontroller_evaluates_as_internal_rl_acts():
    """With gumbel_switch, evaluation takes beta = H(logit) (0 or 1), not sigmoid(logit): the code is held exactly
    between switches, and the switches are where gate_step fires, so the analyses see the gate internal RL uses."""
    torch.manual_seed(0)
    meta = etarl.Metacontroller(32, 1, etarl.MetaConfig(rank=4, gumbel_switch=True)).eval()
    e = 5 * torch.randn(5, 12, 32)
    out = meta(e, torch.full((5,), 12), sample=False)
    beta, z = out["beta"], out["z"]
    assert set(beta.unique().tolist()) == {0.0, 1.0}
    prob = out["switch_prob"][:, 1:]                                    # the gate's probability stays soft
    assert ((prob > 0) & (prob < 1)).all() and torch.equal(prob > 0.5, beta[:, 1:] > 0.5)
    held = beta[:, 1:] == 0
    assert torch.equal(z[:, 1:][held], z[:, :-1][held])              # z_t = z_t-1 exactly where no switch
    state, fired = None, []
    for t in range(12):
        fire, state = meta.gate_step(state, e[:, t], None, z[:, t - 1] if t else None)
        fired.append(fire)
    assert torch.equal(torch.stack(fired, 1), beta > 0.5)


def test_logvar_init_starts_a_precise_posterior():
    """MetaConfig(logvar_init=-6): the untrained encoder's posterior std is about exp(-3) = 0.05 on any input;
    by default (PyTorch's init) it is about 1."""
    torch.manual_seed(0)
    e, lengths = torch.randn(4, 9, 32), torch.tensor([9, 9, 5, 2])
    std = lambda **kw: (etarl.Metacontroller(32, 1, etarl.MetaConfig(rank=4, **kw))(e, lengths)["logvar"] / 2).exp()
    assert std(logvar_init=-6.0).sub(np.exp(-3)).abs().max() < 0.02
    assert std().sub(1).abs().max() < 0.5


def test_free_bits_stop_penalising_the_kl_below_the_floor(data):
    """MetaConfig(free_bits=f): each code dimension's KL (mean over valid steps) costs max(KL, f), so with a floor
    above every dimension's KL the penalty is the constant n_z f and the encoder's mean gets no KL gradient."""
    model, batch = etarl.freeze(_model()), data[0].batch(np.arange(8), "cpu")
    plain, floored = _meta(model), _meta(model, free_bits=100.0)
    a = etarl.meta_loss(model, plain, batch, alpha=0.5, sample=False)
    b = etarl.meta_loss(model, floored, batch, alpha=0.5, sample=False)
    torch.testing.assert_close(a["loss"], a["action_nll"] + 0.5 * a["kl"])
    torch.testing.assert_close(b["kl"], a["kl"])
    torch.testing.assert_close(b["loss"], b["action_nll"] + 0.5 * 100.0 * plain.cfg.n_z)
    kl_grad = lambda out, meta: torch.autograd.grad(out["loss"] - out["action_nll"], meta.encoder[0].weight)[0]
    assert kl_grad(a, plain).abs().max() > 0 and kl_grad(b, floored).abs().max() == 0


def test_kl_per_switch_pays_only_for_the_codes_taken(data):
    """MetaConfig(kl_per_switch=True), not Eq. 3: each step's KL is weighted by its beta in the penalty. With the
    gate shut after t = 0 only the first code is paid for; the reported rate stays the unweighted KL."""
    model, batch = etarl.freeze(_model()), data[0].batch(np.arange(8), "cpu")
    plain, per_switch = _meta(model, switch_bias=-30.0), _meta(model, switch_bias=-30.0, kl_per_switch=True)
    a = etarl.meta_loss(model, plain, batch, alpha=0.5, sample=False)
    b = etarl.meta_loss(model, per_switch, batch, alpha=0.5, sample=False)
    first = 0.5 * (a["mu"].pow(2) + a["logvar"].exp() - 1 - a["logvar"])[:, 0].sum() / batch["mask"].sum()
    torch.testing.assert_close(b["kl"], a["kl"])
    torch.testing.assert_close(b["loss"], b["action_nll"] + 0.5 * first)
    assert a["loss"] > b["loss"] + 0.1 * first


def test_kl_weight_waits_for_the_delay_then_ramps_to_alpha():
    """MetaConfig.kl_delay steps at alpha = 0, then a linear warm-up over kl_warmup steps; both 0: Eq. 3's alpha."""
    weights = lambda **kw: [etarl.kl_weight(s, etarl.MetaConfig(alpha=0.2, **kw)) for s in (0, 9, 10, 20, 30, 99)]
    assert weights() == [0.2] * 6
    assert weights(kl_delay=10) == [0.0, 0.0, 0.2, 0.2, 0.2, 0.2]
    assert weights(kl_delay=10, kl_warmup=20) == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.2])


def test_learning_rate_schedules_start_at_lr_and_end_at_their_floor():
    """cosine_decay holds lr until its start and reaches min_frac * lr at its end; pretraining warms up linearly."""
    assert [etarl.cosine_decay(1.0, s, 10, 20, 0.1) for s in (0, 10, 15, 20, 30)] == pytest.approx(
        [1.0, 1.0, 0.55, 0.1, 0.1])
    cfg = etarl.PretrainConfig(steps=110, lr=2.0, warmup=10, min_lr_frac=0.1)
    assert [etarl.lr_at(s, cfg) for s in (0, 9, 10, 60, 110)] == pytest.approx([0.2, 2.0, 2.0, 1.1, 0.2])


def test_metacontroller_lr_decay_changes_only_the_steps_after_it(data):
    """MetaConfig(lr_decay_from=n) trains exactly as the constant lr up to step n and differently after it."""
    model = etarl.freeze(_model())
    cfg = etarl.MetaConfig(steps=6, batch_size=8)
    runs = []
    for decay in (None, 3):
        snapshots = {}
        etarl.train_metacontroller(
            model, data[0], dataclasses.replace(cfg, lr_decay_from=decay), progress=False,
            callback=lambda step, m: snapshots.update({step: [p.detach().clone() for p in m.parameters()]}))
        runs.append(snapshots)
    for a, b in zip(runs[0][4], runs[1][4]):                           # steps 0-3 at lr: identical
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(runs[0][6], runs[1][6]))


def test_a_given_metacontroller_trains_on(data, tmp_path):
    """train_metacontroller(meta=m) continues training m (here reloaded from disk) instead of a fresh one."""
    model, cfg = etarl.freeze(_model()), etarl.MetaConfig(steps=3, batch_size=8)
    etarl.save_meta(_meta(model), tmp_path / "meta.pt")
    given = etarl.load_meta(tmp_path / "meta.pt")
    before = [p.detach().clone() for p in given.parameters()]
    meta, history = etarl.train_metacontroller(model, data[0], cfg, progress=False, meta=given)
    assert meta is given and len(history["loss"]) == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, meta.parameters()))
    with pytest.raises(ValueError, match="co_train"):                 # its loss would lack the observation term
        etarl.train_metacontroller(_model(), data[0], dataclasses.replace(cfg, co_train=True), meta=given)


def test_evaluating_along_the_way_does_not_change_metacontroller_training(data):
    """train_metacontroller's callback runs after every step; evaluating the metacontroller there (eval mode, a
    held-out pass) leaves the trained weights exactly as without it (experiments/metacontroller.py curve)."""
    model = etarl.freeze(_model())
    cfg = etarl.MetaConfig(steps=4, batch_size=8, **{**etarl.ALIGNED, "kl_delay": 1, "kl_warmup": 1})
    plain, _ = etarl.train_metacontroller(model, data[0], cfg, progress=False)
    seen = []

    def evaluate(step, meta):
        seen.append(step)
        etarl.meta_outputs(model, meta.eval(), data[1].subset(np.arange(8)))
        meta.train()

    watched, _ = etarl.train_metacontroller(model, data[0], cfg, progress=False, callback=evaluate)
    assert seen == [1, 2, 3, 4]
    for a, b in zip(plain.parameters(), watched.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mixer", ["attention", "hawk"])
def test_stream_cache_batches_give_the_whole_models_loss(data, mixer):
    """A StreamCache holds each episode's uncontrolled stream before block l exactly where forward computes it
    (padding: zeros), and its batches, run through blocks l.. only, give the whole model's controlled loss."""
    model = etarl.freeze(_model(mixer=mixer))
    meta, idx = _meta(model), np.array([5, 17, 3, 250, 42])
    cache = etarl.StreamCache(model, data[0], meta.layer, batch_size=64)
    full, cached = data[0].batch(idx, "cpu"), cache.batch(idx, "cpu")
    assert "obs" not in cached and cached["layer"] == meta.layer == 1
    expected = model(full["obs"][:, :-1], return_residuals=True)["residuals"][meta.layer] * full["mask"][..., None]
    torch.testing.assert_close(cached["stream"], expected, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    a = etarl.meta_loss(model, meta, full, alpha=0.1)
    torch.manual_seed(0)
    b = etarl.meta_loss(model, meta, cached, alpha=0.1)
    for k in ("loss", "action_nll", "kl"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="next-observation loss needs the batch's observations"):
        model.loss(cached)
    with pytest.raises(ValueError, match="control at layer 0 cannot edit a stream given at layer 1"):
        model(cached["stream"], etarl.Control(0, U=torch.zeros(32, 32)), from_layer=1)


def test_metacontroller_trains_alike_on_the_stream_cache(data, monkeypatch):
    """MetaConfig(cache_stream=True) changes the speed, not the training: every batch comes from the cache, with
    the same draws and steps, so the same losses and weights up to float rounding; and it refuses a base model that
    trains (co_train)."""
    model = etarl.freeze(_model())
    cfg = etarl.MetaConfig(steps=5, batch_size=16, **{**etarl.ALIGNED, "kl_delay": 1, "kl_warmup": 2})
    plain, plain_history = etarl.train_metacontroller(model, data[0], cfg, progress=False)
    drawn, batch = [], etarl.StreamCache.batch
    monkeypatch.setattr(etarl.StreamCache, "batch", lambda self, idx, device: drawn.append(len(idx)) or
                        batch(self, idx, device))
    cached, cached_history = etarl.train_metacontroller(model, data[0], dataclasses.replace(cfg, cache_stream=True),
                                                        progress=False)
    assert drawn == [16] * 5
    np.testing.assert_allclose(cached_history["loss"], plain_history["loss"], rtol=1e-4)
    for a, b in zip(plain.parameters(), cached.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cache_stream=True.*frozen base model"):
        etarl.train_metacontroller(_model(), data[0], dataclasses.replace(cfg, cache_stream=True, co_train=True),
                                   progress=False)
    drawn.clear()                                                       # a cache given as the data serves as well
    given, _ = etarl.train_metacontroller(model, etarl.StreamCache(model, data[0], 1), cfg, progress=False)
    assert drawn == [16] * 5
    for a, b in zip(cached.parameters(), given.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="StreamCache.*needs a frozen base model"):
        etarl.train_metacontroller(model, etarl.StreamCache(model, data[0], 1), dataclasses.replace(cfg, co_train=True),
                                   progress=False)


def test_zero_decoder_leaves_the_base_model_unchanged(data):
    """With f_hyp's output layer at zero (U = 0), the controlled model is exactly the base model."""
    model, batch = _model(), data[0].batch(np.arange(4), "cpu")
    meta = _meta(model)
    torch.nn.init.zeros_(meta.hyper[-1].weight)
    obs = batch["obs"][:, :-1]
    controlled = model(obs, etarl.MetaControl(meta, batch["mask"].sum(1)))["logits"]
    torch.testing.assert_close(controlled, model(obs)["logits"], rtol=0, atol=0)


def test_metacontroller_training_lowers_the_loss_and_leaves_the_base_frozen(trained):
    """A short run lowers the Eq. (3) loss on held-out episodes; the frozen base model does not move."""
    model, _, train, test = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = test.batch(np.arange(200), "cpu")
    cfg = etarl.MetaConfig(steps=80, batch_size=32, lr=3e-3, alpha=0.05)
    untrained = _meta(model, **{k: getattr(cfg, k) for k in ("alpha",)})
    meta, history = etarl.train_metacontroller(model, train, cfg, progress=False)
    with torch.no_grad():
        start = etarl.meta_loss(model, untrained, batch, cfg.alpha, sample=False)["loss"]
        end = etarl.meta_loss(model, meta, batch, cfg.alpha, sample=False)["loss"]
    assert end < start - 0.02
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_switch_alignment_scores_known_cases():
    """Switches exactly on the boundaries give F1 = 1; always switching gives low precision; +-1 tolerated."""
    subgoal = np.array([[0, 0, 0, 1, 1, 1, 2, 2, 2, -1]])
    mask = subgoal >= 0
    exact = np.array([[1, 0, 0, 1, 0, 0, 1, 0, 0, 0]], float)
    s = etarl.switch_alignment(exact, subgoal, mask)
    assert s["f1"] == 1.0 and s["switches_per_episode"] == 3 == s["subgoals_per_episode"]
    assert s["quasi_binary"] == 1.0
    late = np.array([[1, 0, 0, 0, 1, 0, 0, 1, 0, 0]], float)
    assert etarl.switch_alignment(late, subgoal, mask)["f1"] == 1.0
    always = np.ones((1, 10)) * 0.8
    s = etarl.switch_alignment(always, subgoal, mask)
    assert s["precision"] < 0.3 and s["recall"] == 1.0 and s["quasi_binary"] == 0.0
    assert etarl.switching_regime(s) == "always switching"
    assert etarl.switching_regime(etarl.switch_alignment(exact, subgoal, mask)) == "aligned"
    off = np.array([[1, 1, 0, 0, 0, 0, 0, 0, 1, 0]], float)           # as many switches, none near a boundary
    s = etarl.switch_alignment(off, subgoal, mask)
    assert s["f1"] == 0.0 and s["switches_per_episode"] == 3 and etarl.switching_regime(s).startswith("misaligned")
    once = etarl.switch_alignment(np.array([[1, 0, 0, 0.2, 0, 0, 0.05, 0, 0, 0]]), subgoal, mask)
    assert once["quasi_binary"] == 7 / 8                               # t = 0 (beta 1 by construction) not counted
    assert etarl.switching_regime({**once, "kl": 0.5}) == "one code per episode"      # a used code, never replaced
    for stats in (once, s, etarl.switch_alignment(exact, subgoal, mask)):             # posterior collapse: KL ~ 0
        assert etarl.switching_regime({**stats, "kl": 1e-4}).startswith("collapsed")


def test_switch_alignment_matches_as_many_pairs_as_possible():
    """Switches and boundaries are paired one-to-one within +-1 step as often as possible, also where boundaries
    lie one step apart (as cell crossings can): boundaries 5, 6 and switches 6, 7 make two pairs, not one. Checked
    against a brute-force maximum matching on random small cases."""
    subgoal = np.array([[0, 0, 0, 0, 0, 1, 2, 2, 2, 2]])
    s = etarl.switch_alignment(np.array([[1, 0, 0, 0, 0, 0, 1, 1, 0, 0]], float), subgoal, subgoal >= 0)
    assert s["recall"] == 1.0 and s["precision"] == 1.0

    def most_pairs(switches, bounds):                                 # every way to pair them, the best
        if not switches:
            return 0
        first, rest = switches[0], switches[1:]
        return max([most_pairs(rest, bounds)] + [1 + most_pairs(rest, bounds - {b}) for b in bounds
                                                  if abs(b - first) <= 1])
    rng = np.random.default_rng(0)
    for _ in range(300):
        subgoal = np.cumsum(rng.random((1, 9)) < 0.4, 1)
        beta = (rng.random((1, 9)) < 0.4).astype(float)
        s = etarl.switch_alignment(beta, subgoal, np.ones_like(subgoal, bool))
        truth = set(np.flatnonzero(np.diff(subgoal[0])) + 1)
        n = most_pairs([t for t in np.flatnonzero(beta[0]) if t > 0], truth)
        assert round(s["recall"] * max(len(truth), 1)) == n


def test_segments_tile_each_episode_from_switch_to_switch():
    """Segments start at t = 0 and at every switch (beta > 0.5) within the episode's length, and end where the
    next one starts; a segment's code is z at its last step."""
    beta = np.array([[0.2, 0.1, 0.9, 0.3, 0.6, 0.0], [0.0, 0.7, 0.0, 0.0, 0.9, 0.9]])    # row 2: length 4
    mask = np.arange(6) < np.array([[6], [4]])
    z = np.arange(12, dtype=float).reshape(2, 6, 1)
    out = {"beta": beta, "mask": mask, "z": z, "subgoal": np.zeros((2, 6), np.int64)}
    assert etarl.segments(out).tolist() == [[0, 0, 2], [0, 2, 4], [0, 4, 6], [1, 0, 1], [1, 1, 4]]
    assert etarl.segment_codes(out)[0][:, 0].tolist() == [1, 3, 5, 6, 9]


def test_code_purity_is_one_for_codes_that_name_their_subgoal():
    """Segments whose codes cluster by subgoal have purity 1; random codes do not."""
    rng = np.random.default_rng(0)
    g = np.repeat(rng.integers(0, 4, (60, 3)), 5, axis=1)             # 3 segments of 5 steps per episode
    beta = np.zeros(g.shape)
    beta[:, ::5] = 1
    centres = rng.normal(size=(4, 8)) * 5
    outputs = {"beta": beta, "subgoal": g, "mask": np.ones(g.shape, bool),
               "z": centres[g] + rng.normal(size=g.shape + (8,)) * 0.1}
    assert etarl.code_purity(outputs) == 1.0
    outputs["z"] = rng.normal(size=g.shape + (8,))
    assert etarl.code_purity(outputs) < 0.6


def test_run_folder_refuses_another_configuration(tmp_path):
    """Reusing a run folder made with another configuration is an error, not a silent mix of artefacts."""
    etarl.Run("tiny", out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        etarl.Run("cpu", out=str(tmp_path), progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["mixer"], saved["rl"]                          # written before these fields existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    etarl.Run("tiny", out=str(tmp_path), progress=False)             # their defaults keep the old behaviour
    saved["model"]["d_model"] = 7
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="another configuration"):
        etarl.Run("tiny", out=str(tmp_path), progress=False)


def test_noisy_training_data_is_no_silent_stand_in_for_noise_free_data(tmp_path):
    """The controllers and metacontrollers train on noise-free episodes: with a noisy training set and no
    noise-free set of their own (n_meta = 0), asking for their data is an error that names the fix. The
    ant's torque noise does not make a grid training set noisy."""
    run = etarl.Run("tiny", out=str(tmp_path), progress=False)
    run.cfg = dataclasses.replace(run.cfg, data=dataclasses.replace(run.cfg.data, noise=0.1))
    assert run.meta_data() is run.data()[0]                           # eps = 0: the training set itself
    run = etarl.Run("tiny", out=str(tmp_path / "noisy"), progress=False)
    run.cfg = dataclasses.replace(run.cfg, data=dataclasses.replace(run.cfg.data, eps=0.1))
    with pytest.raises(ValueError, match="n_meta > 0"):
        run.meta_data()


# ==================================================================================================
# Internal RL (etarl.py section 8)
# ==================================================================================================
def _internal(force_switch=False, switch_bias=0.0, rank=4):
    model = _model()
    meta = _meta(model, rank=rank, force_switch=force_switch).eval()
    with torch.no_grad():
        meta.switch[-1].bias.fill_(switch_bias)
        meta.hyper[-1].weight.mul_(20)                                # a decoder with a visible effect
    return etarl.InternalRL(model, meta, hidden=16)


def test_rl_seeds_follow_the_runs_seed():
    """rl_experiment scans the lr on its first seed and runs the next ones at the best lr; a run with
    --seed N (first_seed = 3N) draws its RL layouts and noise from seeds no other run's RL uses."""
    class Recorder(nn.Linear):                                        # a learner that never succeeds
        def __init__(self, seeds):
            super().__init__(1, 1)
            self.seeds = seeds

        def act(self, task, n, seed):
            self.seeds.append(seed)
            return {"success": np.zeros(n), "progress": np.zeros(n), "decisions": 1.0, "old_logp": torch.zeros(1)}

    cfg = etarl.RLConfig(episodes=4, batch_episodes=2, lrs=(1e-3, 1e-2), seeds=3)
    used = {}
    for first in (0, 3):
        seeds = used.setdefault(first, [])
        out = etarl.rl_experiment({"internal": lambda: Recorder(seeds)}, parse_task("0-1"), cfg, False, first)
        assert len(out["internal"]["runs"]) == 3
    rl_seeds = lambda layout_seeds: {x // 10**7 for x in layout_seeds}   # train_rl: seed * 10**7 + ...
    assert rl_seeds(used[0]) == {0, 1, 2} and rl_seeds(used[3]) == {3, 4, 5}
    assert used[0].count(0) == len(cfg.lrs)                           # the scan: batch 0 of seed 0, once per lr


@pytest.mark.parametrize("rank", [4, 0])
def test_internal_rl_acts_only_when_the_switch_fires_and_matches_the_full_forward_pass(rank):
    """Algorithm 1: the code changes only where H(beta - 0.5) fires (always at t = 0), the gate is the
    metacontroller's own switching unit, and the acting-time action log-probs equal a full forward pass
    over the recorded observations with the recorded codes decoded into controllers (low-rank or full)."""
    learner = _internal(switch_bias=0.3, rank=rank)
    agent = etarl.InternalAgent(learner.meta, learner.policy, 16, torch.Generator().manual_seed(0))
    out = etarl.rollout(learner.model, "0-1-2-3", 16, seed=5, control_fn=agent.at, record=True)
    rec, T = agent.record(), out["actions"].shape[1]
    fire, z, e = rec["fire"], rec["z"], rec["e"]
    live = np.arange(T) < out["length"][:, None]                     # recorded steps of ended episodes are zeros
    later = torch.as_tensor(live[:, 1:])
    assert fire[:, 0].all() and 0 < fire[:, 1:][later].float().mean() < 1
    changed = (z[:, 1:] != z[:, :-1]).any(-1)
    assert (changed == fire[:, 1:])[later].all()                      # a new code exactly where the gate fires
    h, _ = learner.meta.history(e)
    h_prev = F.pad(h, (0, 0, 1, 0))[:, :-1]
    beta = torch.sigmoid(learner.meta.switch(torch.cat([e[:, 1:], h_prev[:, 1:], z[:, :-1]], -1)))[..., 0]
    torch.testing.assert_close(fire[:, 1:][later], (beta > 0.5)[later], rtol=0, atol=0)
    logits = learner.model(torch.as_tensor(out["obs"][:, :T]), control=learner.meta.decode(z))["logits"]
    logp = learner.model.action_head.log_prob(logits, torch.as_tensor(out["actions"]))
    np.testing.assert_allclose(logp.detach().numpy()[live], out["logp"][live], atol=1e-4)


@pytest.mark.parametrize("force_switch", [False, True])
def test_policy_replay_gives_the_log_probs_recorded_while_acting(force_switch):
    """The PPO update replays the policy over stored residual streams: same log-probs as at acting time."""
    learner = _internal(force_switch)
    batch = learner.act("0-1-2-3", 16, seed=2)
    if force_switch:
        valid = np.arange(batch["mask"].shape[1]) < batch["mask"].sum(1).numpy()[:, None]
        assert batch["mask"].numpy()[valid].all()                    # a new code at every live step
    torch.testing.assert_close(learner.log_prob(batch)[batch["mask"]], batch["old_logp"][batch["mask"]])
    length = batch["mask"].shape[1] - batch["mask"].flip(1).int().argmax(1)   # one past the last decision
    padding = torch.arange(batch["mask"].shape[1]) >= length[:, None]
    assert not (batch["mask"] & padding).any() and batch["mask"][:, 0].all()


def test_raw_action_replay_gives_the_log_probs_recorded_while_acting():
    learner = etarl.RawActionRL(_model())
    batch = learner.act("0-1-2-3", 16, seed=2)
    m = batch["mask"]
    torch.testing.assert_close(learner.log_prob(batch)[m], batch["old_logp"][m], atol=1e-5, rtol=0)
    assert ((batch["progress"] == 4) == batch["success"]).all()       # colours completed: 4 = the whole task


class _Bandit:
    """A one-step 'environment': success when a Gaussian action's first coordinate exceeds 1."""

    def __init__(self, reward_depends_on_action=True):
        self.mean, self.depends = torch.nn.Parameter(torch.zeros(2)), reward_depends_on_action

    def parameters(self):
        return [self.mean]

    def act(self, task, n, seed):
        z = self.mean.detach() + torch.randn(n, 1, 2, generator=torch.Generator().manual_seed(seed))
        noise = torch.Generator().manual_seed(-seed - 1)
        win = z[:, 0, 0] > 1 if self.depends else torch.rand(n, generator=noise) < 0.2
        return {"success": win.numpy(), "progress": win.numpy().astype(float), "z": z,
                "old_logp": self.log_prob({"z": z}).detach(),
                "mask": torch.ones(n, 1, dtype=torch.bool), "decisions": 1.0}

    def log_prob(self, batch):
        return -0.5 * ((batch["z"] - self.mean) ** 2).sum(-1)


def test_ppo_raises_the_success_of_rewarded_actions_and_ignores_noise():
    """The critic-free PPO of App. C.5 moves the policy towards rewarded actions; a reward that does not
    depend on the action, or a batch where every return is equal, leaves it (nearly) where it was."""
    cfg = etarl.RLConfig(episodes=30 * 128, batch_episodes=128)
    bandit = _Bandit()
    history = etarl.train_rl(bandit, None, cfg, lr=0.05, progress=False)
    assert np.mean(history["success"][:3]) < 0.25 and np.mean(history["success"][-3:]) > 0.6
    assert bandit.mean.detach()[0] > 3                                # well past the threshold at 1
    noise = _Bandit(reward_depends_on_action=False)
    history = etarl.train_rl(noise, None, cfg, lr=0.05, progress=False)
    assert noise.mean.detach().abs().max() < 1.5 and np.mean(history["success"][-3:]) < 0.3   # a random walk
    flat = _Bandit()
    batch = flat.act(None, 64, 0)
    batch["success"][:] = False
    etarl.ppo_update(flat, torch.optim.AdamW(flat.parameters(), lr=1.0), batch, cfg)
    assert (flat.mean.detach() == 0).all()


def test_ppo_ignores_masked_steps():
    """Steps outside the mask (no decision, or padding) do not move the policy, whatever their log-probs."""
    def update(old_logp_at_masked):
        torch.manual_seed(0)
        bandit = _Bandit()
        batch = bandit.act(None, 64, 0)
        batch["success"][:8] = True
        batch["z"] = torch.cat([batch["z"], torch.full_like(batch["z"], 50.0)], 1)     # a second, masked step
        batch["old_logp"] = torch.cat([batch["old_logp"], torch.full_like(batch["old_logp"], old_logp_at_masked)], 1)
        batch["mask"] = torch.cat([batch["mask"], torch.zeros_like(batch["mask"])], 1)
        etarl.ppo_update(bandit, torch.optim.AdamW(bandit.parameters(), lr=0.1), batch, etarl.RLConfig())
        return bandit.mean.detach()
    moved = update(0.0)
    assert moved.abs().sum() > 0 and torch.isfinite(moved).all()
    torch.testing.assert_close(update(-1e4), moved)                   # would overflow exp() if not masked


def test_segment_end_distributions_are_normalised_and_respect_the_episode():
    torch.manual_seed(0)
    hazard, start = torch.randn(5, 12), torch.tensor([0, 3, 7, 10, 11])
    valid = torch.arange(12) < torch.tensor([12, 9, 12, 11, 12])[:, None]
    log_q, log_p = etarl.segment_end_distributions(hazard, start, valid, 4.0)
    for log_d in (log_q, log_p):
        torch.testing.assert_close(log_d.exp().sum(1), torch.ones(5))
        impossible = torch.cat([(torch.arange(12) <= start[:, None]) | ~valid, torch.zeros(5, 1, dtype=torch.bool)], 1)
        assert (log_d.exp()[impossible] == 0).all()
    assert log_q[3, -1].exp() == 1                                    # begun at the last valid step: runs to the end


def test_success_interval_covers_zero_successes():
    lo, hi = etarl.success_interval(0, 20_000)
    assert lo == 0 and 3 / 20_000 < hi < 4 / 20_000           # about the 'rule of three'
    lo, hi = etarl.success_interval(30, 100)
    assert lo < 0.3 < hi


def _compile(model, **kw):
    torch.manual_seed(0)
    cfg = etarl.CompILEConfig(**{"hidden": 16, "rank": 4, "length_mean": 4.0, **kw})
    return etarl.CompILE(model.obs_dim, model.cfg.d_model, len(model.blocks) // 2, cfg)


@pytest.mark.parametrize("sample", [True, False])
def test_compile_segments_partition_each_episode(data, sample):
    """The M segment masks are 0/1, disjoint, contiguous, and cover exactly the valid steps."""
    model, batch = _model(), data[0].batch(np.arange(24), "cpu")
    out = _compile(model)(batch["obs"][:, :-1], batch["mask"].sum(1), sample=sample)
    masks = out["masks"].detach()
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(masks.sum(1), batch["mask"].float())
    for ep in masks:
        for m in ep:
            on = torch.nonzero(m)[:, 0]
            assert len(on) == 0 or (on == torch.arange(on[0], on[-1] + 1)).all()
    assert (out["kl_b"] >= -1e-5).all() and (out["kl_z"] >= 0).all()
    assert (masks.sum(-1) > 0).sum(1).float().mean() > 1               # episodes do get cut


def test_compile_gate_step_matches_its_training_time_hazard(data):
    """Internal RL's CompILE gate, run step by step, fires exactly where the hazard of the full pass > 0.5."""
    model, batch = _model(), data[0].batch(np.arange(8), "cpu")
    cpl = _compile(model)
    with torch.no_grad():
        obs = batch["obs"][:, :-1]
        cpl.boundary.bias -= cpl(obs, batch["mask"].sum(1))["hazard"].median()   # hazards on both sides of 0.5
        hazard = cpl(obs, batch["mask"].sum(1))["hazard"]
        state, fires = None, []
        for t in range(obs.shape[1]):
            fire, state = cpl.gate_step(state, None, obs[:, t], None)
            fires.append(fire)
    fires = torch.stack(fires, 1)
    assert fires[:, 0].all()
    torch.testing.assert_close(fires[:, 1:], hazard[:, 1:] > 0, rtol=0, atol=0)
    assert 0 < fires[:, 1:].float().mean() < 1


def test_every_compile_parameter_gets_a_gradient_and_a_zero_decoder_changes_nothing(data):
    model, batch = _model(), data[0].batch(np.arange(16), "cpu")
    cpl = _compile(model)
    etarl.compile_loss(model, cpl, batch)["loss"].backward()
    for name, p in cpl.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        cpl.hyper[-1].weight.zero_()
        cpl.hyper[-1].bias.zero_()
        nll = etarl.compile_loss(model, cpl, batch)["action_nll"]
    torch.testing.assert_close(nll, model.loss(batch, obs_loss=False)["action_nll"])


def test_gumbel_sigmoid_switch_is_binary_with_the_right_mean_and_a_gradient():
    """The Gumbel-sigmoid switch (MetaConfig.gumbel_switch) samples beta in {0, 1} with P(1) = sigmoid(logit)
    and passes a gradient to the logit."""
    torch.manual_seed(0)
    logit = torch.tensor([-2.0, 0.0, 1.5]).repeat(20_000, 1).requires_grad_(True)
    beta = etarl.gumbel_sigmoid(logit)
    assert set(beta.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(beta.detach().mean(0), torch.sigmoid(logit[0].detach()), atol=0.01, rtol=0)
    beta.sum().backward()
    assert (logit.grad > 0).all()


def test_metacontroller_draws_its_switch_noise_as_per_step_draws_would():
    """In training, forward draws the Gumbel-sigmoid noise of every step ahead of its loop over time: the same
    switches, in the same random stream, as drawing it step by step (the switching unit's own Eq. 16 and 17)."""
    torch.manual_seed(0)
    meta = etarl.Metacontroller(32, 1, etarl.MetaConfig(rank=4, **etarl.ALIGNED)).train()
    e, lengths = torch.randn(16, 9, 32), torch.full((16,), 9)
    torch.manual_seed(1)
    out = meta(e, lengths)
    torch.manual_seed(1)                                               # the same stream, drawn step by step
    read = meta.read(e)
    h_prev = F.pad(meta.history(read)[0], (0, 0, 1, 0))[:, :-1]
    mu, logvar = meta.encoder(torch.cat([read, h_prev, meta.sequence_embedding(read, lengths)], -1)).chunk(2, -1)
    z_tilde, z, betas = meta.sample_code(mu, logvar), torch.zeros(16, meta.cfg.n_z), [torch.ones(16)]
    z = z_tilde[:, 0]
    for t in range(1, 9):
        logit = meta.switch(torch.cat([read[:, t], h_prev[:, t], z], -1))
        beta = etarl.gumbel_sigmoid(logit, meta.cfg.switch_temperature)
        z = beta * z_tilde[:, t] + (1 - beta) * z
        betas.append(beta[:, 0])
    torch.testing.assert_close(out["beta"], torch.stack(betas, 1), rtol=0, atol=0)
    torch.testing.assert_close(out["z"][:, -1], z)
    assert 0 < out["beta"][:, 1:].mean() < 1                             # some switches and some holds


# ==================================================================================================
# Ant-pinpad (envs.py)
# ==================================================================================================
def test_ant_env_checker_and_vector_env_equal_the_single_env():
    check_env(AntPinpad(task="0-1-2-3"), skip_render_check=True)
    vec = gymnasium.make_vec("AntPinpad-v0", num_envs=3, vectorization_mode="sync", task="0-1-2-3")
    single = AntPinpad(task="0-1-2-3")
    obs, _ = vec.reset(seed=5)
    np.testing.assert_array_equal(obs[2], single.reset(seed=7)[0])    # episode i of seed s is seed s + i
    action = np.random.default_rng(0).uniform(-1, 1, (3, 8)).astype(np.float32)
    np.testing.assert_array_equal(vec.step(action)[0][2], single.step(action[2])[0])
    vec.close()


def _teleport(env, cell, height=0.55):
    """Put the ant's torso at the centre of `cell` (a hand-built situation for the rules)."""
    env.data.qpos[:2], env.data.qpos[2], env.data.qvel[:] = envs.ant_cell_centre(cell, env.G), height, 0
    return env.step(np.zeros(8))


def test_ant_visit_rule_wrong_colour_walls_and_falling():
    """Entering the next colour advances the task, completing it pays 1; a wrong colour, a wall cell,
    leaving the grid and a torso height outside [0.2, 1] each end the episode with reward 0."""
    env = AntPinpad(task="2-0")
    env.reset(seed=0)
    c = env.colour_cells
    _, r, term, _, info = _teleport(env, c[2])
    assert (info["visited"], info["progress"], r, term) == (2, 1, 0.0, False)
    _, r, term, _, info = _teleport(env, c[0])
    assert (info["progress"], r, term) == (2, 1.0, True)
    for bad in ("wrong colour", "wall", "off grid", "fallen"):
        env.reset(seed=0)
        if bad == "wrong colour":
            out = _teleport(env, c[1])
        elif bad == "wall":
            out = _teleport(env, env.wall_cells[0])
        elif bad == "off grid":
            env.data.qpos[:2] = [env.G * envs.ANT_CELL, 0.0]
            out = env.step(np.zeros(8))
        else:
            out = _teleport(env, env.cell, height=1.5)                # the start cell: free; above 1.0 m
        assert out[2] and out[1] == 0.0, bad


def test_ant_observation_layout():
    """The documented layout: symlog proprioception, global x, y in [-1, 1] over the grid, object offsets
    relative to the torso, and the position inside the torso's cell."""
    env = AntPinpad(task="0-1")
    obs, info = env.reset(seed=4)
    G, cell, xy = env.G, envs.ANT_CELL, info["xy"]
    assert obs.shape == (41,)
    np.testing.assert_allclose(obs[:27], envs.symlog(np.concatenate([env.data.qpos[2:], env.data.qvel])), rtol=1e-6)
    np.testing.assert_allclose(obs[27:29], xy / (G * cell / 2), rtol=1e-6)
    objects = envs.ant_cell_centre(np.concatenate([info["colour_cells"], info["wall_cells"]]), G) - xy
    np.testing.assert_allclose(obs[29:39], objects.ravel() / (G * cell), rtol=1e-5, atol=1e-7)
    row, col = divmod(info["agent"], G)
    corner = envs.ant_cell_centre(info["agent"], G) - cell / 2                # the cell's lower-left corner
    np.testing.assert_allclose(obs[39:], (xy - corner) / cell, rtol=1e-5)
    assert envs.ant_cell(envs.ant_cell_centre(np.arange(G * G), G), G).tolist() == list(range(G * G))


def test_ant_render_draws_the_layout():
    env = AntPinpad(task="0-1", render_mode="rgb_array")
    env.reset(seed=0)
    image = env.render(96, 96)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8 and image.std() > 10
    env.close()


def test_ant_expert_walks_the_tasks():
    """The planner-plus-gait expert solves most episodes (measured 0.92 over 200 pretraining-task episodes
    and 0.76 over 200 of 0-1-2-3; here 10 fixed episodes of each, 0.9 measured)."""
    assert envs.ant_expert_success(None, 10, seed=0) >= 0.7
    assert envs.ant_expert_success("0-1-2-3", 10, seed=10**6) >= 0.7


def test_ant_gait_walks_every_way():
    """The gait moves the torso along any commanded direction, at several cm per step, without falling (from
    this start; from some others it leaves its height range in its first steps, see ANT_GAIT)."""
    for angle in np.deg2rad([0, 120, 250]):
        assert envs.gait_speed(envs.ANT_GAIT, [np.cos(angle), np.sin(angle)], steps=100, seed=1) > 0.02



# ==================================================================================================
# The ant's base model: Hawk SSM and Gaussian actions (etarl.py section 3)
# ==================================================================================================
def _hawk(**kw):
    torch.manual_seed(0)
    cfg = etarl.ModelConfig(**{"d_model": 32, "n_layers": 2, "d_mlp": 64, "mixer": "hawk", "head": "gaussian",
                               "encoder": "linear", "obs_weight": 10.0, **kw})
    return etarl.build_model(cfg, env="ant").eval()


@pytest.mark.parametrize("controlled", [False, True])
def test_hawk_step_by_step_equals_full_forward(controlled):
    """The SSM's cached state (convolution inputs and RG-LRU state) reproduces the full pass, controlled or not."""
    model = _hawk()
    obs = torch.randn(3, 9, model.obs_dim)
    control = None
    if controlled:
        torch.manual_seed(1)
        control = etarl.Control(1, A=torch.randn(3, 32, 4) / 6, B=torch.randn(3, 32, 4) / 6)
    full = model(obs, None if control is None else etarl.Control(1, control.A[:, None], control.B[:, None]))["logits"]
    cache = model.new_cache()
    step = [model.step(obs[:, t], cache, None if control is None else control.step_view())["logits"] for t in range(9)]
    torch.testing.assert_close(torch.stack(step, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 100])
def test_linear_scan_equals_the_loop(T):
    """The GPU's log-depth scan of the RG-LRU gives the loop's states and gradients, for any length and a
    nonzero initial state (the gates span the trained range, down to a_t ~ 1e-4)."""
    gen = torch.Generator().manual_seed(T)
    a = torch.rand(3, T, 5, generator=gen).pow(4).clamp(min=1e-4).requires_grad_()
    b, h0 = torch.randn(3, T, 5, generator=gen).requires_grad_(), torch.randn(3, 5, generator=gen)
    h, loop = h0, []
    for t in range(T):                                   # the recurrence written out, against both functions
        h = a[:, t] * h + b[:, t]
        loop.append(h)
    loop = torch.stack(loop, 1)
    torch.testing.assert_close(etarl.linear_loop(a, b, h0), loop, rtol=0, atol=0)
    scan = etarl.linear_scan(a, b, h0)
    torch.testing.assert_close(scan, loop)
    w = torch.randn(3, T, 5, generator=gen)
    grads = [torch.autograd.grad((y * w).sum(), (a, b)) for y in (scan, loop)]
    for g_scan, g_loop in zip(*grads):
        torch.testing.assert_close(g_scan, g_loop)


def test_ant_ego_encoder_turns_the_world_into_the_torso_frame():
    """AntEgoEncoder's extra features are every object's offset and the torso's velocity rotated by minus the
    torso's yaw (checked against MuJoCo's own torso rotation right after reset, when the torso is level), and
    the model with encoder="ego" still steps as it runs whole sequences."""
    env = envs.AntPinpad()
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        to_torso = env.data.xmat[1].reshape(3, 3).T[:2, :2]                  # world -> torso frame (level torso)
        offsets = envs.ant_cell_centre(np.concatenate([env.colour_cells, env.wall_cells]), 4) - env.data.qpos[:2]
        expected = np.concatenate([(offsets / (4 * envs.ANT_CELL)) @ to_torso.T, env.data.qvel[None, :2] @ to_torso.T])
        features = etarl.AntEgoEncoder(len(obs), 8, n_objects=5).ego_features(torch.tensor(obs))
        np.testing.assert_allclose(features.numpy(), expected.ravel(), atol=1e-5)
    model = _hawk(encoder="ego")
    assert isinstance(model.encoder, etarl.AntEgoEncoder)
    obs = torch.randn(2, 6, model.obs_dim)
    cache = model.new_cache()
    steps = torch.stack([model.step(obs[:, t], cache)["logits"] for t in range(6)], 1)
    torch.testing.assert_close(steps, model(obs)["logits"], atol=1e-5, rtol=1e-4)


def test_gaussian_head_is_a_diagonal_gaussian():
    head = etarl.GaussianHead(16, 3)
    params, actions = head(torch.randn(5, 16)), torch.randn(5, 3)
    mean, log_std = params.chunk(2, -1)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(head.log_prob(params, actions), expected)
    draws = head.sample(params[:1].expand(20_000, 6), torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws.mean(0), mean[0].detach(), atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0), log_std[0].exp().detach(), atol=0.05, rtol=0.05)


def test_hawk_learns_to_remember_the_previous_observation():
    """Actions that copy the previous step's observation can only be predicted through the recurrent state:
    after a short training the predicted mean follows them (measured: correlation 0.57) and the NLL falls."""
    model = _hawk(obs_weight=0.0).train()
    gen = torch.Generator().manual_seed(0)
    def batch():
        obs = torch.randn(32, 13, model.obs_dim, generator=gen)
        actions = F.pad(obs[:, :-2, :8], (0, 0, 1, 0))                # a_t = o_t-1 (a_0 = 0)
        return {"obs": obs, "actions": actions, "mask": torch.ones(32, 12, dtype=torch.bool)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.loss(batch())["action_nll"].item()
    for _ in range(150):
        loss = model.loss(batch())["loss"]
        opt.zero_grad(), loss.backward(), opt.step()
    b = batch()
    out = model.loss(b)
    mean = out["out"]["logits"][..., :8].detach()
    corr = np.corrcoef(mean[:, 1:].reshape(-1).numpy(), b["actions"][:, 1:].reshape(-1).numpy())[0, 1]
    assert out["action_nll"].item() < first - 2 and corr > 0.4            # a memoryless model: about 0


def test_run_files_are_replaced_whole(tmp_path, monkeypatch):
    """A run's JSON files are written whole or not at all: a write that breaks off keeps the previous file,
    and no temporary file is left behind (processes share run folders, e.g. several diagnostic scripts)."""
    path = tmp_path / "results.json"
    etarl._json_save({"a": 1}, path)
    write_text = Path.write_text

    def broken_write(self, text):                                    # half the file, then the disk is full
        write_text(self, text[:len(text) // 2])
        raise OSError("no space left on device")
    monkeypatch.setattr(Path, "write_text", broken_write)
    with pytest.raises(OSError):
        etarl._json_save({"a": 2, "b": [3] * 100}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    etarl._json_save({"a": 2}, path)
    assert json.loads(path.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_ant_model_configuration_errors_are_named():
    with pytest.raises(ValueError, match="gaussian"):
        etarl.build_model(etarl.ModelConfig(mixer="hawk"), env="ant")
    with pytest.raises(ValueError, match="mixer"):
        etarl.build_model(etarl.ModelConfig(mixer="lstm"))


def test_ant_episodes_replay_in_the_environment_and_batch(tmp_path):
    """Stored ant episodes are exact: replaying the stored torques from the same seed gives the stored
    observations; batches are cut and masked like the grid's; save and load round-trip."""
    data = etarl.generate_ant_episodes(3, seed=11, task="1-0")
    i = int(np.argmax(data.lengths))
    env = AntPinpad(task="1-0")
    obs, info = env.reset(seed=11 + i)
    assert info["subgoal"] == data.subgoal[i, 0] == 1
    for t in range(data.lengths[i]):
        np.testing.assert_array_equal(obs, data.obs[i, t])
        obs, *_ = env.step(data.actions[i, t])
    np.testing.assert_array_equal(obs, data.obs[i, data.lengths[i]])
    batch = data.batch([0, 1, 2], "cpu")
    assert batch["obs"].shape == (3, data.lengths.max() + 1, 41) and batch["actions"].shape[-1] == 8
    torch.testing.assert_close(batch["mask"].sum(1), torch.as_tensor(data.lengths))
    data.save(tmp_path / "ant.npz")
    np.testing.assert_array_equal(etarl.AntEpisodes.load(tmp_path / "ant.npz").obs, data.obs)
    model = _hawk()
    assert torch.isfinite(model.loss(batch)["loss"])                  # the ant model reads ant batches


def test_ant_expert_holds_its_cell_in_a_dead_end():
    """A free cell whose every neighbour is forbidden (reachable only by noise): the expert still acts."""
    env = AntPinpad(task="2")
    env.reset(seed=0)
    env.colour_cells, env.wall_cells = np.array([1, 4, 10, 12]), np.array([15])   # cell 0 is boxed in by 0 and 1
    _teleport(env, 0)
    assert env.cell == 0
    action = envs.ant_expert_action(env)
    assert action.shape == (8,) and np.isfinite(action).all()


def test_ant_expert_plans_around_a_wall_and_walks_towards_the_next_cell():
    """The planner picks the neighbour on a shortest path around a wall and another colour (4x4 grid, row-major
    cells), and the gait's direction is a unit vector from the torso towards that cell's centre."""
    env = AntPinpad(task="2")
    env.reset(seed=0)
    env.colour_cells, env.wall_cells = np.array([1, 13, 7, 15]), np.array([6])    # colour 2 at row 1, col 3
    _teleport(env, 5)                   # row 1, col 1: the wall (cell 6) blocks the way right, colour 0 the way up
    assert env.cell == 5 and envs.ant_expert_next_cell(env) == 9                  # down, then right along row 2
    direction, towards = envs.ant_expert_direction(env), envs.ant_cell_centre(9) - env.data.qpos[:2]
    assert np.isclose(np.linalg.norm(direction), 1) and direction @ towards / np.linalg.norm(towards) > 0.9


def test_zero_init_edit_starts_at_u_zero_and_learns(data):
    """MetaConfig(zero_init_edit=True): the untrained metacontroller leaves the base model exactly unchanged
    (the default init does not: its first edits are large), and one optimiser step makes the edit non-zero."""
    model, batch = _model(), data[0].batch(np.arange(16), "cpu")
    base = model.loss(batch, obs_loss=False)["action_nll"]
    meta = _meta(model, rank=4, zero_init_edit=True)
    torch.testing.assert_close(etarl.meta_loss(model, meta, batch, alpha=0.0)["action_nll"], base, rtol=0, atol=0)
    default = _meta(model, rank=4)
    assert etarl.meta_loss(model, default, batch, alpha=0.0)["action_nll"] != base
    opt = torch.optim.AdamW(meta.parameters(), lr=1e-2)
    etarl.meta_loss(model, meta, batch, alpha=0.1)["loss"].backward()
    opt.step()
    assert etarl.meta_loss(model, meta, batch, alpha=0.0)["action_nll"] != base


# ==================================================================================================
# The ant pipeline: the same functions on the second world (`python etarl.py --env ant`)
# ==================================================================================================
def test_ant_vector_env_equals_single_envs_and_freezes_ended_episodes():
    """AntPinpadVec (GridPinpadVec's interface) steps exactly the single envs of seeds seed + i; an ended
    episode stays frozen (reward 0, not done again) until the next reset."""
    vec, n = envs.AntPinpadVec(3, task="0-1"), 3
    singles = [AntPinpad(task="0-1") for _ in range(n)]
    obs, info = vec.reset(seed=20)
    for i, env in enumerate(singles):
        np.testing.assert_array_equal(obs[i], env.reset(seed=20 + i)[0])
    rng, ended = np.random.default_rng(0), np.zeros(n, bool)
    for t in range(60):
        actions = rng.uniform(-1, 1, (n, 8)).astype(np.float32)
        obs, reward, terminated, truncated, info = vec.step(actions)
        for i, env in enumerate(singles):
            if ended[i]:
                assert reward[i] == 0 and not terminated[i] and not truncated[i]
                continue
            o, r, te, tr, inf = env.step(actions[i])
            np.testing.assert_array_equal(obs[i], o)
            assert ((reward[i], terminated[i], truncated[i], vec.progress[i], vec.agent[i]) ==
                    (r, te, tr, env.progress, inf["agent"]))
            assert vec.subgoal[i] == inf["subgoal"]                    # one colour is one subgoal here
            ended[i] = te or tr
        np.testing.assert_array_equal(vec.done, ended)
    assert ended.any()                                               # the frozen branch was exercised


def _ant_model():
    model = _hawk()
    with torch.no_grad():                                            # a policy that walks somewhere, not falls at once
        model.action_head.proj.bias[8:].fill_(-1.0)
    return model


def test_ant_rollout_replays_the_recorded_episode_and_raw_action_log_probs():
    """The ant rollout has no off-by-one: the greedy torques equal the mean of a full forward pass over the
    recorded observations, and sampled episodes' log-probs replay exactly for the raw-action learner."""
    model = _ant_model()
    out = etarl.rollout(model, "0-1-2-3", n=3, seed=3, greedy=True, record=True, max_steps=80)
    T = out["actions"].shape[1]
    assert T <= 80 and out["xy"].shape == (3, T + 1, 2) and out["obs"].shape == (3, T + 1, 41)
    mean = model.action_head.mode(model(torch.as_tensor(out["obs"][:, :T]))["logits"]).detach().numpy()
    live = np.arange(T) < out["length"][:, None]
    np.testing.assert_allclose(mean[live], out["actions"][live], atol=1e-5)
    learner = etarl.RawActionRL(model)
    batch = learner.act("0-1-2-3", 3, seed=4)
    torch.testing.assert_close(learner.log_prob(batch)[batch["mask"]], batch["old_logp"][batch["mask"]],
                               atol=1e-4, rtol=0)


def test_ant_full_rank_controllers_switch_by_the_current_colour():
    """Supervised controllers on the ant are full-rank (rank 0) and the oracle switch reads the env's current
    colour. On task 1-0, a controller for colour 1 acts from the first step; one for colour 0 leaves every step
    unchanged until the ant has visited colour 1."""
    model = _ant_model()
    plain = etarl.rollout(model, "1-0", 4, seed=1, greedy=True, record=True, max_steps=60)
    for colour in (1, 0):
        ctrl = etarl.SubgoalControllers(4, 32, layer=1, rank=0)
        with torch.no_grad():
            ctrl.U[colour] = torch.randn(32, 32) / 4
        seen = []
        def control_fn(env):
            seen.append(env.subgoal.copy())
            return etarl.subgoal_control_fn(ctrl)(env)
        out = etarl.rollout(model, "1-0", 4, seed=1, control_fn=control_fn, greedy=True, record=True, max_steps=60)
        if colour == 1:
            assert (np.abs(out["actions"][:, 0] - plain["actions"][:, 0]).max(-1) > 1e-4).all()
            continue
        subgoal = np.stack(seen, 1)                                   # (n, T): the colour aimed at before each step
        for i in range(4):
            switched = np.flatnonzero(subgoal[i] == 0)
            before = switched[0] if len(switched) else min(out["length"][i], plain["length"][i])
            np.testing.assert_array_equal(out["actions"][i, :before], plain["actions"][i, :before])


def test_ant_gate_names_its_measures_and_bad_world_or_preset_names_are_errors():
    with pytest.raises(RuntimeError, match="action_r2"):
        etarl.require_gate({"passed": False, "action_r2": 0.3, "probe_mid": 0.2}, "metacontroller", "ant")
    with pytest.raises(ValueError, match="environment"):
        etarl.get_preset("cpu", env="mars")
    with pytest.raises(ValueError, match="preset"):
        etarl.get_preset("ant-cpu")                                   # the ant's presets are chosen with env="ant"
    with pytest.raises(SystemExit):
        etarl.main(["--env", "ant", "--preset", "huge"])
    with pytest.raises(RuntimeError, match="action_r2"):              # the world is read from the report
        etarl.require_gate({"passed": False, "action_r2": 0.3, "probe_mid": 0.2}, "metacontroller")
    model, data = _hawk(), etarl.generate_ant_episodes(4, seed=3)
    gate = etarl.quality_gate(model, data)
    assert gate["action_r2"] < 0.5 and not gate["passed"]             # an untrained model explains little


def test_tiny_ant_pipeline_runs_every_stage_and_resumes(tmp_path):
    """`python etarl.py --env ant --preset tiny --force`: every stage on the ant (the tiny preset runs all four
    baselines), results normalised by the expert's success, the figures written; a second call recomputes nothing."""
    results = etarl.Run("tiny", out=str(tmp_path), progress=False, env="ant").results(force=True)
    assert results["env"] == "ant" and 0 <= results["expert_post_task_success"] <= 1
    for k in ("gate_action_r2", "meta_f1", "forced_f1", "cotrained_f1", "compile_f1", "rl_internal_normalised_success",
              "rl_raw_action_final_success", "rl_compile_final_success", "rl_co_trained_final_success"):
        assert k in results, k
    assert etarl.get_preset("cpu", env="ant").rl.methods == ("internal", "raw_action", "forced_switch")
    for f in ("switching.png", "internal_rl.png", "abstract_actions.png", "pretrain.png", "meta.pt", "meta_forced.pt",
              "noise_free.npz", "compile.pt", "co_base.pt"):
        assert (tmp_path / f).exists(), f
    stamps = lambda: {p.name: p.stat().st_mtime for p in (*tmp_path.glob("*.pt"), *tmp_path.glob("*.npz"))}
    before = stamps()
    run = etarl.Run("tiny", out=str(tmp_path), progress=False, env="ant")
    run.results(force=True)
    assert before == stamps()
    rows = run.rate_distortion(force=True)                            # Fig. 7's sweep builds ant models too
    assert len(rows) == 2 * len(run.cfg.sweep.alphas) * run.cfg.sweep.seeds
    assert {r["base"] for r in rows} == {"frozen", "co-trained"}


def test_ant_episodes_do_not_depend_on_the_number_of_workers():
    one = etarl.generate_ant_episodes(3, seed=40, noise=0.1)
    two = etarl.generate_ant_episodes(3, seed=40, noise=0.1, workers=2)
    for f in ("obs", "actions", "lengths", "subgoal", "success", "task_id"):
        np.testing.assert_array_equal(getattr(one, f), getattr(two, f))
