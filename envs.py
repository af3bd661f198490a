"""The worlds of ETARL: task tables, the gridworld-pinpad environment and its expert (paper App. A, C.1.1).

A pinpad world is a grid with O uniquely coloured cells and W wall cells. A task is a sequence of colours
to visit in order, written "0-1-4-5-0-1". The grid tasks are built from colour pairs (0-1, 2-3, 4-5, 6-7):
one pair is one abstract action, or subgoal, of the hierarchy the paper finds in the model's residual stream.

Contents, in order: task tables and parsing, the observation, layout sampling, `GridPinpad` (a single
gymnasium env), `GridPinpadVec` (N episodes stepped at once in numpy, used for data and evaluation),
shortest-path distances and the expert. Cells are named by flat index `row * G + col` throughout.
Last, `AntPinpad`: the same task logic on gymnasium's MuJoCo ant, with colours and walls as floor regions,
and its expert: the grid planner driving a hand-made trot (`gait_action`, `ant_expert_action`).
"""
import os

import gymnasium
import numpy as np

# ---------------------------------------------------------------- tasks (paper Tables A1, A2)
GRID_PRETRAIN_TASKS: tuple[tuple[int, ...], ...] = (
    (0, 1, 4, 5, 0, 1), (0, 1, 4, 5, 2, 3), (0, 1, 6, 7, 2, 3), (2, 3, 0, 1, 4, 5),
    (2, 3, 6, 7, 2, 3), (2, 3, 6, 7, 4, 5), (4, 5, 0, 1, 4, 5), (4, 5, 0, 1, 6, 7),
    (4, 5, 2, 3, 6, 7), (6, 7, 2, 3, 0, 1), (6, 7, 2, 3, 6, 7), (6, 7, 4, 5, 0, 1),
    (0, 1, 6, 7, 4, 5), (2, 3, 0, 1, 6, 7), (4, 5, 2, 3, 0, 1), (6, 7, 4, 5, 2, 3),
)
GRID_POST_TASK = (0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3)  # pair 0-1 followed by 2-3 is never seen in pretraining
ANT_PRETRAIN_TASKS: tuple[tuple[int, ...], ...] = (
    (0, 3, 2), (1, 0, 3), (2, 1, 0), (3, 2, 1), (0, 2, 0), (0, 2, 1), (0, 3, 1), (1, 0, 2),
    (1, 3, 1), (1, 3, 2), (2, 0, 2), (2, 0, 3), (2, 1, 3), (3, 1, 0), (3, 1, 3), (3, 2, 0),
)
ANT_POST_TASK = (0, 1, 2, 3)  # 0 followed by 1 never occurs in pretraining

ACTIONS = ("up", "right", "down", "left")
MOVES = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]])  # (row, col) displacement of each action

PALETTE = np.array([[230, 25, 75], [245, 130, 48], [255, 225, 25], [60, 180, 75],
                    [70, 240, 240], [0, 130, 200], [145, 30, 180], [240, 50, 230]], np.uint8)


def parse_task(task, num_colours: int = 8) -> tuple[int, ...]:
    """Turn "0-1-2-3" or a sequence of ints into a tuple of colours, checking each is in [0, num_colours).

    Strings are exactly integers joined by "-"; no whitespace is tolerated anywhere.
    """
    if isinstance(task, str):
        parts = task.split("-")
        if not all(p.isdigit() and p.isascii() for p in parts):
            raise ValueError(f"malformed task {task!r}: expected non-negative integers joined by '-', e.g. '0-1-2'")
        colours = tuple(int(p) for p in parts)
    elif isinstance(task, (list, tuple)) or (isinstance(task, np.ndarray) and task.ndim == 1):
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in task):
            raise ValueError(f"task {task!r} must contain only integers")
        colours = tuple(int(c) for c in task)
    else:
        raise ValueError(f"task must be a string like '0-1-2' or a flat sequence of ints, got {task!r}")
    if not colours:
        raise ValueError("task is empty")
    bad = [c for c in colours if not 0 <= c < num_colours]
    if bad:
        raise ValueError(f"task {format_task(colours)} has colours {bad} outside [0, {num_colours})")
    return colours


def format_task(task) -> str:
    """(0, 1, 2) -> "0-1-2"."""
    return "-".join(str(int(c)) for c in task)


# ---------------------------------------------------------------- observation and dynamics (App. A.1)
def grid_observation(agent, colour_cells, wall_cells, G: int = 7) -> np.ndarray:
    """One-hot map of every object, flattened: float32 (..., C*G*G) with C = O + W + 1.

    `obs.reshape(..., C, G, G)[..., c, :, :]` is colour c for c < O, wall c - O for O <= c < O + W (each wall
    has its own identity, as in the paper's G^2 (W + O + 1) = 637 dims), and the agent in the last channel.
    Inputs are flat cell indices and broadcast: agent (...,), colour_cells (..., O), wall_cells (..., W).
    """
    agent, colour_cells, wall_cells = (np.asarray(x) for x in (agent, colour_cells, wall_cells))
    batch = np.broadcast_shapes(agent.shape, colour_cells.shape[:-1], wall_cells.shape[:-1])
    cells = np.concatenate([np.broadcast_to(colour_cells, batch + colour_cells.shape[-1:]),
                            np.broadcast_to(wall_cells, batch + wall_cells.shape[-1:]),
                            np.broadcast_to(agent, batch)[..., None]], axis=-1)  # (..., C)
    obs = np.zeros(cells.shape + (G * G,), np.float32)
    np.put_along_axis(obs, cells[..., None], 1.0, axis=-1)
    return obs.reshape(batch + (-1,))  # (..., C*G*G)


def _move(agent, action, wall_cells, G: int):
    """Cell reached by taking `action` from `agent`; off-grid or into a wall the agent stays (a no-op)."""
    row, col = np.divmod(agent, G)
    d_row, d_col = MOVES[action].T if np.ndim(action) else MOVES[action]
    row, col = row + d_row, col + d_col
    nxt = np.where((row >= 0) & (row < G) & (col >= 0) & (col < G), row * G + col, agent)
    into_wall = (np.asarray(wall_cells) == np.asarray(nxt)[..., None]).any(-1)
    return np.where(into_wall, agent, nxt)


def _entered_colour(before, after, colour_cells):
    """Colour id the agent stepped onto from another cell, else -1 (standing still on a colour is no visit)."""
    on = np.asarray(colour_cells) == np.asarray(after)[..., None]  # (..., O)
    return np.where(on.any(-1) & (np.asarray(before) != after), on.argmax(-1), -1)


# ---------------------------------------------------------------- shortest paths
def _neighbour_table(G: int) -> np.ndarray:
    """(G*G, 4) flat index of each cell's neighbour along each action; G*G stands for 'off the grid'."""
    row, col = np.divmod(np.arange(G * G), G)
    row, col = row[:, None] + MOVES[:, 0], col[:, None] + MOVES[:, 1]
    return np.where((row >= 0) & (row < G) & (col >= 0) & (col < G), row * G + col, G * G)


def unreachable(G: int = 7) -> int:
    """Distance given to cells from which the target cannot be reached (longer than any path)."""
    return 4 * G * G


def grid_distance_to(target_cells, blocked, G: int = 7) -> np.ndarray:
    """Shortest-path distance in moves from every cell to a target, avoiding blocked cells: (N, G*G) int32.

    Vectorised dynamic programming (breadth-first search over all N grids at once): target_cells (N,),
    blocked (N, G*G) bool. Unreachable cells get `unreachable(G)`. A blocked cell's own distance is
    1 + the minimum over its free neighbours (and the target): the agent may stand on a cell that is
    blocked for others, e.g. the colour it has just visited, and still needs its distance home.
    """
    target_cells, chunk = np.asarray(target_cells), 4096
    if len(target_cells) > chunk:  # in chunks that stay in cache, each iterating only until it converges
        return np.concatenate([grid_distance_to(target_cells[i:i + chunk], blocked[i:i + chunk], G)
                               for i in range(0, len(target_cells), chunk)])
    N, far, nbr = len(target_cells), unreachable(G), _neighbour_table(G)
    # Cell-major (G*G + 1, N) so that gathering a neighbour copies whole rows; the extra row is 'off grid'.
    dist = np.full((G * G + 1, N), far, np.int32)
    dist[target_cells, np.arange(N)] = 0
    free = ~np.asarray(blocked, bool).T
    free[target_cells, np.arange(N)] = True

    def relax(d):  # 1 + min over the 4 neighbours, per cell
        best = d[nbr[:, 0]]
        for k in range(1, 4):
            np.minimum(best, d[nbr[:, k]], out=best)
        return np.minimum(best + 1, far)

    for _ in range(G * G):
        new = np.where(free, np.minimum(dist[:-1], relax(dist)), far)
        if np.array_equal(new, dist[:-1]):
            break
        dist[:-1] = new
    return np.where(free, dist[:-1], relax(dist)).T  # (N, G*G)


def colour_distances(colour_cells, wall_cells, G: int = 7) -> np.ndarray:
    """(..., O, G*G) distance from every cell to each colour, avoiding walls and every other colour."""
    colour_cells, wall_cells = np.asarray(colour_cells), np.asarray(wall_cells)
    batch, O = colour_cells.shape[:-1], colour_cells.shape[-1]
    colour = np.zeros(batch + (O, G * G), bool)
    np.put_along_axis(colour, colour_cells[..., None], True, axis=-1)
    wall = np.zeros(batch + (G * G,), bool)
    np.put_along_axis(wall, wall_cells, True, axis=-1)
    blocked = wall[..., None, :] | (colour.any(-2, keepdims=True) & ~colour)  # (..., O, G*G)
    dist = grid_distance_to(colour_cells.reshape(-1), blocked.reshape(-1, G * G), G)
    return dist.reshape(batch + (O, G * G))


# ---------------------------------------------------------------- episodes
def sample_layout(rng: np.random.Generator, G: int = 7, O: int = 8, W: int = 4):
    """Draw (agent_cell, colour_cells (O,), wall_cells (W,)): distinct cells, uniform, without overlap.

    The paper is silent on solvability; without a check the expert fails on enclosed layouts. We
    rejection-sample until every task is solvable: for every colour b, b can be reached from the start
    cell and from every other colour cell by a path that avoids walls and every colour other than b
    (the first cell of the path may be a colour). About 21% of uniform layouts are rejected (G, O, W = 7, 8, 4).
    """
    agent, colour_cells, wall_cells, _ = _sample_layouts([rng], G, O, W)
    return int(agent[0]), colour_cells[0], wall_cells[0]


def _sample_layouts(rngs, G: int, O: int, W: int, max_tries: int = 10_000):
    """`sample_layout` for a list of generators, checking the candidates of all of them at once.

    Each generator only ever makes its own episode's draws, in the same order as alone, so the
    layout drawn from a generator does not depend on the others in the batch. Also returns the
    `colour_distances` (N, O, G*G) of the layouts, which the check computes and the expert uses.
    """
    N, todo = len(rngs), np.arange(len(rngs))
    cells, dist = np.empty((N, 1 + O + W), np.int64), np.empty((N, O, G * G), np.int32)
    for _ in range(max_tries):
        cells[todo] = [rngs[i].choice(G * G, size=1 + O + W, replace=False) for i in todo]
        dist[todo] = colour_distances(cells[todo, 1:1 + O], cells[todo, 1 + O:], G)
        sources = np.take_along_axis(dist[todo], cells[todo, None, :1 + O], axis=2)  # from start and each colour
        todo = todo[~np.all(sources < unreachable(G), axis=(1, 2))]
        if len(todo) == 0:
            return cells[:, 0], cells[:, 1:1 + O], cells[:, 1 + O:], dist
    raise RuntimeError(f"no solvable layout found in {max_tries} tries for G={G}, O={O}, W={W}")


def _draw_episodes(rngs, tasks, G: int, O: int, W: int):
    """The one place episodes are drawn, one per generator: its task (a uniformly drawn pretraining task
    where the task is None), then its layout. `GridPinpad.reset` calls it with a single generator."""
    tasks = [GRID_PRETRAIN_TASKS[rng.integers(len(GRID_PRETRAIN_TASKS))] if task is None else tuple(task)
             for rng, task in zip(rngs, tasks)]
    return (tasks,) + _sample_layouts(rngs, G, O, W)


def _draw_episode(rng: np.random.Generator, task, G: int, O: int, W: int):
    """One episode: (task, agent_cell, colour_cells, wall_cells)."""
    (task,), agent, colour_cells, wall_cells, _ = _draw_episodes([rng], [task], G, O, W)
    return task, int(agent[0]), colour_cells[0], wall_cells[0]


def _check_sizes(G, O, W, T, task, default=(7, 8, 4)):
    for name, value, low in (("G", G, 2), ("O", O, 1), ("W", W, 0), ("T", T, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if O + W + 1 > G * G:
        raise ValueError(f"O + W + 1 = {O + W + 1} objects do not fit on a {G}x{G} grid")
    if task is None and (G, O, W) != default:
        raise ValueError("the pretraining tasks (task=None) are defined for G=%d, O=%d, W=%d only; pass a task"
                         % default)


class GridPinpad(gymnasium.Env):
    """Gridworld-pinpad (paper App. A.1): visit coloured cells in the order the task gives.

    ## Description
    A G x G grid holds O uniquely coloured cells, W wall cells and the agent. The task is a sequence of
    colours; the paper's tasks are made of colour pairs 0-1, 2-3, 4-5, 6-7 (Table A1). A colour counts as
    visited when the agent steps onto it from another cell. Visiting the next colour of the task advances
    it; visiting any other colour ends the episode as a failure.

    ## Action Space
    `Discrete(4)`: 0 up, 1 right, 2 down, 3 left (`ACTIONS`, `MOVES`). Moving off the grid or into a wall
    is a no-op.

    ## Observation Space
    `Box(0, 1, (C*G*G,), float32)` with C = O + W + 1 (637 for the defaults): one-hot maps, channel-major,
    of each colour, each wall (each with its own identity) and the agent; see `grid_observation`. The task
    is not observed: a model must infer it from behaviour, as in the paper.

    ## Rewards
    1 on the step that completes the task, 0 otherwise.

    ## Starting State
    Task first (uniform over the 16 pretraining tasks if none was given), then start, colour and wall
    cells drawn uniformly without overlap among solvable layouts (`sample_layout`). `reset(seed=s)` gives
    the episode `_draw_episode(np.random.default_rng(s), ...)`, the same as `GridPinpadVec` episode i
    for seed s - i.

    ## Episode End
    Terminated on completing the task (reward 1) or on visiting a wrong colour (reward 0); truncated
    after T steps.

    ## Info
    agent (flat cell), colour_cells (O,), wall_cells (W,), task, progress (colours completed), subgoal
    (task[progress] // 2, the colour pair being pursued, -1 once complete), visited (colour entered on
    this step or -1). For evaluation and plots only; never fed to a model.

    ## Arguments
    task (None, "0-1-2" or a sequence of ints), G = 7, O = 8, W = 4, T = 100, render_mode (None or
    "rgb_array").

    ## Version History
    v0: initial version.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, task=None, G: int = 7, O: int = 8, W: int = 4, T: int = 100, render_mode=None):
        _check_sizes(G, O, W, T, task)
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.fixed_task = None if task is None else parse_task(task, O)
        self.G, self.O, self.W, self.T, self.render_mode = G, O, W, T, render_mode
        self.observation_space = gymnasium.spaces.Box(0.0, 1.0, ((O + W + 1) * G * G,), np.float32)
        self.action_space = gymnasium.spaces.Discrete(4)

    def _obs(self):
        return grid_observation(self.agent, self.colour_cells, self.wall_cells, self.G)

    def _info(self, visited: int):
        done = self.progress == len(self.task)
        return {"agent": self.agent, "colour_cells": self.colour_cells.copy(), "wall_cells": self.wall_cells.copy(),
                "task": self.task, "progress": self.progress,
                "subgoal": -1 if done else self.task[self.progress] // 2, "visited": visited}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.task, self.agent, self.colour_cells, self.wall_cells = _draw_episode(
            self.np_random, self.fixed_task, self.G, self.O, self.W)
        self.progress, self.t = 0, 0
        return self._obs(), self._info(-1)

    def step(self, action):
        if np.ndim(action) != 0 or np.asarray(action).dtype.kind not in "iu" or not 0 <= int(action) < 4:
            raise ValueError(f"action must be an integer move in 0..3 (see MOVES), got {action!r}")
        before, self.t = self.agent, self.t + 1
        self.agent = int(_move(before, int(action), self.wall_cells, self.G))
        visited = int(_entered_colour(before, self.agent, self.colour_cells))
        target = self.task[self.progress] if self.progress < len(self.task) else -1
        terminated = visited >= 0 and visited != target  # wrong colour: failure
        if visited >= 0 and not terminated:
            self.progress += 1
            terminated = self.progress == len(self.task)
        reward = float(terminated and self.progress == len(self.task))
        truncated = not terminated and self.t >= self.T
        return self._obs(), reward, terminated, truncated, self._info(visited)

    def render(self, cell: int = 24):
        """(G*cell + 1, G*cell + 1, 3) uint8 image: palette colours, dark grey walls, the agent a black disc."""
        return render_grid(self.agent, self.colour_cells, self.wall_cells, self.G, cell)


def render_grid(agent: int, colour_cells, wall_cells, G: int = 7, cell: int = 24) -> np.ndarray:
    """Draw one grid state with numpy (no display): used by GridPinpad.render and to replay stored episodes."""
    colour_cells = np.asarray(colour_cells)
    grid = np.full((G * G, 3), 255, np.uint8)
    grid[colour_cells] = PALETTE[np.arange(len(colour_cells)) % len(PALETTE)]
    grid[np.asarray(wall_cells)] = 64
    image = np.kron(grid.reshape(G, G, 3), np.ones((cell, cell, 1), np.uint8))
    image = np.pad(image, ((0, 1), (0, 1), (0, 0)))  # room for the closing grid line
    y, x = np.mgrid[:cell, :cell] - (cell - 1) / 2
    row, col = divmod(int(agent), G)
    patch = image[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
    patch[y ** 2 + x ** 2 <= (cell / 3) ** 2] = 0
    image[::cell, :], image[:, ::cell] = 160, 160  # grid lines
    return image


if "GridPinpad-v0" not in gymnasium.registry:
    gymnasium.register("GridPinpad-v0", entry_point=GridPinpad)  # no max_episode_steps: the env truncates at T


class _VecTasks:
    """What the two vectorised worlds share: from tasks (N, K), padded with -1, and progress (N,), the colour
    each episode heads for next."""

    @property
    def target(self) -> np.ndarray:
        """(N,) next colour of each task, -1 when complete."""
        padded = np.pad(self.tasks, ((0, 0), (0, 1)), constant_values=-1)
        return padded[np.arange(self.num_envs), self.progress]


class GridPinpadVec(_VecTasks):
    """N gridworld-pinpad episodes stepped at once in numpy arrays (used for datasets and evaluation).

    The batched analogue of gymnasium's VectorEnv API, without autoreset: an episode that has ended stays
    frozen (its obs repeats, reward 0, terminated and truncated False, its `done` entry True) until the
    next `reset`. Episode i of `reset(seed)` is drawn by `_draw_episode(np.random.default_rng(seed + i))`,
    exactly as `GridPinpad().reset(seed=seed + i)` draws it, and the dynamics are the same functions.

    task: None (each episode draws a pretraining task), one task ("0-1-2" or ints), or a list of
    num_envs tasks. Public arrays: agent (N,), colour_cells (N, O), wall_cells (N, W), tasks (N, K)
    padded with -1, task_len, progress, t (steps taken), done (N,), and colour_distance (N, O, G*G) (see
    `colour_distances`, for the expert). Info arrays (evaluation only):
    agent, progress, subgoal (-1 when complete), visited (-1 none), target (next colour or -1).
    """

    def __init__(self, num_envs: int, task=None, G: int = 7, O: int = 8, W: int = 4, T: int = 100):
        one_task = (task is None or isinstance(task, str) or np.ndim(task) == 0
                    or all(isinstance(c, (int, np.integer)) for c in task))
        if not one_task and len(task) != num_envs:
            raise ValueError(f"got {len(task)} tasks for {num_envs} episodes")
        for t in [task] if one_task else task:
            _check_sizes(G, O, W, T, t)
        tasks = [task] * num_envs if one_task else task
        self.episode_tasks = [None if t is None else parse_task(t, O) for t in tasks]
        self.num_envs, self.G, self.O, self.W, self.T = num_envs, G, O, W, T

    def reset(self, seed: int):
        N, G, O, W = self.num_envs, self.G, self.O, self.W
        rngs = [np.random.default_rng(seed + i) for i in range(N)]
        tasks, self.agent, self.colour_cells, self.wall_cells, self.colour_distance = _draw_episodes(
            rngs, self.episode_tasks, G, O, W)
        self.task_len = np.array([len(t) for t in tasks])
        self.tasks = np.full((N, self.task_len.max()), -1, np.int64)
        self.tasks[np.arange(self.tasks.shape[1]) < self.task_len[:, None]] = np.concatenate(tasks)
        self.progress, self.t = np.zeros(N, np.int64), np.zeros(N, np.int64)
        self.done = np.zeros(N, bool)
        return self._obs(), self._info(np.full(N, -1))

    @property
    def subgoal(self) -> np.ndarray:
        """(N,) current subgoal: the colour pair of the next colour (-1 when complete)."""
        target = self.target
        return np.where(target >= 0, target // 2, -1)

    @property
    def observation(self) -> np.ndarray:
        """The current observation of every episode (N, C*G*G), as reset and step return it."""
        return self._obs()

    def _obs(self):
        return grid_observation(self.agent, self.colour_cells, self.wall_cells, self.G)  # (N, C*G*G)

    def _info(self, visited):
        return {"agent": self.agent.copy(), "progress": self.progress.copy(), "subgoal": self.subgoal,
                "visited": visited, "target": self.target}

    def step(self, actions):
        live, before, target, actions = ~self.done, self.agent, self.target, np.asarray(actions)
        moves = actions.shape == (self.num_envs,) and actions.dtype.kind in "iu"
        if not moves or ((actions < 0) | (actions > 3))[live].any():
            raise ValueError(f"actions must be {self.num_envs} integer moves in 0..3 (see MOVES; any integer for ended "
                             f"episodes), got {actions!r}")
        self.agent = np.where(live, _move(before, np.where(live, actions, 0), self.wall_cells, self.G), before)
        visited = _entered_colour(before, self.agent, self.colour_cells)
        hit, wrong = (visited >= 0) & (visited == target), (visited >= 0) & (visited != target)
        self.progress = self.progress + hit
        success = hit & (self.progress == self.task_len)
        self.t = self.t + live
        terminated = success | wrong
        truncated = live & ~terminated & (self.t >= self.T)
        self.done = self.done | terminated | truncated
        return self._obs(), success.astype(np.float32), terminated, truncated, self._info(visited)


# ---------------------------------------------------------------- expert (App. C.1.1)
def _expert_moves(env: GridPinpadVec) -> tuple[np.ndarray, np.ndarray]:
    """(optimal, safe), each (N, 4) bool. optimal: the move lies on a shortest path to the next colour
    (it lowers the distance by exactly one; standing on the target already, as just after the first of two
    visits in a row to one colour, it steps off, since stepping back on is the visit); safe: it neither enters
    a colour other than the target nor leaves the target unreachable."""
    N, far = env.num_envs, unreachable(env.G)
    rows, target = np.arange(N), np.maximum(env.target, 0)  # done episodes: any colour will do
    dist = env.colour_distance[rows, target]  # (N, G*G)
    nxt = _move(env.agent[:, None], np.arange(4), env.wall_cells[:, None, :], env.G)  # (N, 4)
    moved = nxt != env.agent[:, None]
    on_colour = (env.colour_cells[:, None, :] == nxt[..., None]).any(-1)
    wrong_colour = on_colour & (nxt != env.colour_cells[rows, target, None])
    d_next = np.take_along_axis(dist, nxt, 1)
    safe = ~(moved & wrong_colour) & (d_next < far)
    here = dist[rows, env.agent][:, None]
    optimal = moved & safe & (d_next == np.where(here == 0, 1, here - 1))
    return optimal, safe


def optimal_moves(env: GridPinpadVec) -> np.ndarray:
    """(N, 4) bool: which moves lie on a shortest path to each episode's next colour (for evaluation)."""
    return _expert_moves(env)[0]


def expert_actions(env: GridPinpadVec, rng: np.random.Generator, eps: float = 0.0) -> np.ndarray:
    """The paper's expert: a shortest-path move towards each episode's next colour, (N,) int64.

    Paths avoid walls and every colour other than the target; ties between optimal moves are broken
    uniformly at random, and moves into walls or off the grid are never chosen as optimal. With
    probability eps the action is replaced by a uniformly random non-terminating one: it does not step
    onto a colour other than the target (no-ops against walls are allowed), and, our choice, it keeps the
    target reachable, so a random step never walks into a pocket fenced by other colours. For done
    episodes the action is arbitrary (and ignored by the env).
    """
    optimal, safe = _expert_moves(env)
    action = np.argmax(np.where(optimal, rng.random(optimal.shape), -1.0), axis=1)  # uniform among ties
    if eps > 0:
        random_safe = np.argmin(np.where(safe, rng.random(safe.shape), np.inf), axis=1)
        action = np.where(rng.random(env.num_envs) < eps, random_safe, action)
    return action.astype(np.int64)


def grid_expert_success(task=None, n: int = 1000, seed: int = 0, eps: float = 0.0) -> float:
    """The grid expert's success rate over n episodes (seeds seed .. seed+n-1) of `task` (None: a random
    pretraining task per episode), the counterpart of ant_expert_success."""
    env = GridPinpadVec(n, task=task)
    env.reset(seed)
    rng, reward = np.random.default_rng([seed, 1]), np.zeros(n)
    while not env.done.all():
        reward += env.step(expert_actions(env, rng, eps))[1]
    return float((reward > 0).mean())


# ---------------------------------------------------------------- ant-pinpad (paper App. A.2)
ANT_CELL = 2.0          # metres per grid cell (the paper does not say; the ant spans about 0.8 m leg to leg)
ANT_FRAME_SKIP = 5      # physics steps of 0.01 s per env step, as gymnasium's Ant-v5


def _ant_xml(G: int) -> str:
    """Gymnasium's stock ant model, with an overhead camera and one flat, contact-free floor tile per cell
    (coloured per episode for rendering; they never touch the ant)."""
    path = os.path.join(os.path.dirname(gymnasium.__file__), "envs", "mujoco", "assets", "ant.xml")
    xml = open(path).read()
    half = ANT_CELL / 2 * 0.97
    tiles = "".join(
        f'<geom name="tile_{r * G + c}" type="box" size="{half} {half} 0.002" contype="0" conaffinity="0" '
        f'pos="{(c + 0.5 - G / 2) * ANT_CELL} {(G / 2 - r - 0.5) * ANT_CELL} 0.002" rgba="1 1 1 0"/>'
        for r in range(G) for c in range(G))
    camera = f'<camera name="top" pos="0 0 {2.9 * G * ANT_CELL / 2}" xyaxes="1 0 0 0 1 0"/>'
    xml = xml.replace('material="MatPlane" name="floor"', 'name="floor"', 1)   # a plain floor: the cells show
    return xml.replace('<body name="torso"', tiles + camera + '<body name="torso"', 1)


def ant_cell(xy: np.ndarray, G: int = 4) -> np.ndarray:
    """Flat cell index row * G + col of floor points (..., 2); -1 off the grid. Row 0 is at +y (the top
    of the rendered image), column 0 at -x, as in the grid world's pictures."""
    col = np.floor(xy[..., 0] / ANT_CELL + G / 2).astype(np.int64)
    row = np.floor(G / 2 - xy[..., 1] / ANT_CELL).astype(np.int64)
    inside = (row >= 0) & (row < G) & (col >= 0) & (col < G)
    return np.where(inside, row * G + col, -1)


def ant_cell_centre(cell, G: int = 4) -> np.ndarray:
    """Floor coordinates (..., 2) of the centres of flat cell indices."""
    row, col = np.divmod(np.asarray(cell), G)
    return np.stack([(col + 0.5 - G / 2) * ANT_CELL, (G / 2 - row - 0.5) * ANT_CELL], -1)


def ant_obs_dim(O: int = 4, W: int = 1) -> int:
    """Size of an AntPinpad observation: proprioception 27, global x, y 2, objects 2 (O + W), in-cell 2."""
    return 27 + 2 + 2 * (O + W) + 2


def symlog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


class AntPinpad(gymnasium.Env):
    """Ant-pinpad (paper App. A.2): the stock MuJoCo ant must walk onto coloured floor cells in order.

    ## Description
    The floor holds a G x G grid of ANT_CELL = 2 m cells, centred on the origin, with O uniquely coloured
    cells and W wall cells; both are regions of the floor, read from the torso's x, y. A colour counts as
    visited when the torso centre enters its cell from another cell; the task logic is the grid world's.
    The ant is gymnasium's Ant (8 hinge joints, torques in [-1, 1] with gear 150), stepped 5 physics steps
    of 0.01 s per env step.

    ## Action Space
    `Box(-1, 1, (8,), float32)`: the torques, in the model's actuator order (hip_4, ankle_4, hip_1, ankle_1,
    hip_2, ankle_2, hip_3, ankle_3; not the joint order of qpos).

    ## Observation Space
    `Box(-inf, inf, (27 + 2 + 2 (O + W) + 2,), float32)`, 41 for the defaults, in this order:
      [0:27]   symlog of the proprioception: qpos[2:] (torso height, orientation quaternion, 8 joint angles)
               and qvel (torso linear and angular velocity, 8 joint velocities);
      [27:29]  global torso x, y divided by G * ANT_CELL / 2 (so the grid spans [-1, 1]);
      [29:29+2O]       each colour cell's centre minus the torso x, y, divided by G * ANT_CELL;
      [29+2O:29+2O+2W] the same for each wall cell;
      [-2:]    the torso's position inside its cell, in [0, 1]^2 (x from the cell's left, y from its bottom).
    The task is not observed.

    ## Rewards
    1 on the step that completes the task, 0 otherwise.

    ## Starting State
    Task (uniform over the 16 pretraining tasks of Table A2 if none was given), then a solvable layout as in
    the grid world (`sample_layout`); the torso starts at a uniform point of the start cell (kept 0.3 m from
    its edges), 0.75 m high, with a uniform yaw; joint angles and all velocities get uniform noise in +-0.1.

    ## Episode End
    Terminated on completing the task (reward 1), on visiting a wrong colour, when the torso centre is in a
    wall cell or off the grid, or when the torso height leaves [0.2, 1.0]; truncated after T steps.

    ## Info
    agent (the torso's cell, -1 off the grid), xy (torso position), colour_cells (O,), wall_cells (W,), task,
    progress, subgoal (task[progress]: one colour is one abstract action here; -1 once complete), visited
    (colour entered on this step or -1). For evaluation and plots only; never fed to a model.

    ## Arguments
    task (None, "0-1-2" or a sequence of ints), G = 4, O = 4, W = 1, T = 500, render_mode (None or
    "rgb_array"; rendering uses MuJoCo's offscreen renderer: set MUJOCO_GL=egl without a display).

    ## Version History
    v0: initial version.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task=None, G: int = 4, O: int = 4, W: int = 1, T: int = 500, render_mode=None):
        os.environ.setdefault("MUJOCO_GL", "egl")                    # offscreen rendering without a display
        import mujoco
        _check_sizes(G, O, W, T, task, default=(4, 4, 1))
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.fixed_task = None if task is None else parse_task(task, O)
        self.G, self.O, self.W, self.T, self.render_mode = G, O, W, T, render_mode
        self._mj = mujoco
        self.model = mujoco.MjModel.from_xml_string(_ant_xml(G))
        self.data = mujoco.MjData(self.model)
        self.init_qpos = self.model.key_qpos[0].copy() if self.model.nkey else self.model.qpos0.copy()
        self.init_qpos[2] = 0.75
        self._tiles = [mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_GEOM, f"tile_{i}") for i in range(G * G)]
        self._renderer = None
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (ant_obs_dim(O, W),), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (8,), np.float32)

    def _xy(self) -> np.ndarray:
        return self.data.qpos[:2].copy()

    def _obs(self) -> np.ndarray:
        G, xy = self.G, self._xy()
        proprio = symlog(np.concatenate([self.data.qpos[2:], self.data.qvel]))
        objects = ant_cell_centre(np.concatenate([self.colour_cells, self.wall_cells]), G) - xy
        local = (xy / ANT_CELL + G / 2) % 1.0
        obs = [proprio, xy / (G * ANT_CELL / 2), objects.ravel() / (G * ANT_CELL), local]
        return np.concatenate(obs).astype(np.float32)

    def _info(self, visited: int) -> dict:
        done = self.progress == len(self.task)
        return {"agent": self.cell, "xy": self._xy(), "colour_cells": self.colour_cells.copy(),
                "wall_cells": self.wall_cells.copy(), "task": self.task, "progress": self.progress,
                "subgoal": -1 if done else self.task[self.progress], "visited": visited}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        rng = self.np_random
        self.task = (ANT_PRETRAIN_TASKS[rng.integers(len(ANT_PRETRAIN_TASKS))] if self.fixed_task is None
                     else self.fixed_task)
        start, self.colour_cells, self.wall_cells = sample_layout(rng, self.G, self.O, self.W)
        mj, qpos = self._mj, self.init_qpos.copy()
        qpos[:2] = ant_cell_centre(start, self.G) + rng.uniform(-1, 1, 2) * (ANT_CELL / 2 - 0.3)
        yaw = rng.uniform(-np.pi, np.pi)
        qpos[3:7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
        qpos[7:] += rng.uniform(-0.1, 0.1, len(qpos) - 7)
        mj.mj_resetData(self.model, self.data)
        self.data.qpos[:] = qpos
        self.data.qvel[:] = rng.uniform(-0.1, 0.1, self.model.nv)
        mj.mj_forward(self.model, self.data)
        self.cell, self.progress, self.t = int(start), 0, 0
        return self._obs(), self._info(-1)

    def step(self, action):
        action = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        if action.shape != (8,):
            raise ValueError(f"action must have shape (8,), got {action.shape}")
        self.data.ctrl[:] = action
        self._mj.mj_step(self.model, self.data, nstep=ANT_FRAME_SKIP)
        self.t += 1
        before, self.cell = self.cell, int(ant_cell(self._xy(), self.G))
        visited = -1
        if self.cell != before and self.cell in self.colour_cells:
            visited = int(np.flatnonzero(self.colour_cells == self.cell)[0])
        target = self.task[self.progress] if self.progress < len(self.task) else -1
        fallen = not 0.2 <= self.data.qpos[2] <= 1.0
        blocked = self.cell < 0 or self.cell in self.wall_cells
        terminated = fallen or blocked or (visited >= 0 and visited != target)
        if visited >= 0 and visited == target and not terminated:
            self.progress += 1
            terminated = self.progress == len(self.task)
        reward = float(self.progress == len(self.task) and terminated)
        truncated = not terminated and self.t >= self.T
        return self._obs(), reward, terminated, truncated, self._info(visited)

    def render(self, width: int = 480, height: int = 480):
        """(height, width, 3) uint8 image from the overhead camera, colour cells and walls drawn on the floor."""
        if self._renderer is None:
            self._renderer = self._mj.Renderer(self.model, height, width)
        rgba = np.tile(np.float32([0.7, 0.75, 0.7, 1]), (self.G * self.G, 1))   # free cells: a shade darker
        rgba[self.colour_cells, :3], rgba[self.colour_cells, 3] = PALETTE[:self.O] / 255, 1
        rgba[self.wall_cells] = [0.25, 0.25, 0.25, 1]
        self.model.geom_rgba[self._tiles] = rgba
        self._renderer.update_scene(self.data, camera="top")
        return self._renderer.render()

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


class AntPinpadVec(_VecTasks):
    """N ant-pinpad episodes with GridPinpadVec's interface (reset(seed), step(actions), and the arrays
    agent, xy, colour_cells, wall_cells, tasks, task_len, progress, t, done, target, subgoal, observation;
    one task, or None for a random pretraining task per episode, but not a list of per-episode tasks),
    so that data generation, rollouts and RL run the same code on both worlds. The episodes step one after
    another in this process (the physics dominates: about 0.3 ms per episode step). Without autoreset: an
    ended episode stays frozen until the next reset. Episode i of reset(seed) is AntPinpad().reset(seed=seed + i).
    """

    def __init__(self, num_envs: int, task=None, T: int = 500):
        self.num_envs, self.T = num_envs, T
        self.envs = [AntPinpad(task=task, T=T) for _ in range(num_envs)]

    def reset(self, seed: int):
        obs, infos = zip(*(env.reset(seed=seed + i) for i, env in enumerate(self.envs)))
        N = self.num_envs
        self._obs = np.stack(obs)
        self.colour_cells = np.stack([env.colour_cells for env in self.envs])
        self.wall_cells = np.stack([env.wall_cells for env in self.envs])
        self.task_len = np.array([len(env.task) for env in self.envs])
        self.tasks = np.full((N, self.task_len.max()), -1, np.int64)
        for i, env in enumerate(self.envs):
            self.tasks[i, : len(env.task)] = env.task
        self.progress, self.t, self.done = np.zeros(N, np.int64), np.zeros(N, np.int64), np.zeros(N, bool)
        self.agent, self.xy = np.array([info["agent"] for info in infos]), np.stack([info["xy"] for info in infos])
        return self._obs.copy(), self._info(np.full(N, -1))

    @property
    def subgoal(self) -> np.ndarray:
        """(N,) current subgoal: in the ant world one colour is one abstract action, so the next colour."""
        return self.target

    @property
    def observation(self) -> np.ndarray:
        return self._obs.copy()

    def _info(self, visited):
        return {"agent": self.agent.copy(), "xy": self.xy.copy(), "progress": self.progress.copy(),
                "subgoal": self.subgoal, "visited": visited, "target": self.target}

    def step(self, actions):
        N = self.num_envs
        reward, terminated, truncated = np.zeros(N, np.float32), np.zeros(N, bool), np.zeros(N, bool)
        visited = np.full(N, -1)
        for i in np.flatnonzero(~self.done):
            env = self.envs[i]
            self._obs[i], reward[i], terminated[i], truncated[i], info = env.step(actions[i])
            self.agent[i], self.xy[i] = info["agent"], info["xy"]
            self.progress[i], visited[i] = env.progress, info["visited"]
            self.t[i] = env.t
        self.done = self.done | terminated | truncated
        return self._obs.copy(), reward, terminated, truncated, self._info(visited)


if "AntPinpad-v0" not in gymnasium.registry:
    gymnasium.register("AntPinpad-v0", entry_point=AntPinpad)


# ---------------------------------------------------------------- the ant's expert: grid planner + hand-made gait
# The paper trained a locomotion policy with PPO; on 2 CPU cores a hand-designed gait is the honest route.
# A trot: diagonal leg pairs (legs 1 & 3, 2 & 4) in antiphase; each hip swings with an amplitude proportional
# to how well its leg's tangential direction lines up with the commanded direction (turned into the torso
# frame, so the gait never commands a turn; the heading still drifts, by a median 0.36 rad over 200 steps);
# the ankles lift a phase `lead` ahead of the hip swing; PD control tracks the joint targets. The constants
# come from a random search with `gait_speed` (mean speed along 8 directions, 200 steps each from seed 0's
# start, no falls allowed; about 250 trials), e.g.
#     max(candidates, key=lambda p: np.mean([gait_speed(p, d) for d in directions]))
# They walk at about 0.05 m per env step in every direction. From other starts the torso can leave its height
# range [0.2, 1.0] m, which ends an episode: 20 of 200 runs (8 directions x seeds 0-24) did (the two looked at
# bounced above 1.0 m within their first 12 steps).
ANT_GAIT = dict(hip=0.5, omega=0.665, lead=1.883, neutral=0.576, lift=0.352, kp=3.756, kd=0.265)
_ANT_ACTUATED_JOINT = np.array([6, 7, 0, 1, 2, 3, 4, 5])   # actuator k drives joint qpos[7 + this]
_ANT_LEG_ANGLE = np.deg2rad([45.0, 135.0, 225.0, 315.0])     # legs 1-4 point along the diagonals
_ANT_ANKLE_SIGN = np.array([1.0, -1.0, -1.0, 1.0])           # ankle ranges: +30..70, -70..-30, -70..-30, +30..70 deg
_ANT_PAIR_PHASE = np.array([0.0, np.pi, 0.0, np.pi])         # diagonal pairs in antiphase


def torso_frame(qpos: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """A world-frame direction (2,) turned into the torso's frame (the yaw of the ant's quaternion undone)."""
    yaw = 2 * np.arctan2(qpos[6], qpos[3])     # the heading if the torso is level; a few 0.01 rad off when tilted
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([c * direction[0] + s * direction[1], -s * direction[0] + c * direction[1]])


def gait_action(qpos: np.ndarray, qvel: np.ndarray, t: int, direction: np.ndarray, gait: dict = ANT_GAIT) -> np.ndarray:
    """Torques (8,) in actuator order that walk the ant along the world `direction` (2,) at env step t."""
    local = torso_frame(qpos, direction)
    tangent = np.stack([-np.sin(_ANT_LEG_ANGLE), np.cos(_ANT_LEG_ANGLE)], 1)
    phase = gait["omega"] * t + _ANT_PAIR_PHASE
    target = np.empty(8)
    target[0::2] = gait["hip"] * (tangent @ local) * np.sin(phase)
    target[1::2] = _ANT_ANKLE_SIGN * (gait["neutral"] + gait["lift"] * np.cos(phase + gait["lead"]))
    torque = gait["kp"] * (target - qpos[7:15]) - gait["kd"] * qvel[6:14]
    return np.clip(torque[_ANT_ACTUATED_JOINT], -1.0, 1.0)


def gait_speed(gait: dict, direction, steps: int = 200, seed: int = 0) -> float:
    """Mean speed (m per env step) along `direction` of the gait from the centre of an empty floor with a
    random yaw; -inf if the torso leaves [0.2, 1.0] m. The objective the gait constants were tuned on."""
    import mujoco
    env = AntPinpad(task="0")
    env.reset(seed=seed)
    env.data.qpos[:2] = 0.0
    mujoco.mj_forward(env.model, env.data)
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    for t in range(steps):
        env.data.ctrl[:] = gait_action(env.data.qpos, env.data.qvel, t, direction, gait)
        mujoco.mj_step(env.model, env.data, nstep=ANT_FRAME_SKIP)
        if not 0.2 <= env.data.qpos[2] <= 1.0:
            return -np.inf
    return float(env.data.qpos[:2] @ direction / steps)


ANT_MARGIN = 0.6   # metres: the expert is pushed away from forbidden cells (walls, other colours, off-grid) this near


def _repulsion(xy: np.ndarray, env: AntPinpad, target: int) -> np.ndarray:
    """A push away from every forbidden region closer than ANT_MARGIN, growing linearly to 1 at its edge."""
    G, half = env.G, ANT_CELL / 2
    forbidden = [c for c in range(G * G)
                 if c in env.wall_cells or (c in env.colour_cells and c != env.colour_cells[target])]
    if not forbidden:
        return np.zeros(2)
    push = np.zeros(2)
    for centre in ant_cell_centre(np.array(forbidden, dtype=int), G):
        nearest = np.clip(xy, centre - half, centre + half)      # the closest point of the cell's square
        away, d = xy - nearest, np.linalg.norm(xy - nearest)
        if 0 < d < ANT_MARGIN:
            push += away / d * (1 - d / ANT_MARGIN)
    edge = G * half                                              # the grid's border
    for axis in range(2):
        for sign in (-1, 1):
            d = edge - sign * xy[axis]
            if d < ANT_MARGIN:
                push[axis] -= sign * (1 - d / ANT_MARGIN)
    return push


def ant_expert_target(env: AntPinpad) -> int:
    """The colour the ant expert heads for: the task's next colour (its last once the task is complete)."""
    return int(env.task[min(env.progress, len(env.task) - 1)])


def ant_expert_next_cell(env: AntPinpad) -> int:
    """The ant expert's planner (App. C.1.2): the neighbouring cell on a shortest path to the next colour,
    avoiding walls and every other colour, as the grid expert; the current cell in a dead end (only reachable
    by noise: every way out crosses a forbidden cell). The ant must be on the grid."""
    G, target = env.G, ant_expert_target(env)
    dist = colour_distances(env.colour_cells, env.wall_cells, G)[target]
    row, col = divmod(env.cell, G)
    forbidden = set(env.wall_cells.tolist()) | set(env.colour_cells.tolist()) - {int(env.colour_cells[target])}
    neighbours = [r * G + c for r, c in ((row - 1, col), (row, col + 1), (row + 1, col), (row, col - 1))
                  if 0 <= r < G and 0 <= c < G and r * G + c not in forbidden]
    return min(neighbours, key=lambda cell: dist[cell]) if neighbours else env.cell


def ant_expert_direction(env: AntPinpad) -> np.ndarray:
    """The unit world-frame direction the ant expert walks: from the torso towards the centre of the planner's
    next cell (ant_expert_next_cell), pushed away from forbidden cells closer than ANT_MARGIN."""
    xy = env.data.qpos[:2]
    if env.cell < 0:                                            # off the grid (the episode is over anyway)
        aim = -xy
    else:
        aim = ant_cell_centre(ant_expert_next_cell(env), env.G) - xy
        aim = aim / (np.linalg.norm(aim) + 1e-9) + _repulsion(xy, env, ant_expert_target(env))
    return aim / (np.linalg.norm(aim) + 1e-9)


def ant_expert_action(env: AntPinpad, noise: float = 0.0, rng: np.random.Generator | None = None,
                      direction=ant_expert_direction) -> np.ndarray:
    """The ant expert (App. C.1.2): the gait walks along `direction(env)` (another command can be tried in its
    place). noise > 0 adds Gaussian noise of that std to the torques (pretraining diversity); noise 0 is the
    noise-free expert used for the metacontroller's data."""
    action = gait_action(env.data.qpos, env.data.qvel, env.t, direction(env))
    if noise > 0:
        action = np.clip(action + (rng or np.random.default_rng()).normal(0, noise, 8), -1, 1)
    return action


def ant_expert_episode(seed: int, task=None, noise: float = 0.0, T: int = 500, direction=ant_expert_direction) -> tuple:
    """One expert episode of AntPinpad(task, T).reset(seed=seed), its gait steered by `direction` (as
    ant_expert_action): observations (T'+1, 41), the torques as applied (T', 8), the colour aimed at before each
    step (T',), success, and the task."""
    env = AntPinpad(task=task, T=T)
    o, info = env.reset(seed=seed)
    rng = np.random.default_rng([seed, 1])
    obs, actions, subgoal, done, reward = [o], [], [], False, 0.0
    while not done:
        subgoal.append(info["subgoal"])
        actions.append(ant_expert_action(env, noise, rng, direction).astype(np.float32))
        o, reward, terminated, truncated, info = env.step(actions[-1])
        obs.append(o)
        done = terminated or truncated
    return np.array(obs), np.array(actions), np.array(subgoal), reward > 0, env.task


def ant_expert_success(task=None, n: int = 200, seed: int = 0, noise: float = 0.0) -> float:
    """The expert's success rate over n episodes (seeds seed .. seed+n-1) of `task` (None: a random
    pretraining task per episode). One core: about 0.2 s per episode."""
    return float(np.mean([ant_expert_episode(seed + i, task, noise)[3] for i in range(n)]))
