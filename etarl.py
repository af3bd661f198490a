"""ETARL: emergent temporal abstractions in autoregressive models enable hierarchical RL.

A reference implementation of Kobayashi, Schimpf, Schlegel et al. (arXiv 2512.20605), read top to
bottom in pipeline order:

    1. Configs and presets ............ one dataclass per stage; presets tiny / cpu / paper for each world
    2. Data ........................... expert episodes from envs.py: grid (compact) and ant (Sec. 2, App. C.1)
    3. Base model ..................... causal transformer with relative-position biases and a KV cache (grid),
                                        or Hawk SSM with a Gaussian action head (ant) (Sec. 2, App. D.1)
    4. Residual-stream control ........ e <- e + U e at a named layer, low-rank or full (Eq. 1)
    5. Pretraining and quality gate ... Eq. 5; linear probes per layer (App. C.2): does the stream know the task?
    6. Supervised control ............. one controller per subgoal (App. C.3); rollouts in the environment
    7. Metacontroller ................. Eqs. 2-3, 12-18: latent codes, a switching gate, a hypernetwork (Sec. 3)
    8. Internal RL .................... a causal policy over codes, acting when the gate fires (Sec. 4, Alg. 1)
    9. Experiment runner .............. `python etarl.py`: every stage, figures and results.json in a run folder

Run:   python etarl.py                     # cpu preset, grid world, writes runs/grid-cpu-s0/
       python etarl.py --env ant --force   # the ant world (its cpu base model fails the gate), runs/ant-cpu-s0/
       python etarl.py --preset tiny       # seconds, for a smoke test (add --force: its model fails the gate)
       python etarl.py --sweep             # also the rate-distortion sweep of Fig. 7 (long; a GPU helps)
       python etarl.py --bf16              # pretrain in bfloat16 mixed precision, runs/grid-cpu-s0-bf16/ (deviation 23)
       pytest                              # the test suite (a few minutes on 2 cores)

Shape letters: B batch (episodes), T time steps, D model width, O observation size, A actions,
H attention heads, K subgoals, R controller rank, L number of blocks, n_z code size.

Deviations and choices (where the paper is silent or where we differ; also listed in README.md):
 1. Observation encoder: the 637-dim one-hot observation is re-centred on the agent (each object's
    offset from the agent, plus the agent's absolute cell) and embedded linearly, written as a sum of
    embedding lookups. The paper does not say how it embeds observations. The re-centring is a fixed,
    parameter-free re-indexing of the same observation; `encoder="linear"` gives the plain embedding,
    which at our scale never learned the task (subgoal probe at chance). Measured since: with the re-centring the
    model has chosen its move by L/2 (with the plain embedding the move comes out of the last two blocks). That
    alone does not explain why controllers at L/2 fail at unseen subgoal transitions: they fail there too on a
    diagnostic model built to hold the target apart from the move at L/2 (experiments/README.md, section 2).
 2. Learning-rate schedule: linear warm-up then cosine decay to 10%, peak lr 2e-3 and batch 64 at the
    cpu preset (paper: constant 3e-4, batch 1024).
 3. Model size and data volume at the cpu preset are far below the paper's (see PRESETS). The paper does
    not give the rate-distortion sweep's length: the paper preset trains a frozen-base point 16k steps (a
    quarter of its main metacontroller's 64k, for time), a co-trained one 64k; the cpu preset 1,500 each.
    The paper preset draws its 262M training episodes from 2M stored ones (each seen about 131 times).
 4. Layouts are rejection-sampled so that every colour is reachable (envs.sample_layout); otherwise
    the expert could not be perfect on enclosed layouts.
 5. Batches are cut to their longest episode and drawn from buckets of similar length, every episode
    equally likely (losses are masked by episode length); the next-observation loss is a Bernoulli
    likelihood per dimension.
 6. Probes: multinomial logistic regression on standardised residuals, fitted by L-BFGS on one half
    of held-out expert episodes and scored on the other half.
 7. Metacontroller: the non-causal sequence embedding s (Eq. 13) is a bidirectional GRU over the valid
    steps (the paper uses an SSM and does not say how it is made non-causal); the first step always
    takes a new code (beta_0 = 1: there is no earlier code to keep; without this the gate closed within
    50 steps at every alpha, z stayed at its zero start and no gradient reached the encoder); the
    hypernetwork's output layer starts with weights of std 0.05, which is NOT a small edit (|U e| / |e|
    about 0.65 at rank 16 on the cpu base model, 1.3 at full rank; MetaConfig(zero_init_edit=True) starts
    from U = 0 exactly, as LoRA does); gradients are clipped at norm 1. Off by default, measured as
    remedies for the collapse:
    MetaConfig(per_step_embedding=True), an s_t per step from both directions' GRU states at t,
    MetaConfig(free_bits=f), no KL penalty on a code dimension below f nats per step (Kingma et al. 2016),
    MetaConfig(kl_delay=n), alpha = 0 for the first n steps, MetaConfig(kl_warmup=m), then a linear ramp of
    alpha over m steps, MetaConfig(logvar_init=b), the encoder's log-variance biases start at b (-6: a
    posterior std of 0.05), and MetaConfig(read_norm=True), the metacontroller reads LayerNorm(e_t) (no
    parameters) instead of the raw stream, whose scale saturates its GRUs (the edit still applies to the raw
    stream). kl_delay, kl_warmup, logvar_init and read_norm together make the learned metacontroller use its
    code, with a soft gate that does not switch at the subgoal boundaries (experiments/README.md, section 3).
    MetaConfig(kl_per_switch=True) departs from Eq. 3: each step's KL penalty is weighted by its beta, so a
    code is paid for only when it is taken. With all five, gumbel_switch=True, switch_temperature=0.5 and
    batches of 256, the gate switches at the subgoal boundaries after 3,000 steps on 2 of 6 seeds (F1 0.95
    and 0.94; on a CPU 1 of 3, F1 0.97), and after 6,000 steps on both seeds tried (F1 1.00, quasi-binary
    0.9999), but the codes carry nothing about which subgoal (experiments/README.md, section 3). Those
    runs, and the pipeline's aligned runs before 5539041, drew their batches by the rule before deviation 5's.
    Whether a training aligns within 5,000 steps depends above all on the base model: with the same
    batches, noise draws and initial weights, seed 1's base model aligned (F1 0.993) where the 5539041 run's
    did not (0.44); with the current rule 3 of 7 trainings aligned, all on seed 1's base model, among them
    `python etarl.py --seed 1` (F1 0.9998; README, "Results: the grid").
    The cpu and tiny presets train their metacontroller with kl_delay, kl_warmup, logvar_init, read_norm,
    kl_per_switch, gumbel_switch and switch_temperature=0.5 (ALIGNED; cpu: 5,000 steps x 256, chosen to keep
    `python etarl.py` near an hour; 50.5-71.2 minutes measured on two machines); Fig. 7's sweep and the
    forced-switch and co-trained baselines train by Eq. 3 as stated (Preset.meta_eq3: cpu 1,500 steps x 64).
    The paper and ant presets keep Eq. 3.
 8. Switch evaluation: switches are beta > 0.5. F1 compares switches at t > 0 with the true boundaries
    (steps where the expert starts a new colour pair), matched one-to-one within +-1 step, as many pairs as
    possible; switch counts include t = 0 and are compared with the number of subgoals per episode. Code
    purity: k-means (k = 4) on the code at the end of each switch-delimited segment, scored against the
    segment's majority subgoal. Code injection: a code from a segment of subgoal g, held fixed, on the task
    "2g-(2g+1)". Quasi-binary: the share of switch probabilities sigmoid(logit) at t > 0 below 0.1 or above 0.9. With
    binary switches (gumbel_switch) evaluation takes beta = H(logit), the gate internal RL acts with, so codes
    are held exactly between switches. Regimes (switching_regime): collapsed below COLLAPSED_KL = 0.01 nats
    per step, whatever the gate does; one code per episode under 1.5 switches; always switching above twice
    the true number of subgoals; misaligned below F1 0.2; aligned at F1 >= 0.9; partially aligned between.
 9. Supervised controllers train with lr 1e-2 (paper 1e-3): at our 600 steps it fits and steers better.
    They train on the expert data, as the paper's; experiments/controllers.py also tries noisy and
    every-order data with a shortest-path loss, which is not the paper's recipe (experiments/README.md,
    section 2).
10. Post-training task and T: with T = 100, about 0.4% of layouts need more than 100 steps for the
    12-colour post-training task even for the expert (expert success 0.996 over 100k episodes).
11. Internal RL: the causal policy is one GRU layer (width 64 at the cpu preset) with a Gaussian head whose
    std is a free parameter per code dimension, starting at the prior N(0, I) (the paper: a 1-layer Hawk
    SSM of width 256). Algorithm 1 is written as a hook at layer l of the base model: the policy reads e_t
    at every step and samples only where the frozen gate fires (identical to returning control to it
    only then). PPO: 4 passes per batch, clip 0.2, gradients clipped at norm 1; batches in which every
    episode got the same return are skipped (their advantages are all 0).
12. RL budget at the cpu preset: batches of 256 episodes (paper 1024), 6,144 episodes per run (paper up
    to ~1e6), lr scan {3e-4, 3e-3} on seed 0 (paper 3e-6 .. 3e-4), then seeds 1-2 at the best lr
    (with --seed N, seeds 3N .. 3N+2; Fig. 7's sweep likewise). Raw-action RL finetunes every base-model
    parameter. "Final success" is the median over seeds of the mean batch success over the last quarter
    of a run; the scan's run at the chosen lr is one of those seeds (it also chose the lr, a small upward
    bias). The PPO surrogate is averaged over all decisions of a batch. Each method's random codes and
    random actions draw from separate generators. The budget matters: on tasks where some episodes
    succeed, internal RL on the 6,000-step lead learns only over hundreds of thousands of episodes (lab
    notes, section 5).
13. CompILE (baseline 4): boundaries follow a discrete hazard model read causally from o_1:t (segment i
    ends at t with probability sigmoid(l_t) given that it has not ended before) instead of CompILE's
    softmax over the whole sequence, so that internal RL can fire its gate where sigmoid(l_t) > 0.5;
    straight-through Gumbel-softmax samples; the Poisson length prior (mean 10 steps) is truncated at
    the episode's end; a segment's code is read from the mean of its own steps' observation embeddings
    (the original runs an LSTM over the segment); the per-step edit is sum_i m_i(t) U_i e_t. M = 4
    segments in training; in RL the gate is not capped.
14. Ant-pinpad (envs.AntPinpad; the paper leaves these open): cells of 2 m, 5 physics steps of 0.01 s per
    env step (as Ant-v5), leaving the 4x4 grid ends the episode like a wall, the start point keeps 0.3 m
    from its cell's edges, layouts are rejection-sampled to be solvable as in the grid, and the
    observation is scaled as documented in the class (41 numbers).
15. The ant's expert is the grid planner (next cell on a shortest path, avoiding walls and other colours,
    plus a push away from forbidden cells closer than 0.6 m) driving a hand-made trot tracked by PD
    control (envs.ANT_GAIT, tuned by random search), not the paper's PPO-trained locomotion policy. It
    aims from where the torso is at the next cell's centre, not in the paper's cardinal directions (with
    cardinal commands from cell centre to cell centre and no push, the same gait solved 0.59 / 0.49 of
    pretraining / 0-1-2-3 episodes).
16. Hawk (the ant's base model): Griffin's recurrent block (GeLU gate branch times RG-LRU after a causal
    depthwise convolution of width 4, recurrence width = d_model) with RMS norms and a GeLU-gated MLP;
    the RG-LRU runs as a plain loop over time (clear, and the same code for whole sequences and single
    steps), except on a GPU when batch x width <= 2^16, where a log-depth parallel scan (linear_scan) makes
    an ant-cpu training step 5x faster (on 2 CPU cores the scan is 2-3x slower; on a GPU at the ant-paper
    batch of 512 x 256 a whole step was slower with it and needed 1.6x the memory).
    The Gaussian head clamps log-std to [-5, 2]; the ant's next-observation loss is a unit-variance
    Gaussian (squared error / 2).
17. Ant data and gate: the pretraining episodes carry Gaussian torque noise (std 0.1, for diversity); the
    supervised controllers and the metacontrollers train on a separate set of noise-free episodes, as the
    paper's metacontroller does, and the held-out episodes are noise-free too. The ant's quality
    gate (ours; the paper has none) asks for an action R^2 >= 0.9 on the held-out noise-free torques and a
    colour probe >= 0.5 at L/2. Code injection on the ant runs the one-colour task "g".
18. Ant scale at the cpu preset (PRESETS["ant-cpu"]): 800 training, 400 noise-free and 200 held-out
    episodes; Hawk with d = 128, 4 blocks, MLP 256 (paper 256, 8, 512); 4,000 steps x 16 episodes at lr 1e-3
    with warm-up and cosine decay (paper 204.8k x 512 at 3e-4); supervised controllers only at L/2,
    full-rank, 300 steps x 16 at lr 3e-3 (paper 3e-4); metacontrollers 300 steps x 16 at lr 1e-3 (paper 32k
    x 128 at 3e-4); RL batches of 64 episodes, 512 per run (paper 256 per batch); the baselines are
    raw-action RL and forced switching (CompILE and co-training are left out for time; RLConfig.methods adds
    them). Fig. 8b divides success by the noise-free expert's own success on the task over 200 episodes.
19. envs.AntPinpadVec, the ant's counterpart of GridPinpadVec (same interface, no autoreset), steps its
    episodes one after another in one process: the physics dominates and the 2 cores are shared with the
    model. gymnasium.make_vec("AntPinpad-v0", ...) gives the standard autoresetting vector env.
20. On CUDA, Run turns on TF32 matmuls (torch.set_float32_matmul_precision("high")) and grid batches are
    built on the device; the paper does not say what precision it trained in. On CPU nothing changes.
21. An option, off in every preset: PretrainConfig(action_loss="shortest") scores each step by -ln p(any
    shortest-path move toward the expert's current target) instead of Eq. 5's -ln p(expert's move), so that
    the grid's base model can pretrain on expert data with random moves (DataConfig.eps > 0) without
    learning to make them (as DART injects noise, Laskey et al. 2017). With eps = 0.1 it passes the gate
    twice as soon and navigates better, but the supervised controllers barely gain (experiments/README.md,
    section 2).
22. An option, off in every preset: ModelConfig(encoder="ego") for the ant (AntEgoEncoder) also embeds every
    object's offset and the torso's velocity turned into the torso's frame (by minus the yaw of the observed
    quaternion), the ant's counterpart of deviation 1. On the ant-cpu data its colour probe stayed at chance
    (0.235-0.249 at every layer after 2,000 steps), as the linear embedding's does (experiments/README.md,
    section 6).
23. An option, off in every preset: PretrainConfig(bf16=True) (`python etarl.py --bf16`) pretrains under a
    bfloat16 torch.autocast: matmuls in bfloat16; the residual stream, the losses, the RG-LRU recurrence, the
    weights and AdamW in float32; the gate and every later stage in float32. The paper does not say what
    precision it trained in. On a CPU with AVX512-BF16 the cpu preset's pretraining ran 1.3-1.4x faster and
    passed the gate at the same step (9,000) after 13.7 minutes instead of 18.1-19.7, its gate curve within 0.015
    of float32's and its downstream results within their run-to-run spread; with oneDNN held to instruction sets
    without bfloat16 a step took 1.8-13x as long as in float32 (experiments/README.md, section 1), hence off.
24. Smaller choices the paper leaves open: T5's causal relative-position buckets (16 exact distances,
    then 16 log-spaced ones up to max_distance = 128 steps, the last also holding every longer distance);
    gradients clipped at norm 1 in pretraining and CompILE's training as well (deviations 7 and 11 for the
    others); the co-trained baseline's base model, trained from scratch, also gets Eq. 5's next-observation
    term (weight lambda) besides Eq. 3; PPO's advantage divides by the unbiased standard deviation of the
    batch's returns.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import envs


# ==================================================================================================
# 1. Configs and presets
# ==================================================================================================
@dataclass
class DataConfig:
    """Expert data (App. C.1.1)."""
    n_train: int = 200_000      # training episodes (the paper streams ~262M over pretraining)
    n_eval: int = 2_000         # held-out episodes for the quality gate and the probes
    eps: float = 0.0            # grid: probability that the expert takes a random non-terminating action
    noise: float = 0.0          # ant: std of the Gaussian torque noise in the training episodes (held-out: none)
    n_meta: int = 0             # noise-free episodes for the controllers and metacontrollers (0: the training set)
    env: str = "grid"           # the world this preset is for, "grid" or "ant" (Run checks it)


@dataclass
class ModelConfig:
    """Base model (App. D.1). Paper: d=256, 4 heads, MLP 512, depth 6, 32 relative-position buckets."""
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    n_buckets: int = 32
    max_distance: int = 128     # relative distances beyond this share the last bucket
    encoder: str = "ego"        # "ego" (grid: agent-centred, deviation 1; ant: torso frame, deviation 22) or "linear"
    obs_weight: float = 0.01    # lambda of Eq. 5 (paper: 0 or 0.01 for the grid, 10 for the ant)
    mixer: str = "attention"    # "attention" (the grid's transformer) or "hawk" (the ant's RG-LRU SSM)
    conv_width: int = 4         # Hawk: width of the causal temporal convolution before the RG-LRU
    head: str = "categorical"   # action head: "categorical" (grid moves) or "gaussian" (ant torques)


@dataclass
class PretrainConfig:
    """Pretraining (Eq. 5). Paper: AdamW lr 3e-4 constant, wd 0.03, batch 1024, 256k steps."""
    steps: int = 12_000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.03
    warmup: int = 300
    min_lr_frac: float = 0.1    # cosine decays to this fraction of lr (paper: constant lr)
    eval_every: int = 1_000     # steps between quality-gate measurements
    time_budget_s: float | None = None   # stop early after this many seconds (the schedule is cut short)
    action_loss: str = "expert"  # "expert": -ln p(expert's move), Eq. 5; "shortest": -ln p(shortest-path moves)
    bf16: bool = False          # mixed precision: the training forward and backward under torch.autocast to
                                # bfloat16 (matmuls); weights, optimiser, losses and the gate stay float32


@dataclass
class ProbeConfig:
    """Linear probes of the current subgoal (App. C.2)."""
    max_iter: int = 200
    l2: float = 1e-3


@dataclass
class ControlConfig:
    """Supervised residual-stream controllers (Eq. 1, App. C.3). Paper: rank 16, AdamW lr 1e-3."""
    rank: int = 16              # 0 means a full D x D matrix (the ant)
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-2            # paper 1e-3; at 600 steps 1e-2 fits better (action NLL 0.293 vs 0.310)
    weight_decay: float = 0.0
    eval_episodes: int = 500
    task: str = "0-1-2-3-4-5-6-7-0-1-2-3"   # the post-training task
    layers: tuple | None = None  # layers to control (None: every layer 1 .. L-1, Fig. 4)


@dataclass
class MetaConfig:
    """Metacontroller and its training (Tables A9, A10). Paper (grid): batch 512, 64k steps, lr 1e-3."""
    n_h: int = 32               # history GRU state (Eq. 12)
    n_s: int = 32               # non-causal sequence embedding (Eq. 13)
    n_z: int = 8                # latent code (Eq. 14-15)
    enc_hidden: int = 64        # encoder and switching-unit MLP width
    hyp_hidden: int = 32        # hypernetwork width (Eq. 18)
    rank: int = 16              # rank of U_t; 0 = full D x D (the ant)
    alpha: float = 0.1          # KL weight of Eq. 3 (paper sweeps 0 .. 1)
    steps: int = 1_500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.03
    switch_bias: float = 0.0    # initial bias of the switching unit's logit (0: beta starts near 0.5)
    kl_delay: int = 0           # steps with alpha = 0 before the warm-up (0: the paper's plain Eq. 3)
    kl_warmup: int = 0          # steps over which alpha ramps up linearly from 0 (0: the paper's plain Eq. 3)
    gumbel_switch: bool = False  # binary beta: a straight-through Gumbel-sigmoid sample in training, H(logit) in eval
    zero_init_edit: bool = False  # start the decoder at U = 0 exactly (see `hypernetwork`)
    per_step_embedding: bool = False  # s_t per step (both directions' GRU states at t) instead of one s per episode
    free_bits: float = 0.0      # per code dimension, nats per step: the KL of a dimension is not penalised below it
    read_norm: bool = False     # the metacontroller reads LayerNorm(e_t) (no parameters), not the raw residual
    logvar_init: float | None = None  # start the encoder's log-variance biases here (None: PyTorch's default init)
    kl_per_switch: bool = False  # weight each step's KL penalty by its beta (NOT Eq. 3, whose KL is unweighted)
    switch_temperature: float = 1.0
    lr_decay_from: int | None = None  # from this step on, the lr decays by a cosine to a tenth at the last step
                                      # (None: constant, as Table A9)
    cache_stream: bool = False  # train on a StreamCache: the frozen base model's blocks below the controlled layer
                                # run once per episode, not once per draw (faster; float32 D per step of data)
    force_switch: bool = False  # beta_t = 1 at every step (the "no temporal abstraction" baseline, App. C.4.1)
    co_train: bool = False      # train the base model jointly (App. C.4.2)
    time_budget_s: float | None = None   # stop early after this many seconds
    injection_episodes: int = 200        # episodes per subgoal in the code-injection test


@dataclass
class SweepConfig:
    """The rate-distortion sweep of Fig. 7: alpha x seeds, frozen and co-trained base model."""
    alphas: tuple = (0.0, 0.05, 0.1, 0.17, 0.3, 0.5, 1.0)
    seeds: int = 3
    steps: int = 1_500          # metacontroller steps per point (frozen base)
    co_train_steps: int = 1_500  # steps when the base model trains jointly, from scratch


@dataclass
class CompILEConfig:
    """The CompILE baseline (Kipf et al. 2019; App. C.4.3, Tables A11-A12), sized like the metacontroller."""
    segments: int = 4           # M
    n_z: int = 8
    hidden: int = 64
    hyp_hidden: int = 32
    rank: int = 16
    length_mean: float = 10.0   # Poisson prior mean of a segment's length (a colour pair takes ~10 steps)
    temperature: float = 1.0    # Gumbel-softmax temperature of the boundaries
    alpha_z: float = 0.1        # weight of KL(q(z_i) || N(0, I))
    alpha_b: float = 0.1        # weight of KL(q(b_i) || truncated Poisson prior)
    steps: int = 1_500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.03


@dataclass
class RLConfig:
    """Internal RL and its baselines (App. C.5, D.3; Table A13). Paper (grid): batch 1024 episodes, AdamW
    lr 3e-5 scanned over 3e-6 .. 3e-4, a 1-layer SSM policy of width 256, up to ~1e6 episodes."""
    episodes: int = 6_144       # episodes per RL run
    batch_episodes: int = 256
    lrs: tuple = (3e-4, 3e-3)   # each method's lr scan (first seed); the best lr then runs every seed
    seeds: int = 3
    epochs: int = 4             # PPO passes over each batch
    clip: float = 0.2
    weight_decay: float = 0.0
    hidden: int = 64            # the policy's recurrent width
    base_episodes: int = 20_000  # episodes sampled to estimate the pretrained model's own success
    task: str = "0-1-2-3-4-5-6-7-0-1-2-3"
    methods: tuple = ("internal", "raw_action", "forced_switch", "co_trained", "compile")   # Fig. 8's curves
    expert_episodes: int = 0    # ant: episodes to measure the expert's success on the task (Fig. 8b normalises by it)


@dataclass
class Preset:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    compile: CompILEConfig = field(default_factory=CompILEConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    meta_eq3: MetaConfig | None = None   # the paper's Eq. 3 as stated, for Fig. 7's sweep and the forced-switch
                                         # and co-trained baselines (None: they train like `meta`)


# Four off-by-default remedies for Eq. 3's posterior collapse (the KL held off, then warmed up; a precise posterior
# at first; a normalised read of the stream), the KL paid per switch (NOT Eq. 3) and binary switches: with batches
# of 256 they make the metacontroller switch at the subgoal boundaries (deviation 7)
ALIGNED = dict(kl_delay=500, kl_warmup=500, logvar_init=-6.0, read_norm=True, kl_per_switch=True,
               gumbel_switch=True, switch_temperature=0.5)

PRESETS = {
    # seconds: for tests and the notebook's fast switch; learns little
    "tiny": Preset(
        data=DataConfig(n_train=2_000, n_eval=400),
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64),
        pretrain=PretrainConfig(steps=60, batch_size=32, lr=3e-3, warmup=10, eval_every=30),
        probe=ProbeConfig(max_iter=50),
        control=ControlConfig(rank=4, steps=30, batch_size=32, eval_episodes=64),
        meta=MetaConfig(rank=4, steps=30, batch_size=16, injection_episodes=32, cache_stream=True,
                        **{**ALIGNED, "kl_delay": 10, "kl_warmup": 10}),
        meta_eq3=MetaConfig(rank=4, steps=30, batch_size=16),
        sweep=SweepConfig(alphas=(0.0, 1.0), seeds=1, steps=10, co_train_steps=10),
        compile=CompILEConfig(hidden=16, rank=4, steps=20, batch_size=16),
        rl=RLConfig(episodes=64, batch_episodes=32, lrs=(1e-3,), seeds=2, hidden=16, base_episodes=256),
    ),
    # the default: the paper's findings from scratch on 2 CPU cores
    "cpu": Preset(meta=MetaConfig(steps=5_000, batch_size=256, cache_stream=True, **ALIGNED), meta_eq3=MetaConfig()),
    # the paper's sizes (App. D.1, Tables A3-A8), for a GPU
    "paper": Preset(
        data=DataConfig(n_train=2_000_000, n_eval=4_000),
        model=ModelConfig(d_model=256, n_layers=6, n_heads=4, d_mlp=512),
        pretrain=PretrainConfig(steps=256_000, batch_size=1024, lr=3e-4, warmup=0, min_lr_frac=1.0,
                                eval_every=4_000),
        meta=MetaConfig(steps=64_000, batch_size=512),
        compile=CompILEConfig(steps=64_000, batch_size=512),
        sweep=SweepConfig(steps=16_000, co_train_steps=64_000),
        rl=RLConfig(episodes=1_024_000, batch_episodes=1024, lrs=(3e-6, 3e-5, 3e-4), hidden=256,
                    base_episodes=1_000_000),
    ),
}


ANT = dict(mixer="hawk", head="gaussian", encoder="linear", obs_weight=10.0)   # the ant's base model (App. D.1)
ANT_RL = dict(task="0-1-2-3", methods=("internal", "raw_action", "forced_switch"))
PRESETS.update({
    # the ant world (App. A.2): continuous observations, 8 torques, a Hawk SSM, full-rank controllers
    "ant-tiny": Preset(
        data=DataConfig(env="ant", n_train=12, n_eval=8, noise=0.1, n_meta=6),
        model=ModelConfig(d_model=16, n_layers=2, d_mlp=32, **ANT),
        pretrain=PretrainConfig(steps=10, batch_size=4, lr=3e-3, warmup=2, eval_every=10),
        probe=ProbeConfig(max_iter=20),
        control=ControlConfig(rank=0, steps=5, batch_size=4, eval_episodes=4, task="0-1-2-3"),
        meta=MetaConfig(rank=0, steps=5, batch_size=4, injection_episodes=4, cache_stream=True),
        sweep=SweepConfig(alphas=(0.0, 1.0), seeds=1, steps=3, co_train_steps=3),
        compile=CompILEConfig(hidden=8, rank=0, steps=3, batch_size=4, length_mean=100.0),
        rl=RLConfig(episodes=8, batch_episodes=4, lrs=(1e-3,), seeds=2, hidden=8, base_episodes=8,
                    expert_episodes=4, task="0-1-2-3"),           # all four baselines: every code path once
    ),
    # the default for --env ant: about an hour on 2 CPU cores
    "ant-cpu": Preset(
        data=DataConfig(env="ant", n_train=800, n_eval=200, noise=0.1, n_meta=400),
        model=ModelConfig(d_model=128, n_layers=4, d_mlp=256, **ANT),
        pretrain=PretrainConfig(steps=4_000, batch_size=16, lr=1e-3, warmup=100, eval_every=1_000),
        control=ControlConfig(rank=0, steps=300, batch_size=16, lr=3e-3, eval_episodes=64, task="0-1-2-3", layers=(2,)),
        meta=MetaConfig(rank=0, steps=300, batch_size=16, injection_episodes=32, cache_stream=True),
        sweep=SweepConfig(steps=300, co_train_steps=300),
        compile=CompILEConfig(rank=0, steps=300, batch_size=16, length_mean=100.0),
        rl=RLConfig(episodes=512, batch_episodes=64, base_episodes=500, expert_episodes=200, **ANT_RL),
    ),
    # the paper's ant sizes (App. D.1, Tables A4, A10, A13), for a GPU
    "ant-paper": Preset(
        data=DataConfig(env="ant", n_train=100_000, n_eval=1_000, noise=0.1, n_meta=10_000),
        model=ModelConfig(d_model=256, n_layers=8, d_mlp=512, **ANT),
        pretrain=PretrainConfig(steps=204_800, batch_size=512, lr=3e-4, warmup=0, min_lr_frac=1.0, eval_every=4_000),
        control=ControlConfig(rank=0, steps=4_000, batch_size=128, lr=3e-4, eval_episodes=256, task="0-1-2-3"),
        meta=MetaConfig(rank=0, steps=32_000, batch_size=128, lr=3e-4),
        compile=CompILEConfig(rank=0, steps=32_000, batch_size=128, length_mean=100.0),
        sweep=SweepConfig(steps=8_000, co_train_steps=32_000),
        rl=RLConfig(episodes=256_000, batch_episodes=256, lrs=(3e-6, 3e-5, 3e-4), hidden=256, base_episodes=10_000,
                    expert_episodes=1_000, **{**ANT_RL, "methods": RLConfig.methods}),
    ),
})
WORLDS = ("grid", "ant")


def get_preset(name: str, env: str = "grid") -> Preset:
    """The preset `name` of world `env` (the ant's presets are stored as "ant-<name>")."""
    if env not in WORLDS:
        raise ValueError(f"unknown environment {env!r}; available: {', '.join(WORLDS)}")
    key = name if env == "grid" else f"ant-{name}"
    if key not in PRESETS or (env == "grid" and name.startswith("ant-")):
        raise ValueError(f"unknown preset {name!r}; choose one of tiny, cpu, paper")
    return copy.deepcopy(PRESETS[key])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ==================================================================================================
# 2. Data: expert episodes (Sec. 2, App. C.1.1)
# ==================================================================================================
class _EpisodeArrays:
    """What the two episode datasets share: every field is an array with one row per episode (or a plain
    setting), saved to and loaded from one .npz file."""

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, idx):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return type(self)(**{k: v[idx] if isinstance(v, np.ndarray) else v for k, v in fields.items()})

    def save(self, path) -> None:
        np.savez_compressed(path, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def load(cls, path):
        with np.load(path) as f:
            return cls(**{k: f[k] if f[k].ndim else f[k].item() for k in f.files})   # 0-d: a plain setting


@dataclass
class Episodes(_EpisodeArrays):
    """Expert episodes of the grid world, stored compactly (an observation is rebuilt on demand from
    the layout and the agent's cell, so 100k episodes take megabytes, not gigabytes).

    Step t of episode i (t < lengths[i]) sees observation o_t (agent cell agent[i, t]) and takes
    action actions[i, t]; agent[i, lengths[i]] is the cell after the last action. Labels below are
    for evaluation only and are never fed to the base model.
    """
    colour_cells: np.ndarray    # (N, n_colours) flat cell index of each colour
    wall_cells: np.ndarray      # (N, n_walls)
    agent: np.ndarray           # (N, Tmax + 1) agent cell before each action (and after the last)
    actions: np.ndarray         # (N, Tmax) expert action, -1 past the end
    lengths: np.ndarray         # (N,) number of actions
    target: np.ndarray          # (N, Tmax) colour the expert is heading to, -1 past the end
    subgoal: np.ndarray         # (N, Tmax) current subgoal (colour pair) id, -1 past the end
    optimal: np.ndarray         # (N, Tmax, A) bool: moves on a shortest path to the target
    task_id: np.ndarray         # (N,) index into the task table
    grid_size: int = 7

    def observations(self, idx, t_max: int, device=None) -> torch.Tensor:
        """(B, t_max + 1, O) one-hot observations o_0 .. o_t_max of episodes idx (envs.grid_observation's
        layout). On a GPU they are built there from the cells: a batch of 1024 can be 0.26 GB to copy."""
        agent, colours, walls = self.agent[idx, : t_max + 1], self.colour_cells[idx, None], self.wall_cells[idx, None]
        if torch.device(device or "cpu").type == "cpu":                # numpy is 3x faster here
            return torch.from_numpy(envs.grid_observation(agent, colours, walls, self.grid_size))
        return grid_observation_torch(*(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.long, device=device)
                                        for x in (agent, colours, walls)), self.grid_size)

    def batch(self, idx, device, obs: bool = True) -> dict:
        """Tensors for a batch, cut to its longest episode (deviation 5); obs=False leaves out the observations."""
        idx = np.sort(np.asarray(idx))
        T = int(self.lengths[idx].max())
        as_t = lambda x, dt: torch.as_tensor(np.ascontiguousarray(x), dtype=dt, device=device)
        return {
            **({"obs": self.observations(idx, T, device)} if obs else {}),   # (B, T+1, O)
            "actions": as_t(self.actions[idx, :T], torch.long),           # (B, T)
            "mask": as_t(np.arange(T) < self.lengths[idx, None], torch.bool),
            "subgoal": as_t(self.subgoal[idx, :T], torch.long),
            "target": as_t(self.target[idx, :T], torch.long),
            "optimal": as_t(self.optimal[idx, :T], torch.bool),
        }


def grid_observation_torch(agent, colour_cells, wall_cells, G: int = 7) -> torch.Tensor:
    """envs.grid_observation on torch tensors of cell indices (on any device), broadcasting the same way."""
    batch = torch.broadcast_shapes(agent.shape, colour_cells.shape[:-1], wall_cells.shape[:-1])
    cells = torch.cat([colour_cells.expand(batch + colour_cells.shape[-1:]),
                       wall_cells.expand(batch + wall_cells.shape[-1:]),
                       agent.expand(batch)[..., None]], -1)                             # (..., C)
    return F.one_hot(cells, G * G).flatten(-2).float()


def generate_episodes(n: int, seed: int, task=None, eps: float = 0.0, G: int = 7, O: int = 8,
                      W: int = 4, T: int = 100, replay: np.ndarray | None = None) -> Episodes:
    """Roll out the shortest-path expert in n episodes at once (vectorised numpy).

    task None draws one of the 16 pretraining tasks per episode (Table A1). Episode i uses
    seed + i, so disjoint seed ranges give disjoint train and evaluation sets. With `replay` (n, steps) actions,
    say rollout(model, task, n, seed, record=True)["actions"], those moves are made instead of the expert's,
    and the labels (target, subgoal, shortest-path moves) say what the expert would have done in
    the states they reach.
    """
    if replay is not None and (eps > 0 or replay.shape[0] != n):
        raise ValueError(f"replay must hold the moves of all n = {n} episodes (got {len(replay)}), and eps must be 0 "
                         "(the moves are given)")
    env = envs.GridPinpadVec(n, task=task, G=G, O=O, W=W, T=T)
    env.reset(seed=seed)
    rng = np.random.default_rng([seed, 1])
    agent, actions, target, optimal = [env.agent.copy()], [], [], []
    while not env.done.all():
        live = ~env.done
        if replay is None:
            a = envs.expert_actions(env, rng, eps)
        elif len(target) >= replay.shape[1] or not np.isin(replay[live, len(target)], range(4)).all():
            raise ValueError(f"replay ends or holds a non-move at step {len(target)} of a running episode")
        else:
            a = replay[:, len(target)]
        target.append(np.where(live, env.target, -1))
        optimal.append(envs.optimal_moves(env) & live[:, None])
        actions.append(np.where(live, a, -1))
        env.step(a)
        agent.append(env.agent.copy())
    target = np.stack(target, 1).astype(np.int8)
    task_table = {t: i for i, t in enumerate(envs.GRID_PRETRAIN_TASKS)}
    cell = np.int8 if G * G <= 128 else np.int16                     # cell indices 0 .. G*G-1
    return Episodes(
        colour_cells=env.colour_cells.astype(cell), wall_cells=env.wall_cells.astype(cell),
        agent=np.stack(agent, 1).astype(cell), actions=np.stack(actions, 1).astype(np.int8), lengths=env.t.copy(),
        target=target, subgoal=np.where(target >= 0, target // 2, -1), optimal=np.stack(optimal, 1),
        task_id=np.array([task_table.get(tuple(t[t >= 0]), -1) for t in env.tasks]), grid_size=G)


@dataclass
class AntEpisodes(_EpisodeArrays):
    """Expert episodes of the ant world (App. A.2), with the same `batch` interface as `Episodes`.

    Observations and torques are continuous, so they are stored whole (float32; about 100 kB per
    500-step episode). Step t of episode i (t < lengths[i]) sees obs[i, t] and takes actions[i, t].
    subgoal[i, t] is the colour being walked to (one colour is one abstract action in the ant world),
    for evaluation only.
    """
    obs: np.ndarray             # (N, Tmax + 1, O)
    actions: np.ndarray         # (N, Tmax, 8), 0 past the end
    lengths: np.ndarray         # (N,) number of actions
    subgoal: np.ndarray         # (N, Tmax), -1 past the end
    success: np.ndarray         # (N,) bool: did the expert complete the task
    task_id: np.ndarray         # (N,) index into envs.ANT_PRETRAIN_TASKS (-1: another task)

    def batch(self, idx, device, obs: bool = True) -> dict:
        idx = np.sort(np.asarray(idx))
        T = int(self.lengths[idx].max())
        as_t = lambda x, dt: torch.as_tensor(np.ascontiguousarray(x), dtype=dt, device=device)
        subgoal = as_t(self.subgoal[idx, :T], torch.long)
        return {**({"obs": as_t(self.obs[idx, :T + 1], torch.float32)} if obs else {}),
                "actions": as_t(self.actions[idx, :T], torch.float32),
                "mask": as_t(np.arange(T) < self.lengths[idx, None], torch.bool), "subgoal": subgoal, "target": subgoal}


def generate_ant_episodes(n: int, seed: int, task=None, noise: float = 0.0, T: int = 500,
                          progress: bool = False, workers: int = 1) -> AntEpisodes:
    """Roll out the ant expert (envs.ant_expert_episode) in n episodes (about 0.2 s each on one core), spread
    over `workers` processes; the episodes do not depend on the number of workers. Episode i is
    AntPinpad.reset(seed=seed + i); noise is the std of the Gaussian torque noise (0: the noise-free expert
    the paper uses for the metacontroller's data). Failed episodes are kept."""
    make = functools.partial(envs.ant_expert_episode, task=task, noise=noise, T=T)
    bar = lambda it: tqdm(it, total=n, desc="ant expert episodes", disable=not progress, mininterval=2)
    if workers > 1:
        import multiprocessing                                        # forked workers run numpy and MuJoCo only
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            episodes = list(bar(pool.imap(make, range(seed, seed + n))))
    else:
        episodes = [make(s) for s in bar(range(seed, seed + n))]
    Tmax = max(len(a) for _, a, _, _, _ in episodes)
    pad = lambda x, length, value: np.concatenate([x, np.full((length - len(x),) + x.shape[1:], value, x.dtype)])
    table = {t: k for k, t in enumerate(envs.ANT_PRETRAIN_TASKS)}
    return AntEpisodes(obs=np.stack([pad(o, Tmax + 1, 0) for o, *_ in episodes]).astype(np.float32),
                       actions=np.stack([pad(a, Tmax, 0) for _, a, *_ in episodes]).astype(np.float32),
                       lengths=np.array([len(a) for _, a, *_ in episodes]),
                       subgoal=np.stack([pad(g, Tmax, -1) for _, _, g, *_ in episodes]),
                       success=np.array([s for *_, s, _ in episodes]),
                       task_id=np.array([table.get(t, -1) for *_, t in episodes]))


# ==================================================================================================
# 3. Base model: a causal transformer over observations (Sec. 2, App. D.1)
# ==================================================================================================
class EgoEncoder(nn.Module):
    """Embed a grid observation re-centred on the agent (deviation 1).

    The linear embedding of an agent-centred view, written as a sum of lookups: one learned vector
    per (object, offset of the object from the agent), plus one per absolute agent cell (which tells
    where the edges of the world are). It needs exactly one 1 per channel, as the grid observation
    has, and costs C lookups per token instead of a (C (2G-1)^2)-wide matrix product.
    """

    def __init__(self, obs_dim: int, d_model: int, grid_size: int):
        super().__init__()
        G = grid_size
        self.G, self.C, self.S = G, obs_dim // (G * G), 2 * G - 1
        if self.C * G * G != obs_dim:
            raise ValueError(f"observation size {obs_dim} is not a whole number of {G}x{G} channels")
        self.objects = nn.Embedding((self.C - 1) * self.S ** 2, d_model)
        self.agent_cell = nn.Embedding(G * G, d_model)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        B, T, _ = obs.shape
        G, C, S = self.G, self.C, self.S
        cell = obs.view(B, T, C, G * G).argmax(-1)                    # (B, T, C) cell of each object
        row, col = cell // G, cell % G
        offset = (row[..., :-1] - row[..., -1:] + G - 1) * S + (col[..., :-1] - col[..., -1:] + G - 1)
        idx = offset + S * S * torch.arange(C - 1, device=obs.device)   # (B, T, C-1)
        return self.objects(idx).sum(-2) + self.agent_cell(cell[..., -1])   # (B, T, D)


def symexp(x: torch.Tensor) -> torch.Tensor:
    """The inverse of envs.symlog, sign(x) (e^|x| - 1): the ant's proprioception is observed through symlog."""
    return x.sign() * x.abs().expm1()


class AntEgoEncoder(nn.Module):
    """Embed an ant observation together with the same observation turned into the torso's frame (deviation 22).

    The gait walks along its command turned into the torso's frame (envs.gait_action), so its torques depend on
    where the next cell towards the target lies in the torso's frame, while the observation gives every colour
    cell and wall in world axes. This encoder appends the object offsets and the torso's horizontal velocity
    rotated by minus the torso's yaw (read from the observed quaternion), then embeds everything linearly: a
    fixed, parameter-free re-expression of the same observation, as EgoEncoder is for the grid. Indices follow
    envs.AntPinpad's observation layout.
    """

    QUAT = slice(1, 5)      # symlog of the torso's quaternion (w, x, y, z): qpos[3:7]
    VEL = slice(13, 15)     # symlog of the torso's linear velocity x, y in world axes: qvel[0:2]
    OBJECTS = 27 + 2        # after the proprioception and the global x, y: the objects' offsets, (x, y) each

    def __init__(self, obs_dim: int, d_model: int, n_objects: int):
        super().__init__()
        self.n_objects = n_objects
        self.linear = nn.Linear(obs_dim + 2 * n_objects + 2, d_model)

    @classmethod
    def yaw(cls, obs: torch.Tensor) -> torch.Tensor:
        """(...,) the torso's heading about the vertical, read from the observed quaternion."""
        w, x, y, z = symexp(obs[..., cls.QUAT]).unbind(-1)
        return torch.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))

    def ego_features(self, obs: torch.Tensor) -> torch.Tensor:
        """(..., 2 n_objects + 2): each object's offset from the torso, then the torso's velocity, in the torso's
        frame (x forward along the torso's heading, y to its left)."""
        yaw = self.yaw(obs)
        c, s = torch.cos(yaw)[..., None], torch.sin(yaw)[..., None]
        world = torch.cat([obs[..., self.OBJECTS: self.OBJECTS + 2 * self.n_objects],
                           symexp(obs[..., self.VEL])], -1).unflatten(-1, (-1, 2))   # (..., n + 1, 2)
        wx, wy = world.unbind(-1)
        return torch.stack([c * wx + s * wy, -s * wx + c * wy], -1).flatten(-2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([obs, self.ego_features(obs)], -1))


def relative_bucket(rel: torch.Tensor, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal relative-position buckets: distances < n/2 exact, then log-spaced up to max_distance."""
    exact = n_buckets // 2
    log_ratio = torch.log(rel.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return torch.where(rel < exact, rel, far)


class Attention(nn.Module):
    """Multi-head causal self-attention with a learned relative-position bias per head and bucket."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.H, self.cfg = cfg.n_heads, cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.rel_bias = nn.Parameter(torch.zeros(cfg.n_buckets, cfg.n_heads))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x (B, T, D) at absolute positions pos (T,); cache holds keys and values of earlier positions."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)   # (B, H, T, D/H)
        k_pos = pos
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                k_pos = torch.cat([cache["pos"], pos])
            cache.update(k=k, v=v, pos=k_pos)
        rel = pos[:, None] - k_pos[None, :]                           # (T, Tk) query minus key position
        bias = self.rel_bias[relative_bucket(rel.clamp(min=0), self.cfg.n_buckets, self.cfg.max_distance)]
        bias = bias.permute(2, 0, 1).masked_fill(rel < 0, float("-inf"))   # (H, T, Tk), causal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)) with a ReLU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.mixer = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_mlp), nn.ReLU(), nn.Linear(cfg.d_mlp, cfg.d_model))

    def forward(self, x, pos, cache=None):
        x = x + self.mixer(self.norm1(x), pos, cache)
        return x + self.mlp(self.norm2(x))


class RGLRU(nn.Module):
    """The real-gated linear recurrent unit of Griffin (De et al. 2024, Eqs. 1-4), per channel:

        r_t = sigmoid(W_a x_t + b_a),  i_t = sigmoid(W_x x_t + b_x),  a_t = a^(c r_t),  a = sigmoid(Lambda)
        h_t = a_t * h_t-1 + sqrt(1 - a_t^2) * (i_t * x_t)
    with c = 8 and a^c initialised uniform in [0.9, 0.999] (the paper's text). The state h is what a rollout
    caches. The recurrence runs as a loop over time, except on a GPU when one step's state is small (at most
    `scan_max` numbers, batch x width): there a loop launches T kernels too small to fill the device, and
    `linear_scan` does the same in log2(T) rounds (the two agree to rounding; a test checks it). Measured on
    an H200 (T = 500, one AdamW step of the whole model): 5x faster at the ant-cpu preset's 16 x 128, 1.5x
    slower (one measurement) at the ant-paper preset's 512 x 256, where the loop's steps fill the GPU and the
    scan moves log2(T) times the data (`python experiments/timing.py`; experiments/README.md, section 7).
    """
    c = 8.0
    scan_max = 2 ** 16

    def __init__(self, width: int):
        super().__init__()
        self.gate_a, self.gate_x = nn.Linear(width, width), nn.Linear(width, width)
        a = torch.empty(width).uniform_(0.9, 0.999) ** (1 / self.c)
        self.Lambda = nn.Parameter(torch.log(a / (1 - a)))

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None):
        """x (B, T, W), h (B, W) or None -> outputs (B, T, W) and the last state (B, W). In the parameters' precision
        even under a bfloat16 autocast, where a_t close to 1 (up to 0.999) would round to 0.996 or 1."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(self.Lambda.dtype)
            log_a = -self.c * F.softplus(-self.Lambda) * torch.sigmoid(self.gate_a(x))    # log a_t <= 0
            b = torch.sqrt((-torch.expm1(2 * log_a)).clamp(min=1e-8)) * torch.sigmoid(self.gate_x(x)) * x
            h = torch.zeros_like(x[:, 0]) if h is None else h.to(x.dtype)
            scan = x.is_cuda and x.shape[1] > 1 and x.shape[0] * x.shape[2] <= self.scan_max
            y = (linear_scan if scan else linear_loop)(log_a.exp(), b, h)
        return y, y[:, -1]


def linear_loop(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All states of h_t = a_t * h_t-1 + b_t (a, b: (B, T, W); h0: (B, W)), one step after another."""
    h, ys = h0, []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):                   # unbind: one gradient copy, not T
        h = a_t * h + b_t
        ys.append(h)
    return torch.stack(ys, 1)


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The states of `linear_loop` in ceil(log2 T) parallel rounds (Hillis and Steele): after the round with
    offset k, b_t holds the recurrence run from step t - 2k + 1 with a zero state (from step 0 and h0 when
    t < 2k), and a_t the product of the a's over those steps. Products of gates <= 1 only shrink, so this is
    as stable as the loop."""
    b = torch.cat([a[:, :1] * h0[:, None] + b[:, :1], b[:, 1:]], 1)   # fold the initial state into step 0
    k = 1
    while k < b.shape[1]:
        b = torch.cat([b[:, :k], b[:, k:] + a[:, k:] * b[:, :-k]], 1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], 1)
        k *= 2
    return b


class Recurrent(nn.Module):
    """Griffin's recurrent block: GeLU(W_1 x) * RG-LRU(conv(W_2 x)), projected back to D. The causal
    depthwise convolution keeps its last inputs, and the RG-LRU its state, in the cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.gate, self.inp, self.out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.conv = nn.Conv1d(D, D, cfg.conv_width, groups=D)
        self.rglru = RGLRU(D)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, T, D = x.shape
        cache = {} if cache is None else cache
        u = self.inp(x)
        past = cache.get("conv", x.new_zeros(B, self.conv.kernel_size[0] - 1, D))
        u = torch.cat([past, u], 1)                                   # (B, k - 1 + T, D)
        cache["conv"] = u[:, u.shape[1] - past.shape[1]:]
        y, cache["h"] = self.rglru(self.conv(u.transpose(1, 2)).transpose(1, 2), cache.get("h"))
        return self.out(F.gelu(self.gate(x)) * y)


class HawkBlock(nn.Module):
    """Hawk's residual block (the ant's base model): x + recurrent(norm(x)), then x + gated_mlp(norm(x))
    with a GeLU-gated MLP and RMS norms."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.mixer = Recurrent(cfg)
        self.up, self.down = nn.Linear(cfg.d_model, 2 * cfg.d_mlp), nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x, pos, cache=None):
        x = x + self.mixer(self.norm1(x), pos, cache)
        gate, value = self.up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.gelu(gate) * value)


class CategoricalHead(nn.Module):
    """Discrete actions: logits over A moves."""

    def __init__(self, d_model: int, n_actions: int):
        super().__init__()
        self.proj = nn.Linear(d_model, n_actions)

    def forward(self, x):
        return self.proj(x)                                           # (B, T, A) logits

    def log_prob(self, logits, actions):
        return torch.distributions.Categorical(logits=logits).log_prob(actions.clamp(min=0))

    def sample(self, logits, generator=None):
        return torch.multinomial(logits.softmax(-1).reshape(-1, logits.shape[-1]), 1,
                                 generator=generator).view(logits.shape[:-1])

    def mode(self, logits):
        return logits.argmax(-1)


def shortest_path_log_prob(logits: torch.Tensor, optimal: torch.Tensor) -> torch.Tensor:
    """ln p(any shortest-path move) under categorical logits (..., A), optimal (..., A) bool; a large negative
    number, not -inf, where no move is marked (so that masking it out by multiplying gives no NaN)."""
    return torch.logsumexp(logits.log_softmax(-1).masked_fill(~optimal, -1e9), -1)


class GaussianHead(nn.Module):
    """Continuous actions: a diagonal Gaussian whose mean and log-std the residual stream predicts. Its
    "logits" are the concatenated (mean, log_std), (..., 2A)."""

    def __init__(self, d_model: int, action_dim: int):
        super().__init__()
        self.proj = nn.Linear(d_model, 2 * action_dim)

    def forward(self, x):
        mean, log_std = self.proj(x).chunk(2, -1)
        return torch.cat([mean, log_std.clamp(-5, 2)], -1)

    def log_prob(self, params, actions):
        mean, log_std = params.chunk(2, -1)
        return torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)

    def sample(self, params, generator=None):
        mean, log_std = params.chunk(2, -1)
        return mean + log_std.exp() * torch.randn(mean.shape, generator=generator, device=mean.device)

    def mode(self, params):
        return params.chunk(2, -1)[0]


class BaseModel(nn.Module):
    """p(a_t | o_1:t) and p(o_t+1 | o_1:t) from observations alone (Sec. 2).

    `forward` runs whole sequences; `step` appends one time step using a key/value cache. Both can
    return the residual stream after every layer (layer 0 = embedding, layer l = after l blocks) and
    both can apply a residual-stream controller e <- e + U e before block `control.layer` (Eq. 1).
    """

    def __init__(self, cfg: ModelConfig, obs_dim: int, n_actions: int, grid_size: int = 7, env: str = "grid"):
        super().__init__()
        self.cfg, self.obs_dim, self.n_actions, self.env = cfg, obs_dim, n_actions, env
        if cfg.mixer == "attention" and cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}")
        if cfg.mixer == "attention" and not (cfg.n_buckets >= 2 and cfg.max_distance > cfg.n_buckets // 2):
            raise ValueError(f"n_buckets={cfg.n_buckets}, max_distance={cfg.max_distance}: relative_bucket needs "
                             "n_buckets >= 2 and max_distance above n_buckets // 2, the distances with a bucket each")
        blocks = {"attention": Block, "hawk": HawkBlock}
        heads = {"categorical": CategoricalHead, "gaussian": GaussianHead}
        if cfg.mixer not in blocks:
            raise ValueError(f"unknown mixer {cfg.mixer!r}; choose 'attention' or 'hawk'")
        if cfg.head not in heads:
            raise ValueError(f"unknown action head {cfg.head!r}; choose 'categorical' or 'gaussian'")
        if cfg.encoder == "ego" and env == "ant":
            self.encoder = AntEgoEncoder(obs_dim, cfg.d_model, n_objects=(obs_dim - envs.ant_obs_dim(0, 0)) // 2)
        elif cfg.encoder == "ego":
            self.encoder = EgoEncoder(obs_dim, cfg.d_model, grid_size)
        elif cfg.encoder == "linear":
            self.encoder = nn.Linear(obs_dim, cfg.d_model)
        else:
            raise ValueError(f"unknown encoder {cfg.encoder!r}; choose 'ego' or 'linear'")
        self.blocks = nn.ModuleList(blocks[cfg.mixer](cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.action_head = heads[cfg.head](cfg.d_model, n_actions)
        self.obs_head = nn.Linear(cfg.d_model, obs_dim)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype, which the residual stream and the losses keep under a bfloat16 autocast."""
        return self.action_head.proj.weight.dtype

    def forward(self, obs, control=None, return_residuals=False, cache=None, start=0, from_layer=0):
        """obs (B, T, O) at time steps start .. start+T-1. Returns a dict with action logits (B, T, A),
        the final normed stream h (B, T, D), and the residual list [(B, T, D)] * (L+1) if asked.
        With from_layer = l > 0, obs is instead the residual stream before block l (B, T, D), as `stream` gives
        it, and only blocks l.. run (the residual list then starts at layer l)."""
        B, T, _ = obs.shape
        pos = torch.arange(start, start + T, device=obs.device)
        if control is not None and not from_layer <= control.layer < len(self.blocks):
            raise ValueError(f"a control at layer {control.layer} cannot edit a stream given at layer {from_layer} of "
                             f"a model with {len(self.blocks)} blocks (layers {from_layer} .. {len(self.blocks) - 1})")
        e = self.encoder(obs).to(self.dtype) if from_layer == 0 else obs   # (B, T, D), not bfloat16 under autocast
        residuals = [e]
        for l, block in enumerate(self.blocks[from_layer:], from_layer):
            if control is not None and control.layer == l:
                e = e + control(e)                                    # Eq. (1): e <- e + U e
            e = block(e, pos, None if cache is None else cache[l])
            residuals.append(e)
        return self.readout(e, residuals if return_residuals else None)

    @torch.no_grad()
    def stream(self, obs: torch.Tensor, layer: int) -> torch.Tensor:
        """The uncontrolled residual stream before block `layer` (B, T, D) for whole sequences obs (B, T, O):
        what forward computes below a controller at `layer`, which no controller there can change."""
        pos = torch.arange(obs.shape[1], device=obs.device)
        e = self.encoder(obs).to(self.dtype)
        for block in self.blocks[:layer]:
            e = block(e, pos)
        return e

    def readout(self, e: torch.Tensor, residuals: list | None = None) -> dict:
        """forward's output from the last block's stream e: the final norm h and the action logits."""
        h = self.norm(e)
        return {"logits": self.action_head(h), "h": h, **({} if residuals is None else {"residuals": residuals})}

    def new_cache(self) -> dict:
        return {"t": 0, **{l: {} for l in range(len(self.blocks))}}

    def keep_episodes(self, cache: dict, keep: torch.Tensor) -> None:
        """Cut a step-by-step cache to the episodes `keep` (indices into its batch), for example the ones still
        running. Every cached tensor has the batch first, except the attention's key positions ("pos")."""
        for l in range(len(self.blocks)):
            cache[l] = {k: v if k == "pos" else v[keep] for k, v in cache[l].items()}

    @torch.no_grad()
    def step(self, obs, cache: dict, control=None) -> dict:
        """One time step for a batch of running episodes: obs (B, O) -> logits (B, A)."""
        out = self.forward(obs[:, None], control, cache=cache, start=cache["t"])
        cache["t"] += 1
        return {k: v[:, 0] for k, v in out.items()}

    def loss(self, batch: dict, control=None, obs_loss: bool = True, shortest: bool = False) -> dict:
        """Eq. (5): sum_t -ln p(a_t | o_1:t) - lambda ln p(o_t+1 | o_1:t), averaged over valid steps
        (obs_loss=False skips the observation term, for stages that train only a controller). With
        shortest=True (grid only) the action term is -ln p(any shortest-path move), the expert's label of the
        state, whichever move was taken there (deviation 21, an option: data with random moves)."""
        obs, actions, mask = batch.get("obs"), batch["actions"], batch["mask"]
        if "stream" in batch:                                         # a StreamCache's batch: the blocks from its layer
            out = self(batch["stream"], control, from_layer=batch["layer"])
        else:
            out = self(obs[:, :-1], control)
        m, logits = mask.float(), out["logits"].to(self.dtype)       # full-precision losses under autocast too
        if shortest:
            scored = (mask & batch["optimal"].any(-1)).float()
            action_nll = -(shortest_path_log_prob(logits, batch["optimal"]) * scored).sum() / scored.sum()
        else:
            action_nll = -(self.action_head.log_prob(logits, actions) * m).sum() / m.sum()
        obs_nll = torch.zeros(())
        if obs_loss and self.cfg.obs_weight > 0:
            if obs is None:
                raise ValueError("the next-observation loss needs the batch's observations; a StreamCache batch has "
                                 "none (pass obs_loss=False)")
            pred = self.obs_head(out["h"]).to(self.dtype)
            if self.cfg.head == "categorical":                        # one-hot grid: Bernoulli per dimension
                obs_nll = F.binary_cross_entropy_with_logits(pred, obs[:, 1:], reduction="none")
            else:                                                     # continuous: unit-variance Gaussian
                obs_nll = 0.5 * (pred - obs[:, 1:]) ** 2
            obs_nll = (obs_nll.sum(-1) * m).sum() / m.sum()
        return {"loss": action_nll + self.cfg.obs_weight * obs_nll, "action_nll": action_nll,
                "obs_nll": obs_nll, "out": out}


# ==================================================================================================
# 4. Residual-stream control (Eq. 1)
# ==================================================================================================
@dataclass
class Control:
    """A linear edit of the residual stream, e <- e + U e, before block `layer`, in one of three forms:

      low rank:  U = B A^T with A, B (..., D, R), applied as (e A) B^T in O(D R) per token; with `mix`
                 (..., J) given, A and B are shared banks (J, D, R) mixed per token, A = sum_j mix_j A_j and
                 B likewise, applied as e A = sum_j mix_j (e A_j), then B (e A), so that neither factor is built
                 per token (a low-rank hypernetwork's last layer, or a one-hot choice among controllers);
      mixture:   U = sum_j mix_j bank_j + bias, a per-token mixture (..., J) of J shared full matrices
                 bank (J, D, D), applied as sum_j mix_j (bank_j e) + bias e: full rank without a D x D
                 matrix per token (a hypernetwork's last layer, or a one-hot choice among controllers);
      explicit:  U (..., D, D), for small examples and tests.
    Leading dims broadcast against the residual's (B, T), so one U can be shared or each token can have its own.
    """
    layer: int
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    U: torch.Tensor | None = None
    mix: torch.Tensor | None = None
    bank: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        """U e for e (B, T, D)."""
        if self.U is not None:
            return (self.U @ e[..., None])[..., 0]                    # (B, T, D)
        if self.A is not None and self.mix is not None:                # low-rank banks (J, D, R)
            J, D, R = self.A.shape
            eA = (e @ self.A.transpose(0, 1).reshape(D, J * R)).unflatten(-1, (J, R))   # (B, T, J, R): e A_j
            v = (self.mix[..., None] * eA).sum(-2)                    # (B, T, R): e A
            return (self.mix[..., None] * v[..., None, :]).flatten(-2) @ self.B.transpose(1, 2).reshape(J * R, D)
        if self.bank is not None:
            edits = torch.einsum("jde,...e->...jd", self.bank, e)     # (B, T, J, D): every bank_j e
            out = (self.mix[..., None] * edits).sum(-2)
            return out if self.bias is None else out + e @ self.bias.transpose(-1, -2)
        return ((e[..., None, :] @ self.A) @ self.B.transpose(-1, -2))[..., 0, :]   # (B, T, D)

    def step_view(self) -> "Control":
        """The same control for one time step: per-episode tensors (B, D, R), (B, D, D) or (B, J) gain the T axis."""
        add_t = lambda x: x if x is None or x.dim() < 3 or self.mix is not None else x[:, None]   # banks stay
        mix = self.mix if self.mix is None or self.mix.dim() < 2 else self.mix[:, None]
        return Control(self.layer, add_t(self.A), add_t(self.B), add_t(self.U), mix, self.bank, self.bias)

    def rows(self, index: torch.Tensor) -> "Control":
        """The control of some of the batch's episodes, for a control in step view (or per token): tensors with both
        leading (B, T) dims are indexed on B; shared ones (without them, and the bank and bias) stay."""
        pick = lambda x, dims: x[index] if x is not None and x.dim() == dims else x
        return Control(self.layer, pick(self.A, 4), pick(self.B, 4), pick(self.U, 4), pick(self.mix, 3),
                       self.bank, self.bias)


# ==================================================================================================
# 5. Pretraining (Eq. 5) and the quality gate
# ==================================================================================================
def build_model(cfg: ModelConfig, env: str = "grid") -> BaseModel:
    """A fresh base model for world `env`; model.env names the world it acts in (rollouts read it)."""
    if env == "ant":                                                  # 41 observation numbers, 8 torques
        if cfg.head != "gaussian" or cfg.encoder not in ("linear", "ego"):
            raise ValueError("the ant needs head='gaussian' and encoder 'linear' or 'ego' (its actions and "
                             f"observations are continuous), got head={cfg.head!r}, encoder={cfg.encoder!r}")
        model = BaseModel(cfg, obs_dim=envs.ant_obs_dim(), n_actions=8, env="ant")
    elif env == "grid":
        G = 7
        model = BaseModel(cfg, obs_dim=(8 + 4 + 1) * G * G, n_actions=len(envs.ACTIONS), grid_size=G)
    else:
        raise ValueError(f"unknown environment {env!r}; available: {', '.join(WORLDS)}")
    return model


def cosine_decay(lr: float, step: int, start: int, end: int, min_frac: float) -> float:
    """lr until `start`, then a cosine from lr down to min_frac * lr at `end`, and min_frac * lr after it."""
    progress = min(1.0, max(0, step - start) / max(1, end - start))
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_frac * lr (deviation 2)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cosine_decay(cfg.lr, step, cfg.warmup, cfg.steps, cfg.min_lr_frac)


def length_bucketed_batch(by_length: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Episodes of similar length, so that cutting the batch to its longest episode wastes little compute
    on padding. The length-sorted order is cut into near-equal buckets of 8 to 16 batches (one bucket when
    there are fewer episodes than 8 batches hold); a uniformly drawn episode picks the bucket, and the batch
    is drawn from that bucket without replacement. Every episode is then equally likely to be in a batch (a
    window sliding over the sorted order would draw the shortest and the longest episodes less often)."""
    bounds = np.linspace(0, len(by_length), max(1, len(by_length) // (8 * batch_size)) + 1).astype(np.int64)
    k = np.searchsorted(bounds, rng.integers(len(by_length)), side="right") - 1
    size = bounds[k + 1] - bounds[k]
    return by_length[bounds[k] + rng.choice(size, size=min(batch_size, size), replace=False)]


def pretrain(model: BaseModel, data: Episodes, eval_data: Episodes, cfg: PretrainConfig, seed: int = 0,
             probe_cfg: ProbeConfig | None = None, progress: bool = True) -> dict:
    """Train the base model on expert data, measuring the quality gate every cfg.eval_every steps (and at the end)."""
    if cfg.action_loss not in ("expert", "shortest"):
        raise ValueError(f"unknown action_loss {cfg.action_loss!r}; choose 'expert' or 'shortest'")
    if cfg.action_loss == "shortest" and model.env != "grid":
        raise ValueError("action_loss='shortest' needs the grid's shortest-path labels; the ant has none")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = {k: [] for k in ("step", "loss", "action_nll", "obs_nll", "eval_step", "eval_time")}
    by_length = np.argsort(data.lengths, kind="stable")
    t0, bar = time.time(), tqdm(range(cfg.steps), desc="pretrain", disable=not progress, mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        model.train()
        batch = data.batch(length_bucketed_batch(by_length, cfg.batch_size, rng), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            out = model.loss(batch, shortest=cfg.action_loss == "shortest")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k in ("loss", "action_nll", "obs_nll"):
            history[k].append(out[k].item())
        history["step"].append(step)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            gate = quality_gate(model, eval_data, probe_cfg)
            history["eval_step"].append(step + 1)
            history["eval_time"].append(time.time() - t0)
            for k, v in gate.items():
                if k != "passed":
                    history.setdefault(k, []).append(v)
            bar.write(f"step {step + 1:6d}  {time.time() - t0:6.0f}s  action nll {out['action_nll'].item():.3f}  " +
                      "  ".join(f"{k} {v:.3f}" for k, v in gate.items() if k != "passed"))
        bar.set_postfix(nll=f"{out['action_nll'].item():.3f}")
        if cfg.time_budget_s is not None and time.time() - t0 > cfg.time_budget_s:
            break
    history["wall_time"] = time.time() - t0
    return history


@torch.no_grad()
def collect(model: BaseModel, data: Episodes, batch_size: int = 256) -> dict:
    """Residuals after every layer and the action distribution (grid: probabilities; ant: the mean, with the
    expert's actions) on all valid steps of `data`."""
    model.eval()
    device = next(model.parameters()).device
    keep = {"residuals": [], "probs": [], "mean_action": [], "actions": [], "subgoal": [], "target": [], "optimal": []}
    for i in range(0, len(data), batch_size):
        b = data.batch(np.arange(i, min(i + batch_size, len(data))), device)
        out = model(b["obs"][:, :-1], return_residuals=True)
        m = b["mask"]
        keep["residuals"].append(torch.stack([r[m] for r in out["residuals"]]))   # (L+1, n, D)
        if model.cfg.head == "categorical":
            keep["probs"].append(out["logits"][m].softmax(-1))
        else:                                                         # continuous: the predicted mean torque
            keep["mean_action"].append(model.action_head.mode(out["logits"])[m])
            keep["actions"].append(b["actions"][m])
        for k in ("subgoal", "target", "optimal"):
            if k in b:                                                # the ant has no discrete optimal moves
                keep[k].append(b[k][m])
    return {k: torch.cat(v, 1 if k == "residuals" else 0) for k, v in keep.items() if v}


def fit_probe(x_train, y_train, x_test, y_test, n_classes: int, cfg: ProbeConfig) -> float:
    """Multinomial logistic regression (deviation 6); returns test accuracy."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    probe = nn.Linear(x_train.shape[1], n_classes).to(x_train.device)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=cfg.max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x_train), y_train) + cfg.l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (probe(x_test).argmax(-1) == y_test).float().mean().item()


def probe_layers(model: BaseModel, data: Episodes, cfg: ProbeConfig | None = None, layers=None) -> np.ndarray:
    """Accuracy of a linear probe of the current subgoal on the residual after each layer (App. C.2).
    Fitted on the first half of the episodes, scored on the second half."""
    cfg = cfg or ProbeConfig()
    half = len(data) // 2
    a, b = collect(model, data.subset(slice(0, half))), collect(model, data.subset(slice(half, None)))
    n_classes = int(max(a["subgoal"].max(), b["subgoal"].max())) + 1
    layers = range(len(model.blocks) + 1) if layers is None else layers
    return np.array([fit_probe(a["residuals"][l], a["subgoal"], b["residuals"][l], b["subgoal"], n_classes, cfg)
                     for l in layers])


GATES = {   # what "the base model knows the task" means in each world: (measure, threshold)
    "grid": (("sp_determined", 0.95), ("probe_mid", 0.5)),
    "ant": (("action_r2", 0.9), ("probe_mid", 0.5)),
}


def gate_text(env: str) -> str:
    return " and ".join(f"{k} >= {v}" for k, v in GATES[env])


def quality_gate(model: BaseModel, data, probe_cfg: ProbeConfig | None = None) -> dict:
    """Does the base model know the task? (the gate every later stage checks)

    grid, sp_determined: mean action probability on shortest-path moves at steps whose target is the second
      colour of a pair (fixed by the history: the partner of the colour just visited). Gate: >= 0.95.
      sp_all and sp_first: the same on all steps, and on steps heading for the first colour of a pair.
    ant, action_r2: the fraction of the variance of the noise-free expert's torques on held-out episodes that
      the model's mean action explains. Gate: >= 0.9.
    both, probe_mid: subgoal probe accuracy after block L/2 on held-out episodes (chance 0.25). Gate: >= 0.5.
    """
    c = collect(model, data)
    if model.env == "grid":
        sp = (c["probs"] * c["optimal"]).sum(-1)
        determined = c["target"] % 2 == 1
        report = {"sp_all": sp.mean().item(), "sp_determined": sp[determined].mean().item(),
                  "sp_first": sp[~determined].mean().item()}
    else:
        a = c["actions"]
        report = {"action_r2": 1 - ((c["mean_action"] - a) ** 2).sum().item() / ((a - a.mean(0)) ** 2).sum().item()}
    mid = len(model.blocks) // 2
    report["probe_mid"] = float(probe_layers(model, data, probe_cfg, layers=[mid])[0])
    report["passed"] = all(report[k] >= v for k, v in GATES[model.env])
    return report


def require_gate(report: dict, stage: str, env: str | None = None) -> None:
    """Refuse to build on a base model whose residual stream does not know the task (env: read from the report
    when not given)."""
    env = env or ("ant" if "action_r2" in report else "grid")
    if not report["passed"]:
        measured = ", ".join(f"{k} {report[k]:.3f}" for k, _ in GATES[env])
        raise RuntimeError(f"{stage}: the base model fails the quality gate ({gate_text(env)}): {measured}. "
                           "Train it longer or pass force=True (--force) to run anyway.")


def save_model(model: BaseModel, path) -> None:
    torch.save({"cfg": dataclasses.asdict(model.cfg), "env": model.env, "state": model.state_dict()}, path)


def load_model(path, device=None) -> BaseModel:
    """A saved base model, rebuilt for its world (files from before the world was saved: read from the head)."""
    ckpt = torch.load(path, map_location=device or "cpu")
    env = ckpt.get("env", "ant" if ckpt["cfg"].get("head") == "gaussian" else "grid")
    model = build_model(ModelConfig(**ckpt["cfg"]), env)
    model.load_state_dict(ckpt["state"])
    return model.to(device or "cpu")


# ==================================================================================================
# 6. Supervised residual-stream controllers (Eq. 1, App. C.3) and rollouts in the environment
# ==================================================================================================
class SubgoalControllers(nn.Module):
    """One linear controller per subgoal at one layer: U_k = B_k A_k^T (rank R) or a full U_k.

    B (or U) starts at zero, so an untrained controller leaves the base model unchanged.
    """

    def __init__(self, n_subgoals: int, d_model: int, layer: int, rank: int = 16):
        super().__init__()
        self.layer, self.rank = layer, rank
        if rank > 0:
            self.A = nn.Parameter(torch.randn(n_subgoals, d_model, rank) / math.sqrt(d_model))
            self.B = nn.Parameter(torch.zeros(n_subgoals, d_model, rank))
        else:
            self.U = nn.Parameter(torch.zeros(n_subgoals, d_model, d_model))

    def forward(self, subgoal: torch.Tensor) -> Control:
        """The control that applies subgoal[b, t]'s controller at every step; subgoal (B, T) or (B,)."""
        k = subgoal.clamp(min=0)
        if self.rank > 0:
            return Control(self.layer, A=self.A, B=self.B, mix=F.one_hot(k, len(self.A)).to(self.A.dtype))
        return Control(self.layer, mix=F.one_hot(k, len(self.U)).to(self.U.dtype), bank=self.U)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_controllers(model: BaseModel, data: Episodes, layer: int, cfg: ControlConfig, seed: int = 0,
                      progress: bool = True, ctrl: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Fit one controller per subgoal at `layer` by action NLL on expert data, base model frozen.
    The true subgoal label of each step selects its controller (supervised, unlike the metacontroller).
    `ctrl` trains a given module instead of fresh SubgoalControllers at `layer` (which is then unused): any map from
    subgoals (B, T) to an edit that BaseModel.forward accepts."""
    device = next(model.parameters()).device
    freeze(model)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_subgoals = int(data.subgoal.max()) + 1
    if ctrl is None:
        ctrl = SubgoalControllers(n_subgoals, model.cfg.d_model, layer, cfg.rank).to(device)
    opt = torch.optim.AdamW(ctrl.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    by_length, history = np.argsort(data.lengths, kind="stable"), {"action_nll": []}
    for _ in tqdm(range(cfg.steps), desc=f"controllers@{layer}", disable=not progress, leave=False):
        batch = data.batch(length_bucketed_batch(by_length, cfg.batch_size, rng), device)
        loss = model.loss(batch, control=ctrl(batch["subgoal"]), obs_loss=False)["action_nll"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["action_nll"].append(loss.item())
    return ctrl, history


VECTOR_ENVS = {"grid": envs.GridPinpadVec, "ant": envs.AntPinpadVec}


@torch.no_grad()
def rollout(model: BaseModel, task, n: int, seed: int, control_fn=None, greedy: bool = False,
            record: bool = False, max_steps: int | None = None, drop_ended: bool = True) -> dict:
    """Run the (controlled) base model in n episodes of the real environment at once.

    control_fn(env) -> None, a Control over all n episodes, or a hook is asked before each step (it may read
    env.subgoal: that is how the supervised controllers are switched; the metacontroller will decide by itself).
    The world is the model's (model.env). Key/value caching (or the SSM's state) makes each step cost O(t) or
    O(1) instead of re-running the whole history. With record=True the observations (n, T+1, O), actions
    (n, T, ...), their log-probabilities under the acting model (n, T), agent cells (n, T+1), the ant's torso
    x, y (n, T+1, 2) and the layouts come back too. max_steps overrides the world's episode limit T (100 grid,
    500 ant). Steps after an episode's end (t >= length) are padding, which the environment ignores.

    Ended episodes leave the batch (drop_ended), since a batch otherwise runs as long as its longest episode
    (the model's own episodes on a long task are mostly short failures): the cache keeps the running ones
    (BaseModel.keep_episodes), a Control keeps their rows (Control.rows), and a hook with per-episode state
    is told which ones to keep (hook.keep_episodes(index), index into its current batch); a hook without that
    method keeps every episode to the end. Padding steps of dropped episodes act on zero logits, and nothing
    that draws random numbers sees fewer rows, so the episodes are the same either way (test), up to the float
    rounding of smaller matmuls, which the ant's physics can grow into different episodes.
    """
    model.eval()
    device = next(model.parameters()).device
    env = VECTOR_ENVS[model.env](n, task=task, **({} if max_steps is None else {"T": max_steps}))
    obs, _ = env.reset(seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    cache, reward = model.new_cache(), np.zeros(n)
    where = ("agent", "xy") if model.env == "ant" else ("agent",)     # the ant's position is continuous too
    trace = {"obs": [obs], "actions": [], "logp": [], **{k: [getattr(env, k).copy()] for k in where}}
    rows = np.arange(n)                                               # the episodes in the batch
    while not env.done.all():
        control = control_fn(env) if control_fn is not None else None
        hook = control is not None and not isinstance(control, Control)
        live = np.flatnonzero(~env.done)
        if (drop_ended and len(live) <= 0.75 * len(rows)                 # cut when a quarter has ended
                and (not hook or hasattr(control, "keep_episodes"))):
            keep = torch.as_tensor(np.searchsorted(rows, live), device=device)
            model.keep_episodes(cache, keep)
            if hook:
                control.keep_episodes(keep)
            rows = live
        index = torch.as_tensor(rows, device=device)
        part = model.step(torch.as_tensor(obs[rows], device=device), cache,
                          control.rows(index) if isinstance(control, Control) else control)["logits"]
        logits = part.new_zeros((n,) + part.shape[1:]).index_copy_(0, index, part)   # zeros for ended episodes
        a = model.action_head.mode(logits) if greedy else model.action_head.sample(logits, gen)
        obs, r, *_ = env.step(a.cpu().numpy())
        reward += r
        if record:
            trace["obs"].append(obs), trace["actions"].append(a.cpu().numpy())
            trace["logp"].append(model.action_head.log_prob(logits, a).cpu().numpy())
            for k in where:
                trace[k].append(getattr(env, k).copy())
    out = {"success": reward > 0, "length": env.t.copy(), "progress": env.progress.copy()}
    if record:
        out.update({k: np.stack(v, 1) for k, v in trace.items()},
                   colour_cells=env.colour_cells.copy(), wall_cells=env.wall_cells.copy())
    return out


def subgoal_control_fn(ctrl: SubgoalControllers):
    """Switch the supervised controllers by the environment's current subgoal (oracle switching)."""
    device = ctrl.A.device if ctrl.rank > 0 else ctrl.U.device
    return lambda env: ctrl(torch.as_tensor(np.maximum(env.subgoal, 0), device=device)).step_view()


def controller_sweep(model: BaseModel, data: Episodes, cfg: ControlConfig, seed: int = 0, layers=None,
                     progress: bool = True) -> dict:
    """Fig. 4: success on the post-training task with the right controller switched in at each
    subgoal, for controllers at each layer 1..L-1, and the uncontrolled base model's success."""
    task = envs.parse_task(cfg.task)
    layers = layers or cfg.layers or range(1, len(model.blocks))
    layers = [int(l) for l in layers]
    result = {"layers": layers, "success": [], "base_success": float(
        rollout(model, task, cfg.eval_episodes, seed + 1)["success"].mean())}
    for layer in layers:
        ctrl, _ = train_controllers(model, data, layer, cfg, seed, progress)
        result["success"].append(float(rollout(model, task, cfg.eval_episodes, seed + 1,
                                               subgoal_control_fn(ctrl))["success"].mean()))
    return result


# ==================================================================================================
# 7. The metacontroller: temporally-abstract actions without labels (Sec. 3, App. D.2, E.1)
# ==================================================================================================
def mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))


def logistic_noise(shape: tuple, device=None, dtype=None) -> torch.Tensor:
    """Samples of the standard logistic distribution, log u - log(1 - u) for u ~ U(0, 1)."""
    u = torch.rand(shape, device=device, dtype=dtype).clamp(1e-6, 1 - 1e-6)
    return u.log() - (-u).log1p()


def gumbel_sigmoid(logit: torch.Tensor, temperature: float = 1.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """A binary sample of sigmoid(logit) with a straight-through gradient: the forward value is 0 or 1, the
    backward pass is that of the relaxed sample sigmoid((logit + logistic noise) / temperature). `noise` (logit's
    shape) is drawn here unless given (drawn ahead for a whole sequence, which is faster)."""
    noise = logistic_noise(logit.shape, logit.device, logit.dtype) if noise is None else noise
    soft = torch.sigmoid((logit + noise) / temperature)
    return (soft > 0.5).float() + (soft - soft.detach())                # exactly 0 or 1 going forward


def hypernetwork(n_z: int, hidden: int, D: int, rank: int, zero_edit: bool = False) -> nn.Sequential:
    """f_hyp (Eq. 18): code -> the two rank-R factors of U (or a full U when rank is 0), read by hyper_control.

    The output layer starts with weights of std 0.05. That is not a small edit: |U e| / |e| is about 0.65 at
    rank 16 and 1.3 at full rank (D = 128, measured on the cpu base model). zero_edit starts from U = 0
    exactly instead: the B factor (or, at full rank, the whole output) starts at zero, as LoRA does."""
    hyper = mlp(n_z, hidden, 2 * D * rank if rank > 0 else D * D)
    nn.init.normal_(hyper[-1].weight, std=0.05), nn.init.zeros_(hyper[-1].bias)
    if zero_edit:
        with torch.no_grad():
            hyper[-1].weight[D * rank if rank > 0 else 0:] = 0            # B's half, or all of U
    return hyper


def hyper_control(hyper: nn.Module, z: torch.Tensor, layer: int, D: int, rank: int) -> Control:
    """A hypernetwork's output for codes z (..., n_z) read as a controller at `layer`. Its last layer is linear,
    W h + b in the hidden units h, so the output is a per-token mixture of J = len(h) + 1 shared tensors (the
    columns of W, and b mixed by 1): the two factors of a rank-R U = B A^T as banks (J, D, R), or, when rank is
    0, a full U as a bank (J - 1, D, D) plus b. Neither factor nor U is ever built per token."""
    last = hyper[-1]
    if rank > 0:                                                      # the output's bias is one more bank, mixed by 1
        A, B = torch.cat([last.weight, last.bias[:, None]], 1).T.reshape(-1, 2, D, rank).unbind(1)   # (J, D, R)
        return Control(layer, A=A, B=B, mix=F.pad(hyper[:-1](z), (0, 1), value=1.0))
    return Control(layer, mix=hyper[:-1](z), bank=last.weight.T.reshape(-1, D, D), bias=last.bias.view(D, D))


class Metacontroller(nn.Module):
    """A variational, recurrent hypernetwork that reads the residual stream e_1:T at layer l and writes
    one controller U_t per step, switching to a new latent code only when its gate beta_t says so.

        h_t        = GRU(e_t, h_t-1)                                     Eq. (12)  causal history
        s          = f_emb(e_1:T)                                        Eq. (13)  non-causal: both directions
        mu, Sigma  = f_enc(e_t, h_t-1, s);  z~_t ~ N(mu, Sigma)          Eq. (14-15)
        beta_t     = f_switch(e_t, h_t-1, z_t-1)  in [0, 1]              Eq. (16)  causal; beta_0 = 1
        z_t        = beta_t z~_t + (1 - beta_t) z_t-1                    Eq. (17)  beta = 1: new code
        U_t        = f_hyp(z_t)                                          Eq. (18)
    """

    def __init__(self, d_model: int, layer: int, cfg: MetaConfig):
        super().__init__()
        self.layer, self.cfg, self.D = layer, cfg, d_model
        self.history = nn.GRU(d_model, cfg.n_h, batch_first=True)
        self.embed_fwd = nn.GRU(d_model, cfg.n_s, batch_first=True)   # Eq. (13)'s two directions (initialised as
        self.embed_bwd = nn.GRU(d_model, cfg.n_s, batch_first=True)   # one bidirectional nn.GRU's would be)
        self.embed_out = nn.Linear(2 * cfg.n_s, cfg.n_s)
        self.encoder = mlp(d_model + cfg.n_h + cfg.n_s, cfg.enc_hidden, 2 * cfg.n_z)
        if cfg.logvar_init is not None:                               # e.g. -6: a precise posterior (std 0.05) at first
            nn.init.constant_(self.encoder[-1].bias[cfg.n_z:], cfg.logvar_init)
        self.switch = mlp(d_model + cfg.n_h + cfg.n_z, cfg.enc_hidden, 1)
        nn.init.constant_(self.switch[-1].bias, cfg.switch_bias)
        self.hyper = hypernetwork(cfg.n_z, cfg.hyp_hidden, d_model, cfg.rank, cfg.zero_init_edit)
        self.register_load_state_dict_pre_hook(self._split_embedding)

    @staticmethod
    def _split_embedding(module, state: dict, prefix: str, *_) -> None:
        """Reads weights saved when Eq. 13 ran one bidirectional nn.GRU `embed` (before 2026-12-06): its
        direction X and X_reverse are now embed_fwd.X and embed_bwd.X."""
        for key in [k for k in state if k.startswith(prefix + "embed.")]:
            name = key[len(prefix + "embed."):]
            new = f"embed_bwd.{name[:-len('_reverse')]}" if name.endswith("_reverse") else f"embed_fwd.{name}"
            state[prefix + new] = state.pop(key)

    def sequence_embedding(self, e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """s (B, T, n_s) from the whole valid part of each sequence, read in both directions (Eq. 13): the same
        s at every step from the two ends, or with cfg.per_step_embedding an s_t from both directions' states at
        t (the backward one has read steps t .. L-1, L the episode's length). The backward GRU reads each episode's
        valid steps reversed in place (padding stays after them), so both run over the padded batch at once: what
        a bidirectional GRU over packed sequences computes (a test checks they agree), its forward and backward
        1.6x faster on one CPU thread (lab notes, section 1)."""
        t, lengths = torch.arange(e.shape[1], device=e.device), lengths.to(e.device)[:, None]
        valid = t < lengths                                           # (B, T)
        flip = torch.where(valid, lengths - 1 - t, t)                 # reverses the valid steps, an involution
        forward, _ = self.embed_fwd(e)                                # at t: has read steps 0 .. t
        backward, _ = self.embed_bwd(e.gather(1, flip[..., None].expand_as(e)))   # at k: has read L-1-k .. L-1
        if self.cfg.per_step_embedding:
            states = torch.cat([forward, backward.gather(1, flip[..., None].expand_as(backward))], -1)
            return self.embed_out(torch.where(valid[..., None], states, 0.0))   # (B, T, n_s); padding: zeros in
        ends = flip[:, :1, None].expand(-1, 1, forward.shape[-1])      # flip[:, 0] = L - 1: both directions' ends
        s = self.embed_out(torch.cat([forward.gather(1, ends), backward.gather(1, ends)], -1))   # (B, 1, n_s)
        return s.expand(-1, e.shape[1], -1)

    def decode(self, z: torch.Tensor) -> Control:
        """Eq. (18): U = f_hyp(z), as a Control at this metacontroller's layer; z (..., n_z)."""
        return hyper_control(self.hyper, z, self.layer, self.D, self.cfg.rank)

    def sample_code(self, mu: torch.Tensor, logvar: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Eq. (15): z~ = mu + Sigma^1/2 eps by the reparameterisation trick, or the mean when not sampling."""
        return mu + (logvar / 2).exp() * torch.randn_like(mu) if sample else mu

    def rate(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Eq. (3)'s rate term per step and code dimension, (..., n_z): KL(N(mu, Sigma) || N(0, I))."""
        return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)

    def switch_logits(self, e: torch.Tensor, h_prev: torch.Tensor):
        """Eq. (16) before its sigmoid, over a sequence e, h_prev (B, T, ...): returns logit(t, z_t-1) (B, 1), the
        switching unit's logit from e_t, h_t-1 and z_t-1. Its first layer's e_t, h_t-1 part is computed for every
        step at once, since z_t-1 is only known inside forward's loop over time."""
        first, n_z, rest = self.switch[0], self.cfg.n_z, self.switch[1:]
        pre = F.linear(torch.cat([e, h_prev], -1), first.weight[:, :-n_z], first.bias).unbind(1)   # one grad copy
        w_z = first.weight[:, -n_z:].T                                # (n_z, hidden), sliced once, not per step
        return lambda t, z_prev: rest(torch.addmm(pre[t], z_prev, w_z))

    def read(self, e: torch.Tensor) -> torch.Tensor:
        """What the metacontroller reads of the residual stream: e itself, or with cfg.read_norm e normalised
        over its D features, as the base model's own blocks read it (the raw stream's per-feature std is about
        3.4 on the cpu base model, which saturates the GRUs' gates)."""
        return F.layer_norm(e, e.shape[-1:]) if self.cfg.read_norm else e

    def gate_step(self, state, e: torch.Tensor, obs: torch.Tensor, z_prev: torch.Tensor):
        """The causal gate alone, one step at a time, for internal RL: fire = H(beta_t - 0.5) from
        (e_t, h_t-1, z_t-1) for e (n, D); state is h_t-1 (None before the first step, which always fires)."""
        e = self.read(e)
        if state is None or self.cfg.force_switch:
            fire = torch.ones(len(e), dtype=torch.bool, device=e.device)
        else:
            logit = self.switch_logits(e[:, None], state[0][:, None])(0, z_prev)   # a sequence of one step
            fire = logit[:, 0] > 0                                    # beta > 0.5 <=> logit > 0
        _, state = self.history(e[:, None], state)
        return fire, state

    def forward(self, e: torch.Tensor, lengths: torch.Tensor, sample: bool = True) -> dict:
        """e (B, T, D) residual stream at layer l; returns z (B, T, n_z), beta (B, T), the switch probability
        sigmoid(logit) (B, T; beta itself unless gumbel_switch makes beta binary), mu, logvar and the per-step
        Control (which edits the raw stream e). sample=False makes it deterministic: z~ = mu, and a gumbel_switch
        is H(logit) even in training mode."""
        B, T, D = e.shape
        e = self.read(e)
        h, _ = self.history(e)                                        # h_1 .. h_T: (B, T, n_h)
        h_prev = F.pad(h, (0, 0, 1, 0))[:, :-1]                       # h_0 = 0 .. h_T-1
        s = self.sequence_embedding(e, lengths)
        mu, logvar = self.encoder(torch.cat([e, h_prev, s], -1)).chunk(2, -1)          # Eq. (14)
        z_tilde = self.sample_code(mu, logvar, sample)                                # Eq. (15)
        logit_at = self.switch_logits(e, h_prev)
        sample_switch = self.cfg.gumbel_switch and self.training and sample and not self.cfg.force_switch
        noise = logistic_noise((T - 1, B, 1), e.device, e.dtype) if sample_switch else None    # for t = 1 .. T-1
        z, zs, betas, probs = torch.zeros(B, self.cfg.n_z, device=e.device), [], [], []
        for t, z_tilde_t in enumerate(z_tilde.unbind(1)):             # unbind: one gradient copy, not T
            if self.cfg.force_switch or t == 0:                       # at t = 0 there is no code to keep
                beta = prob = torch.ones(B, 1, device=e.device)
            else:
                logit = logit_at(t, z)                                                    # Eq. (16)
                beta = prob = torch.sigmoid(logit)
                if sample_switch:
                    beta = gumbel_sigmoid(logit, self.cfg.switch_temperature, noise[t - 1])
                elif self.cfg.gumbel_switch:                          # binary in eval too: as internal RL's gate fires
                    beta = (logit > 0).to(logit.dtype)
            z = beta * z_tilde_t + (1 - beta) * z                     # Eq. (17)
            zs.append(z), betas.append(beta[:, 0]), probs.append(prob[:, 0])
        z = torch.stack(zs, 1)                                        # (B, T, n_z)
        return {"z": z, "beta": torch.stack(betas, 1), "switch_prob": torch.stack(probs, 1), "mu": mu,
                "logvar": logvar, "control": self.decode(z)}


class MetaControl:
    """Plugs a metacontroller into the base model's forward pass: at layer l it reads the residual stream
    e (B, T, D), runs the metacontroller on it and returns U_t e_t. Its outputs stay in `.out` for the loss."""

    def __init__(self, meta: Metacontroller, lengths: torch.Tensor, sample: bool = True):
        self.layer, self.meta, self.lengths, self.sample, self.out = meta.layer, meta, lengths, sample, None

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        self.out = self.meta(e, self.lengths, self.sample)
        return self.out["control"](e)


def meta_loss(model: BaseModel, meta: Metacontroller, batch: dict, alpha: float, sample: bool = True) -> dict:
    """Eq. (3): sum_t -ln p(a_t | o_1:t, z_1:t) + alpha KL(N(mu_t, Sigma_t) || N(0, I)), both averaged over
    the valid steps of the batch; the KL is not weighted by beta (cfg.kl_per_switch weights the penalty by beta,
    not Eq. 3; the returned "kl" is always the unweighted rate)."""
    m = batch["mask"].float()
    control = MetaControl(meta, batch["mask"].sum(1), sample)
    out = model.loss(batch, control, obs_loss=meta.cfg.co_train)
    kl = meta.rate(control.out["mu"], control.out["logvar"])          # (B, T, n_z)
    cost = kl * control.out["beta"][..., None] if meta.cfg.kl_per_switch else kl   # a code is paid for when taken
    kl, cost = ((x * m[..., None]).sum((0, 1)) / m.sum() for x in (kl, cost))      # (n_z,) means over valid steps
    penalty = cost.clamp(min=meta.cfg.free_bits).sum()                 # free bits: no pressure below the floor
    return {"loss": out["action_nll"] + model.cfg.obs_weight * out["obs_nll"] + alpha * penalty,
            "action_nll": out["action_nll"], "kl": kl.sum(), **control.out}


def kl_weight(step: int, cfg: MetaConfig) -> float:
    """alpha at a training step: 0 for the first cfg.kl_delay steps, then a linear ramp over cfg.kl_warmup
    steps up to cfg.alpha (both 0: the paper's constant alpha)."""
    step -= cfg.kl_delay
    if step < 0:
        return 0.0
    return cfg.alpha * min(1.0, step / cfg.kl_warmup) if cfg.kl_warmup else cfg.alpha


class StreamCache:
    """A frozen base model's residual stream before block `layer` on every step of `data`, computed once, behind
    the episodes' `batch` interface: its batches carry the stream (B, T, D) in place of the observations, so that
    BaseModel.loss runs only the blocks from `layer` on, with the whole model's result up to float rounding (a
    test checks it; on the cpu run's model, 40 training steps came out bit-identical). Worth it when training
    draws each episode several times: the cpu preset's metacontroller draws 1.28M episodes from 200k. It holds
    sum(lengths) x D floats (3.2 GB there) and goes stale if the base model changes, so it serves frozen models
    only."""

    def __init__(self, model: BaseModel, data, layer: int, batch_size: int = 256):
        self.data, self.layer, self.lengths = data, layer, data.lengths
        device = next(model.parameters()).device
        self.start = np.concatenate([[0], np.cumsum(data.lengths)])   # episode i's rows: start[i] .. start[i+1]-1
        self.flat = torch.zeros(int(self.start[-1]) + 1, model.cfg.d_model, device=device)   # last row: padding
        for idx in np.array_split(np.argsort(data.lengths, kind="stable"), max(1, len(data) // batch_size)):
            b = data.batch(idx, device)                               # its rows: idx sorted, as rows() takes them
            rows = torch.as_tensor(self.rows(np.sort(idx), b["mask"].shape[1]), device=device)
            self.flat[rows[b["mask"]]] = model.stream(b["obs"][:, :-1], layer)[b["mask"]]

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, idx: np.ndarray, T: int) -> np.ndarray:
        """(B, T) row of each step of episodes idx in `flat`; the zero padding row past an episode's end."""
        t = np.arange(T)
        return np.where(t < self.lengths[idx, None], self.start[idx, None] + t, len(self.flat) - 1)

    def batch(self, idx, device) -> dict:
        """data.batch's tensors for episodes idx, with the cached stream (B, T, D) and its layer instead of obs."""
        b = self.data.batch(idx, device, obs=False)
        rows = torch.as_tensor(self.rows(np.sort(np.asarray(idx)), b["mask"].shape[1]), device=self.flat.device)
        return {**b, "stream": self.flat[rows].to(device), "layer": self.layer}


def train_metacontroller(model: BaseModel, data: Episodes | StreamCache, cfg: MetaConfig, seed: int = 0,
                         progress: bool = True, meta: Metacontroller | None = None,
                         callback=None) -> tuple[Metacontroller, dict]:
    """Fit the metacontroller on expert data by Eq. (3). Only its parameters train, unless cfg.co_train,
    in which case the base model's train too (pass a freshly initialised model for App. C.4.2).
    `data` may be a StreamCache of this (frozen) model already: training draws from it whatever cfg.cache_stream
    says (which builds one when data is episodes).
    A given `meta` (one loaded from disk, or a variant built elsewhere) trains on instead of a fresh one: `cfg`
    sets the training (steps, batch, lr, alpha and its schedule), the given meta's own cfg its loss and gate (free
    bits, kl_per_switch, read_norm, a Gumbel or forced switch); both must agree on co_train.
    callback(steps_done, meta), if given, runs after every step (to evaluate along the way: it may switch meta
    to eval mode, and must switch it back)."""
    if (cfg.cache_stream or isinstance(data, StreamCache)) and cfg.co_train:
        raise ValueError("a StreamCache (or MetaConfig(cache_stream=True)) needs a frozen base model, but co_train "
                         "trains it")
    if meta is not None and meta.cfg.co_train != cfg.co_train:
        raise ValueError(f"the given metacontroller was built with co_train={meta.cfg.co_train}, which sets its loss's "
                         f"observation term, but cfg says co_train={cfg.co_train}")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if meta is None:
        meta = Metacontroller(model.cfg.d_model, len(model.blocks) // 2, cfg)
    meta = meta.to(device).train()
    if cfg.co_train:
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(meta.parameters()) + list(model.parameters())
    else:
        freeze(model)
        params = list(meta.parameters())
    if cfg.cache_stream and not isinstance(data, StreamCache):
        data = StreamCache(model, data, meta.layer)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    by_length = np.argsort(data.lengths, kind="stable")
    history = {k: [] for k in ("loss", "action_nll", "kl", "switch_rate")}
    t0, bar = time.time(), tqdm(range(cfg.steps), desc="metacontroller", disable=not progress, mininterval=2)
    for step in bar:
        batch = data.batch(length_bucketed_batch(by_length, cfg.batch_size, rng), device)
        if cfg.lr_decay_from is not None:
            for group in opt.param_groups:
                group["lr"] = cosine_decay(cfg.lr, step, cfg.lr_decay_from, cfg.steps - 1, 0.1)
        alpha = kl_weight(step, cfg)
        out = meta_loss(model, meta, batch, alpha)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        switch_rate = ((out["beta"] > 0.5) & batch["mask"]).sum() / batch["mask"].sum()
        for k, v in (("loss", out["loss"]), ("action_nll", out["action_nll"]), ("kl", out["kl"]),
                     ("switch_rate", switch_rate)):
            history[k].append(v.item())
        bar.set_postfix(nll=f"{history['action_nll'][-1]:.3f}", kl=f"{history['kl'][-1]:.2f}",
                        switches=f"{history['switch_rate'][-1]:.2f}")
        if callback is not None:
            callback(step + 1, meta)
        if cfg.time_budget_s is not None and time.time() - t0 > cfg.time_budget_s:
            break
    if cfg.co_train:
        freeze(model)
    return meta.eval(), history


def evaluation_batches(lengths: np.ndarray, batch_size: int = 256, max_steps: int = 25_600) -> list[np.ndarray]:
    """Consecutive episodes in batches of at most batch_size episodes and max_steps padded steps (B x T), for
    evaluation passes: a full-rank decoder's edit holds B x T x J x D floats per batch, 1.6 GB for the ant's 200
    held-out episodes at once. Grid batches (T <= 100) keep all batch_size episodes."""
    size = max(1, min(batch_size, max_steps // int(lengths.max())))
    return [np.arange(i, min(i + size, len(lengths))) for i in range(0, len(lengths), size)]


@torch.no_grad()
def meta_outputs(model: BaseModel, meta: Metacontroller, data: Episodes, batch_size: int = 256) -> dict:
    """beta, the switch probability, z (posterior means) and labels on every step of `data`, as padded numpy
    arrays (N, Tmax)."""
    device = next(model.parameters()).device
    T = int(data.lengths.max())
    keep = {"beta": [], "switch_prob": [], "z": [], "nll": [], "kl": []}
    for idx in evaluation_batches(data.lengths, batch_size):
        b = data.batch(idx, device)
        out = meta_loss(model, meta, b, meta.cfg.alpha, sample=False)
        pad = T - b["mask"].shape[1]
        for k in ("beta", "switch_prob"):
            keep[k].append(F.pad(out[k], (0, pad)).cpu().numpy())
        keep["z"].append(F.pad(out["z"], (0, 0, 0, pad)).cpu().numpy())
        steps = b["mask"].sum().item()                                # batch means are per valid step
        keep["nll"].append(out["action_nll"].item() * steps), keep["kl"].append(out["kl"].item() * steps)
    return {"beta": np.concatenate(keep["beta"]), "switch_prob": np.concatenate(keep["switch_prob"]),
            "z": np.concatenate(keep["z"]),
            "mask": np.arange(T) < data.lengths[:, None], "subgoal": data.subgoal[:, :T].astype(np.int64),
            "action_nll": sum(keep["nll"]) / data.lengths.sum(), "kl": sum(keep["kl"]) / data.lengths.sum()}


def true_boundaries(subgoal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, T) bool: steps t > 0 at which the expert starts a new subgoal (colour pair)."""
    b = np.zeros_like(mask)
    b[:, 1:] = (subgoal[:, 1:] != subgoal[:, :-1]) & mask[:, 1:]
    return b


def switch_alignment(beta: np.ndarray, subgoal: np.ndarray, mask: np.ndarray, tolerance: int = 1,
                     prob: np.ndarray | None = None) -> dict:
    """Do the switches (beta > 0.5) fall on the true subgoal boundaries?

    Precision, recall and F1 of switches at t > 0 against true boundaries, matched one-to-one within
    +-tolerance steps (as many pairs as possible: each switch, in time order, takes the earliest free boundary in
    its window, a maximum matching since the windows keep their order); switches per episode (t = 0 included)
    against subgoals per episode; and the fraction of switch probabilities at t > 0 that are quasi-binary (< 0.1
    or > 0.9; beta_0 = 1 always).
    The probability is beta itself unless `prob` is given (a binary switch's sigmoid(logit))."""
    switch, truth = (beta > 0.5) & mask, true_boundaries(subgoal, mask)
    pred = switch.copy()
    pred[:, 0] = False
    tp, free = 0, truth.copy()
    for i, t in zip(*np.nonzero(pred)):                               # one-to-one, in time order
        for dt in range(-tolerance, tolerance + 1):
            if 0 <= t + dt < free.shape[1] and free[i, t + dt]:
                free[i, t + dt], tp = False, tp + 1
                break
    precision, recall = tp / max(pred.sum(), 1), tp / max(truth.sum(), 1)
    b = (beta if prob is None else prob)[:, 1:][mask[:, 1:]]         # beta_0 = 1 by construction: not counted
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-9),
            "switches_per_episode": switch.sum(1).mean(), "subgoals_per_episode": (truth.sum(1) + 1).mean(),
            "quasi_binary": ((b < 0.1) | (b > 0.9)).mean()}


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Plain k-means (k-means++ start); returns the cluster of each row."""
    rng, x = np.random.default_rng(seed), x.astype(np.float64)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], 0)
        if d.sum() == 0:                                              # fewer distinct codes than k
            break
        centres.append(x[rng.choice(len(x), p=d / d.sum())])
    centres = np.stack(centres)
    for _ in range(iters):
        label = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([x[label == j].mean(0) if (label == j).any() else centres[j] for j in range(len(centres))])
    return label


def segments(outputs: dict) -> np.ndarray:
    """(K, 3) rows (episode, start, end): the switch-delimited segments of meta_outputs' episodes, each from a
    step where beta > 0.5 (or t = 0) up to, not including, the next one."""
    rows = []
    for i, (beta, m) in enumerate(zip(outputs["beta"], outputs["mask"])):
        T = int(m.sum())
        starts = [0] + [t for t in range(1, T) if beta[t] > 0.5] + [T]
        rows += [(i, a, b) for a, b in zip(starts[:-1], starts[1:])]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def segment_codes(outputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """The code z at the end of every switch-delimited segment and the true subgoal most pursued in it."""
    seg = segments(outputs)
    labels = [np.bincount(outputs["subgoal"][i, a:b], minlength=4).argmax() for i, a, b in seg]
    return outputs["z"][seg[:, 0], seg[:, 2] - 1], np.array(labels, dtype=np.int64)


def code_purity(outputs: dict, n_subgoals: int = 4, seed: int = 0) -> float:
    """Cluster the segments' codes into n_subgoals clusters; the fraction of segments whose true subgoal
    is their cluster's majority subgoal (1.0: every code names its subgoal)."""
    codes, labels = segment_codes(outputs)
    cluster = kmeans(codes, n_subgoals, seed)
    return sum(np.bincount(labels[cluster == j]).max() for j in np.unique(cluster)) / len(labels)


COLLAPSED_KL = 0.01   # nats per step; a code naming 1 of 4 subgoals 3 times in a 32-step episode costs >= 0.13


def switching_regime(stats: dict) -> str:
    """Name the regime a run ended in: the two failure modes (posterior collapse: the code carries almost
    nothing, KL below COLLAPSED_KL nats per step, whatever the gate does; always switching), one used code per
    episode (the paper's co-trained finding), switches that miss the subgoal boundaries (F1 below 0.2, less than
    switching at random times would score), or subgoal-aligned switching (F1 >= 0.9; partially in between).
    The rate is stats["kl"] (CompILE's: "kl_z"); without one, collapse is not tested."""
    rate = stats.get("kl", stats.get("kl_z"))
    if rate is not None and rate < COLLAPSED_KL:
        return "collapsed (the code carries nothing)"
    if stats["switches_per_episode"] < 1.5:
        return "one code per episode"
    if stats["switches_per_episode"] > 2 * stats["subgoals_per_episode"]:
        return "always switching"
    if stats["f1"] < 0.2:
        return "misaligned (switches away from the subgoal boundaries)"
    return "aligned" if stats["f1"] >= 0.9 else "partially aligned"


def evaluate_metacontroller(model: BaseModel, meta: Metacontroller, data: Episodes) -> dict:
    return metacontroller_stats(meta_outputs(model, meta, data))


def metacontroller_stats(out: dict) -> dict:
    """Switch alignment, code purity, NLL, KL and the regime's name from meta_outputs' arrays."""
    stats = switch_alignment(out["beta"], out["subgoal"], out["mask"], prob=out["switch_prob"])
    stats.update(code_purity=code_purity(out), action_nll=out["action_nll"], kl=out["kl"])
    stats["regime"] = switching_regime(stats)
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in stats.items()}


def code_injection(model: BaseModel, meta: Metacontroller, data: Episodes, n: int = 200, seed: int = 0) -> dict:
    """App. B.3.2: fix the code to one taken from a segment where the expert pursued subgoal g, and run the
    controlled model in the world on the task made of g alone ("2g-(2g+1)" in the grid, "g" for the ant): how
    often does it complete g? Against the uncontrolled model on the same layouts."""
    codes, labels = segment_codes(meta_outputs(model, meta, data))
    device = next(model.parameters()).device
    rng, result = np.random.default_rng(seed), {}
    for g in range(4):
        if not (labels == g).any():                                   # e.g. collapsed: no segment of g
            result[f"injected_{g}"] = result[f"uncontrolled_{g}"] = float("nan")
            continue
        pick = rng.choice(np.flatnonzero(labels == g), size=n)
        control = meta.decode(torch.as_tensor(codes[pick], device=device)).step_view()
        task = (2 * g, 2 * g + 1) if model.env == "grid" else (g,)    # one subgoal: a colour pair / a colour
        result[f"injected_{g}"] = float(rollout(model, task, n, seed + g, lambda env: control)["success"].mean())
        result[f"uncontrolled_{g}"] = float(rollout(model, task, n, seed + g)["success"].mean())
    result["injected"] = float(np.nanmean([result[f"injected_{g}"] for g in range(4)]))
    result["uncontrolled"] = float(np.nanmean([result[f"uncontrolled_{g}"] for g in range(4)]))
    return result


def save_meta(meta, path) -> None:
    """Save a Metacontroller or a CompILE model with what it takes to rebuild it."""
    torch.save({"kind": type(meta).__name__, "cfg": dataclasses.asdict(meta.cfg), "d_model": meta.D,
                "layer": meta.layer, "obs_dim": getattr(meta, "obs_dim", None), "state": meta.state_dict()}, path)


def load_meta(path, device=None):
    ckpt = torch.load(path, map_location=device or "cpu")
    if ckpt.get("kind") == "CompILE":
        meta = CompILE(ckpt["obs_dim"], ckpt["d_model"], ckpt["layer"], CompILEConfig(**ckpt["cfg"]))
    else:
        meta = Metacontroller(ckpt["d_model"], ckpt["layer"], MetaConfig(**ckpt["cfg"]))
    meta.load_state_dict(ckpt["state"])
    return meta.to(device or "cpu").eval()


def rate_distortion(base: BaseModel, model_cfg: ModelConfig, train: Episodes, test: Episodes, meta_cfg: MetaConfig,
                    sweep: SweepConfig, progress: bool = True, points_file=None, first_seed: int = 0) -> list[dict]:
    """Fig. 7: for each alpha and seed (first_seed, first_seed + 1, ...), train a metacontroller on the frozen
    base model and one jointly with a fresh base model (co-trained); record distortion (action NLL), rate
    (KL), switch alignment and the point's wall time. With `points_file`, every finished point is saved there
    at once and skipped when the sweep starts again, so an interrupted sweep resumes."""
    device = next(base.parameters()).device
    seeds = range(first_seed, first_seed + sweep.seeds)
    points = [(co, a, s) for co in (False, True) for a in sweep.alphas for s in seeds]
    key = lambda row: (row["base"] == "co-trained", row["alpha"], row["seed"])
    saved = _json_load(points_file) if points_file is not None and Path(points_file).exists() else []
    rows = [r for r in saved if key(r) in points]                     # points of another sweep are dropped
    done = {key(r) for r in rows}
    for co_train, alpha, seed in tqdm(points, desc="rate-distortion", disable=not progress):
        if (co_train, alpha, seed) in done:
            continue
        name = "co-trained" if co_train else "frozen"
        t0, cfg = time.time(), dataclasses.replace(meta_cfg, alpha=alpha, co_train=co_train,
                                                   cache_stream=meta_cfg.cache_stream and not co_train,
                                                   steps=sweep.co_train_steps if co_train else sweep.steps)
        torch.manual_seed(seed)
        model = build_model(model_cfg, base.env).to(device) if co_train else base
        meta, _ = train_metacontroller(model, train, cfg, seed, progress=False)
        rows.append({"base": name, "alpha": alpha, "seed": seed, **evaluate_metacontroller(model, meta, test),
                     "seconds": round(time.time() - t0, 1)})
        if points_file is not None:
            _json_save(rows, points_file)
    return sorted(rows, key=lambda row: points.index(key(row)))      # resumed or not, rows in sweep order


# ==================================================================================================
# 8. Internal RL: reinforcement learning in the metacontroller's latent space (Sec. 4, Algorithm 1)
# ==================================================================================================
class CompILE(nn.Module):
    """Baseline 4: CompILE (Kipf et al. 2019) in place of the metacontroller (App. C.4.3).

    It reads the raw observations, cuts each episode into at most M segments with Gumbel-softmax boundaries
    under a Poisson prior on segment lengths, infers one Gaussian code per segment from the observations
    inside it, and decodes each code into a controller of the frozen base model at layer l with the same
    kind of hypernetwork as the metacontroller: the edit at step t is sum_i m_i(t) U_i e_t, where m_i marks
    the steps of segment i.

    Boundaries follow a discrete hazard model read causally from o_1:t: segment i, begun at s, ends at t > s
    with probability sigmoid(l_t) prod_{s<u<t} (1 - sigmoid(l_u)) (the rest of the mass: it runs to the end).
    In internal RL the gate fires where sigmoid(l_t) > 0.5, the analogue of H(beta_t - 0.5). CompILE's own
    boundary distribution is a softmax over the whole sequence, which no causal policy could use.
    """

    def __init__(self, obs_dim: int, d_model: int, layer: int, cfg: CompILEConfig):
        super().__init__()
        self.obs_dim, self.D, self.layer, self.cfg = obs_dim, d_model, layer, cfg
        self.embed = mlp(obs_dim, cfg.hidden, cfg.hidden)
        self.boundary_rnn = nn.GRU(cfg.hidden, cfg.hidden, batch_first=True)
        self.boundary = nn.Linear(cfg.hidden, 1)
        self.encoder = mlp(cfg.hidden, cfg.hidden, 2 * cfg.n_z)
        self.hyper = hypernetwork(cfg.n_z, cfg.hyp_hidden, d_model, cfg.rank)

    def decode(self, z: torch.Tensor) -> Control:
        return hyper_control(self.hyper, z, self.layer, self.D, self.cfg.rank)

    def gate_step(self, state, e: torch.Tensor, obs: torch.Tensor, z_prev: torch.Tensor):
        """Internal RL's gate: the first step fires, later ones where the boundary hazard exceeds 0.5."""
        out, new_state = self.boundary_rnn(self.embed(obs)[:, None], state)
        if state is None:
            return torch.ones(len(obs), dtype=torch.bool, device=obs.device), new_state
        return self.boundary(out[:, 0])[:, 0] > 0, new_state

    def forward(self, obs: torch.Tensor, lengths: torch.Tensor, sample: bool = True) -> dict:
        """obs (B, T, O) -> segment masks (B, M, T), codes z (B, M, n_z) and the two KL terms per episode.
        sample=False takes the most likely boundaries and the codes' means (for evaluation)."""
        B, T, _ = obs.shape
        cfg, t = self.cfg, torch.arange(T, device=obs.device)
        x = self.embed(obs)
        hazard = self.boundary(self.boundary_rnn(x)[0])[..., 0]          # (B, T) logits, causal
        valid = t < lengths[:, None]
        start = torch.zeros(B, dtype=torch.long, device=obs.device)      # s_i, the step segment i begins
        begun = torch.ones(B, T, device=obs.device)                     # segment i has begun by step t
        masks, kl_b = [], torch.zeros(B, device=obs.device)
        for i in range(cfg.segments):
            if i == cfg.segments - 1:                                   # the last segment runs to the end
                b = F.one_hot(torch.full_like(start, T), T + 1).float()
            else:
                log_q, log_p = segment_end_distributions(hazard, start, valid, cfg.length_mean)
                q = log_q.exp()
                kl_b = kl_b + torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(1)
                b = F.gumbel_softmax(log_q, tau=cfg.temperature, hard=True) if sample else \
                    F.one_hot(log_q.argmax(1), T + 1).float()
            ended = b[:, :T].cumsum(1)                                  # 1 from segment i's end on
            masks.append(begun * (1 - ended) * valid)
            begun, start = ended, b.argmax(1)
        masks = torch.stack(masks, 1)                                   # (B, M, T)
        pooled = torch.einsum("bmt,btd->bmd", masks, x) / masks.sum(-1, keepdim=True).clamp(min=1)
        mu, logvar = self.encoder(pooled).chunk(2, -1)                  # a code sees only its own segment
        z = mu + (logvar / 2).exp() * torch.randn_like(mu) if sample else mu
        used = (masks.sum(-1) > 0).float()                              # (B, M): empty segments cost nothing
        kl_z = (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1) * used).sum(1)
        return {"z": z, "masks": masks, "hazard": hazard, "kl_z": kl_z, "kl_b": kl_b}


def segment_end_distributions(hazard: torch.Tensor, start: torch.Tensor, valid: torch.Tensor, length_mean: float):
    """Where does a segment begun at step `start` end? Over the slots t = 0..T-1 (a new segment begins at t)
    and slot T (it runs to the episode's end), for hazard logits (B, T), start (B,), valid (B, T):
      log q: the posterior, q(t) = sigmoid(l_t) prod_{start<u<t} (1 - sigmoid(l_u)) for start < t < length;
      log p: the prior, a Poisson(length_mean) over the length t - start >= 1, its tail on slot T.
    Both sum to 1 over the slots; slots at or before `start` and past the episode get probability 0."""
    t = torch.arange(hazard.shape[1], device=hazard.device)
    live = (t > start[:, None]) & valid
    go = F.logsigmoid(-hazard) * live
    log_q = (F.logsigmoid(hazard) + go.cumsum(1) - go).masked_fill(~live, -math.inf)
    log_q = torch.cat([log_q, go.sum(1, keepdim=True)], 1)
    k = (t - start[:, None]).clamp(min=1).float()
    log_p = k * math.log(length_mean) - length_mean - torch.lgamma(k + 1) - math.log1p(-math.exp(-length_mean))
    log_p = log_p.masked_fill(~live, -math.inf)
    tail = (1 - log_p.exp().sum(1, keepdim=True)).clamp(min=1e-8).log()
    return log_q, torch.cat([log_p, tail], 1)


class SegmentControl:
    """The CompILE edit: sum_i m_i(t) U_i e_t, one low-rank (or full) controller per segment, weighted by
    the (straight-through) segment masks."""

    def __init__(self, control: Control, masks: torch.Tensor):
        self.layer, self.control, self.masks = control.layer, control, masks   # control: (B, M, 1, ...)

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        return (self.masks[..., None] * self.control(e[:, None])).sum(1)      # (B, M, T, D) -> (B, T, D)


def compile_loss(model: BaseModel, cpl: CompILE, batch: dict, sample: bool = True) -> dict:
    """CompILE's ELBO with the base model as decoder: action NLL under the segment-wise control, plus
    alpha_z KL of the codes and alpha_b KL of the boundaries (both per valid step of the batch)."""
    m = batch["mask"].float()
    out = cpl(batch["obs"][:, :-1], batch["mask"].sum(1), sample)
    control = SegmentControl(cpl.decode(out["z"][:, :, None]), out["masks"])
    nll = model.loss(batch, control, obs_loss=False)["action_nll"]
    kl_z, kl_b = out["kl_z"].sum() / m.sum(), out["kl_b"].sum() / m.sum()
    return {**out, "loss": nll + cpl.cfg.alpha_z * kl_z + cpl.cfg.alpha_b * kl_b, "action_nll": nll,
            "kl_z": kl_z, "kl_b": kl_b}                                 # batch means replace the per-episode KLs


def train_compile(model: BaseModel, data: Episodes, cfg: CompILEConfig, seed: int = 0,
                  progress: bool = True) -> tuple[CompILE, dict]:
    """Fit CompILE on expert data with the base model frozen (its parameters never train)."""
    device = next(model.parameters()).device
    freeze(model)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cpl = CompILE(model.obs_dim, model.cfg.d_model, len(model.blocks) // 2, cfg).to(device)
    opt = torch.optim.AdamW(cpl.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    by_length = np.argsort(data.lengths, kind="stable")
    history = {k: [] for k in ("loss", "action_nll", "kl_z", "kl_b")}
    for _ in tqdm(range(cfg.steps), desc="CompILE", disable=not progress, mininterval=2):
        out = compile_loss(model, cpl, data.batch(length_bucketed_batch(by_length, cfg.batch_size, rng), device))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(cpl.parameters(), 1.0)
        opt.step()
        for k in history:
            history[k].append(out[k].item())
    return cpl.eval(), history


@torch.no_grad()
def evaluate_compile(model: BaseModel, cpl: CompILE, data: Episodes, batch_size: int = 256) -> dict:
    """Held-out action NLL and KLs, and how CompILE's causal boundaries (hazard > 0.5, the gate internal
    RL uses) line up with the true subgoal boundaries, scored like the metacontroller's switches."""
    device, T = next(model.parameters()).device, int(data.lengths.max())
    betas, sums = [], {"action_nll": 0.0, "kl_z": 0.0, "kl_b": 0.0}
    for idx in evaluation_batches(data.lengths, batch_size):
        b = data.batch(idx, device)
        out = compile_loss(model, cpl, b, sample=False)
        for k in sums:
            sums[k] += out[k].item() * b["mask"].sum().item()
        beta = torch.sigmoid(out["hazard"])
        beta[:, 0] = 1                                                  # the first step always takes a code
        betas.append(F.pad(beta, (0, T - beta.shape[1])).cpu().numpy())
    mask = np.arange(T) < data.lengths[:, None]
    stats = switch_alignment(np.concatenate(betas), data.subgoal[:, :T].astype(np.int64), mask)
    stats.update({k: v / data.lengths.sum() for k, v in sums.items()})
    stats["regime"] = switching_regime(stats)
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in stats.items()}


class CodePolicy(nn.Module):
    """The causal policy pi(z_t | e_1:t) of internal RL: one recurrent layer over the residual stream at
    layer l and a diagonal Gaussian over the n_z-dim code. The mean head starts at zero and the std at
    one, so the untrained policy samples codes from the metacontroller's prior N(0, I)."""

    def __init__(self, d_model: int, n_z: int, hidden: int):
        super().__init__()
        self.rnn = nn.GRU(d_model, hidden, batch_first=True)
        self.mean = nn.Linear(hidden, n_z)
        self.log_std = nn.Parameter(torch.zeros(n_z))
        nn.init.zeros_(self.mean.weight), nn.init.zeros_(self.mean.bias)

    def forward(self, e: torch.Tensor, state=None):
        """e (B, T, D) -> (mean (B, T, n_z), new recurrent state)."""
        x, state = self.rnn(e, state)
        return self.mean(x), state

    def log_prob(self, mean: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log N(z; mean, diag(std^2)) summed over the code dims."""
        std = self.log_std.exp()
        return (-0.5 * ((z - mean) / std) ** 2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class InternalAgent:
    """Algorithm 1, written as the residual-stream hook of the controlled base model.

    The internal environment's state is the residual stream e_t at layer l, the switching unit's history
    h_t-1 and previous code z_t-1, and the key/value caches of the base model's lower and upper blocks
    (kept by `rollout`). At each step the frozen switching unit decides, from (e_t, h_t-1, z_t-1), whether
    the binarised gate H(beta_t - 0.5) fires; only then the policy samples a new code z_t ~ pi(. | e_1:t)
    (the abstract action); otherwise z_t = z_t-1. The frozen decoder turns z_t into U_t, and the base model
    acts with e_t + U_t e_t. Everything the PPO update needs is recorded: e_t, the firing mask, the codes
    and their log-probabilities at acting time.
    """

    def __init__(self, meta, policy: CodePolicy, n: int, generator: torch.Generator):
        self.layer, self.meta, self.policy, self.gen = meta.layer, meta, policy, generator
        device = next(policy.parameters()).device
        self.gate_state, self.state, self.obs = None, None, None      # switching unit's and policy's states
        self.n, self.rows = n, torch.arange(n, device=device)          # the episodes still in the batch
        self.z = torch.zeros(n, meta.cfg.n_z, device=device)
        self.trace = {"e": [], "fire": [], "z": [], "logp": []}

    def at(self, env) -> "InternalAgent":
        """rollout's control_fn: note the current observation (a gate that reads raw inputs, like CompILE's,
        needs it) and return the hook."""
        self.obs = torch.as_tensor(env.observation, device=self.z.device)
        return self

    def keep_episodes(self, keep: torch.Tensor) -> None:
        """rollout drops ended episodes: keep the per-episode states of `keep` (indices into the batch)."""
        self.rows, self.z = self.rows[keep], self.z[keep]
        self.gate_state, self.state = (None if s is None else s[:, keep] for s in (self.gate_state, self.state))

    @torch.no_grad()
    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        """e (rows, 1, D) -> U_t e_t (rows, 1, D), for the episodes still in the batch."""
        fire, self.gate_state = self.meta.gate_step(self.gate_state, e[:, 0], self.obs[self.rows], self.z)
        mean, self.state = self.policy(e, self.state)
        mean = mean[:, 0]
        noise = torch.randn((self.n,) + mean.shape[1:], generator=self.gen, device=e.device)[self.rows]
        self.z = torch.where(fire[:, None], mean + self.policy.log_std.exp() * noise, self.z)
        for k, v in (("e", e[:, 0]), ("fire", fire), ("z", self.z), ("logp", self.policy.log_prob(mean, self.z))):
            self.trace[k].append(v.new_zeros((self.n,) + v.shape[1:]).index_copy_(0, self.rows, v))
        return self.meta.decode(self.z[:, None])(e)

    def record(self) -> dict:
        """Every step of every episode (n, T, ...); zeros (fire False) after an episode left the batch."""
        return {k: torch.stack(v, 1) for k, v in self.trace.items()}


class InternalRL:
    """The learner of internal RL: a CodePolicy acting through a frozen metacontroller's switching unit
    and decoder on a frozen base model. `act` runs a batch of episodes; `log_prob` replays the policy
    over the stored residual streams (no base-model forward needed) for the PPO update."""

    def __init__(self, model: BaseModel, meta: Metacontroller, hidden: int):
        self.model, self.meta = freeze(model), freeze(meta)
        device = next(model.parameters()).device
        self.policy = CodePolicy(model.cfg.d_model, meta.cfg.n_z, hidden).to(device)

    def parameters(self):
        return self.policy.parameters()

    def act(self, task, n: int, seed: int) -> dict:
        device = next(self.policy.parameters()).device
        agent = InternalAgent(self.meta, self.policy, n, torch.Generator(device=device).manual_seed(seed + 10**9))
        out = rollout(self.model, task, n, seed, agent.at)              # the actions draw from their own stream
        rec = agent.record()
        length = torch.as_tensor(out["length"], device=device)
        valid = torch.arange(rec["fire"].shape[1], device=device) < length[:, None]
        return {"success": out["success"], "progress": out["progress"], "e": rec["e"], "z": rec["z"],
                "old_logp": rec["logp"], "mask": rec["fire"] & valid,
                "decisions": (rec["fire"] & valid).sum(1).float().mean().item()}

    def log_prob(self, batch: dict) -> torch.Tensor:
        mean, _ = self.policy(batch["e"])
        return self.policy.log_prob(mean, batch["z"])                     # (n, T)


class RawActionRL:
    """Baseline 1: the same RL on the base model's own action distribution (every parameter trains)."""

    def __init__(self, model: BaseModel):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(True)

    def parameters(self):
        return self.model.parameters()

    def act(self, task, n: int, seed: int) -> dict:
        out = rollout(self.model, task, n, seed, record=True)
        device = next(self.model.parameters()).device
        T = out["actions"].shape[1]
        return {"success": out["success"], "progress": out["progress"],
                "obs": torch.as_tensor(out["obs"][:, :T], device=device),
                "actions": torch.as_tensor(out["actions"], device=device),
                "old_logp": torch.as_tensor(out["logp"], device=device),
                "mask": torch.arange(T, device=device) < torch.as_tensor(out["length"], device=device)[:, None],
                "decisions": float(out["length"].mean())}

    def log_prob(self, batch: dict) -> torch.Tensor:
        return self.model.action_head.log_prob(self.model(batch["obs"])["logits"], batch["actions"])


def ppo_update(learner, opt, batch: dict, cfg: RLConfig) -> None:
    """PPO-clip without a critic (App. C.5): advantage = (R - mean R) / (std R + 1e-3) over the batch's
    episodes, shared by every decision of an episode; no entropy bonus. The surrogate is averaged over all
    decisions of the batch (an episode with more decisions weighs more). A batch where every episode got
    the same return carries no signal and is skipped."""
    R = torch.as_tensor(batch["success"], dtype=torch.float32, device=batch["old_logp"].device)
    if len(R) < 2:
        raise ValueError("PPO needs at least 2 episodes per batch: the advantage is normalised by their spread")
    if R.std() == 0:
        return
    adv = ((R - R.mean()) / (R.std() + 1e-3))[:, None]
    m = batch["mask"].float()
    for _ in range(cfg.epochs):
        log_ratio = torch.where(batch["mask"], learner.log_prob(batch) - batch["old_logp"], 0.0)   # no inf * 0
        ratio = log_ratio.exp()
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
        loss = -(surrogate * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(learner.parameters()), 1.0)
        opt.step()


def train_rl(learner, task, cfg: RLConfig, lr: float, seed: int = 0, progress: bool = True, desc: str = "RL") -> dict:
    """On-policy RL from the sparse reward: batches of episodes, one PPO update per batch. Returns the
    success rate of every batch against the number of episodes run so far, and how far its episodes got
    (mean colours completed), which shows learning before the first success does."""
    if cfg.batch_episodes < 2:
        raise ValueError(f"RLConfig.batch_episodes={cfg.batch_episodes}: PPO here needs at least 2 episodes per "
                         "batch, as the advantage is normalised by their spread of returns")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(learner.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    history = {"episodes": [], "success": [], "progress": [], "decisions": []}
    n_batches = max(1, cfg.episodes // cfg.batch_episodes)
    for i in tqdm(range(n_batches), desc=desc, disable=not progress, leave=False):
        batch = learner.act(task, cfg.batch_episodes, seed * 10**7 + i * cfg.batch_episodes)
        history["episodes"].append((i + 1) * cfg.batch_episodes)
        history["success"].append(float(batch["success"].mean()))
        history["progress"].append(float(batch["progress"].mean()))
        history["decisions"].append(batch["decisions"])
        ppo_update(learner, opt, batch, cfg)
    return history


def success_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% by default); meaningful at zero successes too."""
    p, d = successes / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def rl_experiment(learners: dict, task, cfg: RLConfig, progress: bool = True, first_seed: int = 0) -> dict:
    """Fig. 8: every method with the same RL. For each, an lr scan on seed first_seed, then the next
    cfg.seeds - 1 seeds at the lr whose last quarter of batches had the highest success. learners maps a
    method's name to a function that builds a fresh learner (it is called after the seed is set)."""
    out, seeds = {}, range(first_seed, first_seed + cfg.seeds)
    for name, make in learners.items():
        def run_one(lr, seed):
            torch.manual_seed(seed)
            learner = make()
            return learner, train_rl(learner, task, cfg, lr, seed, progress, desc=f"{name} lr={lr:g} seed={seed}")
        scan = {lr: run_one(lr, seeds[0]) for lr in cfg.lrs}
        tail = lambda h: float(np.mean(h["success"][-max(1, len(h["success"]) // 4):]))
        best = max(cfg.lrs, key=lambda lr: tail(scan[lr][1]))
        runs = [scan[best][1]] + [run_one(best, seed)[1] for seed in seeds[1:]]
        out[name] = {"lr": best, "scan": {str(lr): tail(h) for lr, (_, h) in scan.items()}, "runs": runs,
                     "final_success": float(np.median([tail(h) for h in runs])), "learner": scan[best][0]}
    return out


def rl_summary(rl: dict) -> dict:
    """Flat named numbers of the internal-RL stage for results.json: per method its lr, final success
    (median over seeds of the mean success over the last quarter of batches), the successful episodes of
    all its runs together (0: RL never had a signal, and its lr was picked by a tie), and the episodes each
    seed needed to reach a batch success >= 0.9 (median; None when a seed never did). With the expert's success
    on the task (the ant), each final success divided by it too (Fig. 8b's normalisation)."""
    flat = {}
    for name, r in rl.items():
        if name not in RL_LABELS:                                     # "base", "expert_success"
            continue
        reached = [next((e for e, s in zip(h["episodes"], h["success"]) if s >= 0.9), None) for h in r["runs"]]
        solved = sum(round(s * h["episodes"][0]) for h in r["runs"] for s in h["success"])   # episodes[0]: batch
        flat.update({f"rl_{name}_lr": r["lr"], f"rl_{name}_final_success": r["final_success"],
                     f"rl_{name}_successes": int(solved), f"rl_{name}_episodes": r["runs"][0]["episodes"][-1],
                     f"rl_{name}_episodes_to_0.9": None if None in reached else float(np.median(reached))})
        if "expert_success" in rl:
            flat[f"rl_{name}_normalised_success"] = r["final_success"] / max(rl["expert_success"], 1e-9)
    k, n = rl["base"]["successes"], rl["base"]["episodes"]
    flat.update({"base_post_task_successes": k, "base_post_task_episodes": n,
                 "base_post_task_ci95_low": rl["base"]["interval"][0],
                 "base_post_task_ci95_high": rl["base"]["interval"][1]})
    if "expert_success" in rl:
        flat["expert_post_task_success"] = rl["expert_success"]
    return flat


# ==================================================================================================
# 9. Experiment runner: `python etarl.py`
# ==================================================================================================
BASELINE_STAGES = {   # RL baselines with a model of their own: results.json prefix, the Run stage that trains it
    "co_trained": ("cotrained", "co_trained"), "forced_switch": ("forced", "meta_forced"),
    "compile": ("compile", "compile_model"),
}


class Run:
    """One run folder and its stages, in pipeline order. Each stage makes its artefact once, saves it,
    and reloads it after that, so an interrupted run resumes and the notebook can show each stage.
    The same stages serve both worlds: Run("cpu", env="ant") uses PRESETS["ant-cpu"] and runs/ant-cpu-s0/.

        run = Run("cpu", seed=0)            # runs/grid-cpu-s0/
        train, test = run.data()            # train.npz, eval.npz
        model, history = run.base_model()   # base.pt, pretrain_history.json
        run.gate(), run.probes(), run.controllers()
        run.results()                       # results.json, report.md, figures
    """

    def __init__(self, preset: str = "cpu", seed: int = 0, out: str | None = None, device=None,
                 progress: bool = True, env: str = "grid", bf16: bool = False):
        self.preset, self.seed, self.progress, self.env = preset, seed, progress, env
        self.cfg = get_preset(preset, env)
        if bf16:                                                      # pretraining in mixed precision (deviation 23)
            self.cfg = dataclasses.replace(self.cfg, pretrain=dataclasses.replace(self.cfg.pretrain, bf16=True))
        self.meta_eq3 = self.cfg.meta_eq3 or self.cfg.meta             # the sweep's and two baselines' metacontroller
        if self.cfg.data.env != env:
            raise ValueError(f"preset {preset!r} is for the {self.cfg.data.env} world, not {env!r}")
        self.device = torch.device(device) if device else default_device()
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")                # TF32 matmuls (the README's GPU timings use them)
        self.dir = Path(out or f"runs/{env}-{preset}-s{seed}{'-bf16' if bf16 else ''}")
        self.dir.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        saved = self.dir / "config.json"
        differ = _config_differences(_json_load(saved), config) if saved.exists() else []
        if differ:
            raise ValueError(f"{self.dir} holds a run made with another configuration ({'; '.join(differ[:3])}"
                             f"{'; ...' if len(differ) > 3 else ''}); choose another --out folder or delete that one")
        _json_save(config, saved)
        self._memo = {}

    def _stage(self, name: str, file: str, make, save, load):
        """Load `file` if it exists; otherwise make it, save it and record the stage's wall time."""
        if name not in self._memo:
            path = self.dir / file
            if not path.exists():
                t0 = time.time()
                tmp = path.with_name(f"{path.stem}.partial{path.suffix}")   # a killed run leaves no half file
                save(make(), tmp)
                os.replace(tmp, path)
                _json_save({**self.times(), name: round(time.time() - t0, 1)}, self.dir / "times.json")
            self._memo[name] = load(path)
        return self._memo[name]

    def _module_stage(self, name: str, file: str, record: str, make):
        """A stage whose artefacts are a metacontroller or CompILE model (`file`) and a JSON record;
        make() returns both."""
        def save(made, path):
            _json_save(made[1], self.dir / record)
            save_meta(made[0], path)
        return self._stage(name, file, make, save, lambda p: load_meta(p, self.device)), _json_load(self.dir / record)

    def data(self) -> tuple[Episodes, Episodes]:
        """Expert episodes: training set and a disjoint held-out set (seed ranges never overlap). The held-out
        set is noise-free; so is the grid's training set by default (eps = 0), while the ant's training
        torques carry Gaussian noise for diversity (cfg.data.noise)."""
        c, s = self.cfg.data, self.seed * 10**7
        return (self._episodes("data_train", "train.npz", c.n_train, s, noisy=True),
                self._episodes("data_eval", "eval.npz", c.n_eval, s + 5 * 10**6))

    def _episodes(self, name: str, file: str, n: int, seed: int, noisy: bool = False):
        """A stage of n expert episodes of this run's world from seeds seed.., noise-free unless `noisy` (then
        with the grid's eps or the ant's torque noise)."""
        c = self.cfg.data
        if self.env == "ant":
            workers = min(8, os.cpu_count() or 1)                     # the episodes do not depend on it
            make = lambda: generate_ant_episodes(n, seed, noise=c.noise if noisy else 0.0, progress=self.progress,
                                                 workers=workers)
        else:
            make = lambda: generate_episodes(n, seed, eps=c.eps if noisy else 0.0)
        kind = AntEpisodes if self.env == "ant" else Episodes
        return self._stage(name, file, make, kind.save, kind.load)

    def meta_data(self):
        """What the supervised controllers and the metacontrollers train on: noise-free expert episodes (the
        paper uses the expert's mean actions): cfg.data.n_meta episodes of their own from a disjoint seed
        range (the ant), or else the training set, which must then be noise-free (the grid's default eps = 0)."""
        d = self.cfg.data
        if d.n_meta:
            return self._episodes("data_meta", "noise_free.npz", d.n_meta, self.seed * 10**7 + 7 * 10**6)
        if (d.eps if self.env == "grid" else d.noise) > 0:           # what _episodes makes noisy in each world
            raise ValueError(f"DataConfig(eps={d.eps}, noise={d.noise}, n_meta=0): the controllers and "
                             "metacontrollers train on noise-free episodes (App. C.3), and this training set is "
                             "noisy; set n_meta > 0 to give them a noise-free set of their own")
        return self.data()[0]

    def base_model(self) -> tuple[BaseModel, dict]:
        """The pretrained base model and its training history (with the gate measured along the way)."""
        def make():
            train, test = self.data()
            torch.manual_seed(self.seed)
            model = build_model(self.cfg.model, self.env).to(self.device)
            history = pretrain(model, train, test, self.cfg.pretrain, self.seed, self.cfg.probe, self.progress)
            return model, history

        def save(made, path):
            _json_save(made[1], self.dir / "pretrain_history.json")
            save_model(made[0], path)

        model = self._stage("pretrain", "base.pt", make, save, lambda p: load_model(p, device=self.device))
        return model, _json_load(self.dir / "pretrain_history.json")

    def gate(self) -> dict:
        gate = self._stage("gate", "gate.json", lambda: quality_gate(self.base_model()[0], self.data()[1],
                                                                       self.cfg.probe), _json_save, _json_load)
        return gate

    def probes(self) -> list:
        """Probe accuracy of the current subgoal after each layer 0..L (Fig. 3)."""
        return self._stage("probes", "probes.json",
                           lambda: probe_layers(self.base_model()[0], self.data()[1], self.cfg.probe).tolist(),
                           _json_save, _json_load)

    def controllers(self) -> dict:
        """Supervised controllers at each layer on the post-training task (Fig. 4)."""
        return self._stage("controllers", "controllers.json",
                           lambda: controller_sweep(freeze(self.base_model()[0]), self.meta_data(), self.cfg.control,
                                                    self.seed, progress=self.progress),
                           _json_save, _json_load)

    def metacontroller(self, force: bool = False) -> tuple[Metacontroller, dict]:
        """The metacontroller on the frozen base model (Sec. 3); refuses a base model that fails the gate."""
        def make():
            if not force:
                require_gate(self.gate(), "metacontroller", self.env)
            return train_metacontroller(freeze(self.base_model()[0]), self.frozen_meta_data(), self.cfg.meta, self.seed,
                                        self.progress)
        return self._module_stage("metacontroller", "meta.pt", "meta_history.json", make)

    def frozen_meta_data(self) -> Episodes | AntEpisodes | StreamCache:
        """What the metacontrollers on the frozen base model train on: meta_data, or with MetaConfig.cache_stream
        its StreamCache at L/2, built when first asked for and kept until the forced-switch baseline has trained
        (one build per pipeline run for both), so that their steps skip the blocks below L/2."""
        if not self.cfg.meta.cache_stream:
            return self.meta_data()
        if "stream_cache" not in self._memo:
            model = freeze(self.base_model()[0])
            self._memo["stream_cache"] = StreamCache(model, self.meta_data(), len(model.blocks) // 2)
        return self._memo["stream_cache"]

    def meta_eval(self, force: bool = False) -> dict:
        """Switch alignment, code purity and code injection of the frozen-base metacontroller."""
        def make():
            model, meta = self.base_model()[0], self.metacontroller(force)[0]
            test = self.data()[1]
            injection = code_injection(model, meta, test, self.cfg.meta.injection_episodes, self.seed)
            return {**evaluate_metacontroller(model, meta, test), **{f"injection_{k}": v for k, v in injection.items()}}
        return self._stage("meta_eval", "meta_eval.json", make, _json_save, _json_load)

    def co_trained(self) -> tuple[BaseModel, Metacontroller, dict]:
        """The same metacontroller trained jointly with a fresh base model (App. C.4.2): the base model,
        the metacontroller, and their evaluation (like meta_eval's, without code injection)."""
        def make():
            torch.manual_seed(self.seed)
            model = build_model(self.cfg.model, self.env).to(self.device)
            cfg = dataclasses.replace(self.meta_eq3, co_train=True, cache_stream=False,
                                      steps=self.cfg.sweep.co_train_steps)
            meta, history = train_metacontroller(model, self.meta_data(), cfg, self.seed, self.progress)
            return model, meta, {**evaluate_metacontroller(model, meta, self.data()[1]), "history": history}

        def save(made, path):
            save_model(made[0], self.dir / "co_base.pt")
            _json_save(made[2], self.dir / "co_trained.json")
            save_meta(made[1], path)

        meta = self._stage("co_trained", "co_meta.pt", make, save, lambda p: load_meta(p, self.device))
        model = load_model(self.dir / "co_base.pt", device=self.device)
        return model, meta, _json_load(self.dir / "co_trained.json")

    def meta_forced(self) -> tuple[Metacontroller, dict]:
        """Baseline 2's metacontroller: beta forced to 1 at every step (no temporal abstraction, App. C.4.1)."""
        def make():
            cfg = dataclasses.replace(self.meta_eq3, force_switch=True)
            meta, history = train_metacontroller(freeze(self.base_model()[0]), self.frozen_meta_data(), cfg, self.seed,
                                                 self.progress)
            self._memo.pop("stream_cache", None)                      # its last user: free the memory (3.2 GB, cpu)
            return meta, {**evaluate_metacontroller(self.base_model()[0], meta, self.data()[1]), "history": history}
        return self._module_stage("meta_forced", "meta_forced.pt", "meta_forced.json", make)

    def compile_model(self) -> tuple[CompILE, dict]:
        """Baseline 4's CompILE model on the frozen base model, and its evaluation."""
        def make():
            model = freeze(self.base_model()[0])
            cpl, history = train_compile(model, self.meta_data(), self.cfg.compile, self.seed, self.progress)
            return cpl, {**evaluate_compile(model, cpl, self.data()[1]), "history": history}
        return self._module_stage("compile", "compile.pt", "compile.json", make)

    def internal_rl(self, force: bool = False) -> dict:
        """Fig. 8: internal RL and the baselines on the post-training task, and the pretrained model's own
        success there (a Wilson interval over many sampled episodes)."""
        def make():
            unknown = set(self.cfg.rl.methods) - set(RL_LABELS)
            if unknown or "internal" not in self.cfg.rl.methods:
                raise ValueError(f"RLConfig.methods must include 'internal' and name only {sorted(RL_LABELS)}; "
                                 f"got {self.cfg.rl.methods}")
            if not force:
                require_gate(self.gate(), "internal RL", self.env)
            base, rl = self.base_model()[0], self.cfg.rl
            learners = {"internal": lambda: InternalRL(base, meta, rl.hidden),       # each built only if asked for
                        "raw_action": lambda: RawActionRL(base),
                        "forced_switch": lambda: InternalRL(base, self.meta_forced()[0], rl.hidden),
                        "co_trained": lambda: InternalRL(*self.co_trained()[:2], rl.hidden),
                        "compile": lambda: InternalRL(base, self.compile_model()[0], rl.hidden)}
            meta = self.metacontroller(force)[0]
            for name in [m for m in rl.methods if m in BASELINE_STAGES]:   # train the baselines' models first
                getattr(self, BASELINE_STAGES[name][1])()
            task = envs.parse_task(rl.task)
            result = rl_experiment({k: learners[k] for k in rl.methods}, task, rl, self.progress,
                                   first_seed=self.seed * rl.seeds)            # --seed N: seeds of their own
            chunks = [min(2_000, rl.base_episodes - i) for i in range(0, rl.base_episodes, 2_000)]
            k = sum(int(rollout(base, task, n, 10**8 + 2_000 * i)["success"].sum()) for i, n in enumerate(chunks))
            result["base"] = {"successes": k, "episodes": rl.base_episodes,
                              "interval": success_interval(k, rl.base_episodes)}
            if rl.expert_episodes:                                    # Fig. 8b (the ant) divides by this
                expert = envs.ant_expert_success if self.env == "ant" else envs.grid_expert_success
                result["expert_success"] = expert(task, rl.expert_episodes, seed=10**8)
            return result

        def save(result, path):
            torch.save(result["internal"]["learner"].policy.state_dict(), self.dir / "rl_policy.pt")
            _json_save({k: {kk: vv for kk, vv in v.items() if kk != "learner"} if isinstance(v, dict) else v
                        for k, v in result.items()}, path)
        return self._stage("internal_rl", "internal_rl.json", make, save, _json_load)

    def rl_learner(self, force: bool = False) -> InternalRL:
        """The internal-RL learner of the lr scan's seed at its best lr, reloaded from rl_policy.pt."""
        self.internal_rl(force)
        learner = InternalRL(self.base_model()[0], self.metacontroller(force)[0], self.cfg.rl.hidden)
        learner.policy.load_state_dict(torch.load(self.dir / "rl_policy.pt", map_location=self.device))
        return learner

    def rate_distortion(self, force: bool = False) -> list[dict]:
        """Fig. 7's sweep (long: run it on purpose with --sweep, ideally on a GPU)."""
        def make():
            if not force:
                require_gate(self.gate(), "rate-distortion sweep", self.env)
            return rate_distortion(freeze(self.base_model()[0]), self.cfg.model, self.meta_data(), self.data()[1],
                                   self.meta_eq3, self.cfg.sweep, self.progress,
                                   points_file=self.dir / "rate_distortion_points.json",
                                   first_seed=self.seed * self.cfg.sweep.seeds)
        return self._stage("rate_distortion", "rate_distortion.json", make, _json_save, _json_load)

    def times(self) -> dict:
        """Wall time (s) of each stage this run folder computed."""
        path = self.dir / "times.json"
        return _json_load(path) if path.exists() else {}

    def results(self, force: bool = False, sweep: bool = False) -> dict:
        """Every stage, then results.json (flat named values, listed in the README), the figures and report.md.
        The metacontroller stages run only on a base model that passes the gate (or with force); the sweep only
        when asked (or when its artefact already exists)."""
        self.data(), self.meta_data()                                 # stage by stage, so each time is its own
        history, gate, probes, ctrl = self.base_model()[1], self.gate(), self.probes(), self.controllers()
        measured = "  ".join(f"{k}={v:.3f}" for k, v in gate.items() if k != "passed")
        print(f"quality gate ({gate_text(self.env)}): {'PASSED' if gate['passed'] else 'FAILED'}  {measured}")
        L, cfg = self.cfg.model.n_layers, self.cfg
        mid = ctrl["layers"].index(L // 2) if L // 2 in ctrl["layers"] else None
        results = {
            "env": self.env, "preset": self.preset, "seed": self.seed, "device": str(self.device),
            "pretrain_steps": len(history["step"]),
            "pretrain_episodes_seen": len(history["step"]) * cfg.pretrain.batch_size,
            "final_action_nll": float(np.mean(history["action_nll"][-50:])),
            **{f"gate_{k}": v for k, v in gate.items()},
            **{f"probe_layer{l}": a for l, a in enumerate(probes)},
            "base_success_post_task": ctrl["base_success"],
            **{f"controller_success_layer{l}": s for l, s in zip(ctrl["layers"], ctrl["success"])},
            "controller_success_mid": None if mid is None else ctrl["success"][mid],
        }
        meta = rd = None
        if gate["passed"] or force:
            meta = self.metacontroller(force)[0]
            results.update({f"meta_{k}": v for k, v in self.meta_eval(force).items()})
            for method, (prefix, stage) in BASELINE_STAGES.items():
                if method in cfg.rl.methods:                          # a stage returns its evaluation last
                    results.update({f"{prefix}_{k}": v for k, v in getattr(self, stage)()[-1].items()
                                    if k != "history"})
            rl = self.internal_rl(force)
            results.update(rl_summary(rl))
        else:
            print("metacontroller stages skipped: the base model fails the quality gate (use --force to run anyway)")
        if sweep or (self.dir / "rate_distortion.json").exists():
            rd = self.rate_distortion(force)
        results.update({f"time_{k}_s": v for k, v in self.times().items()})
        _json_save(results, self.dir / "results.json")
        plot_base_model(self.dir, history, probes, ctrl, self.env)
        if meta is not None:
            _save_figure(plot_switching(self.base_model()[0], meta, self.data()[1]), self.dir / "switching.png")
        if rd is not None:
            _save_figure(plot_rate_distortion(rd), self.dir / "rate_distortion.png")
        if meta is not None:
            _save_figure(plot_internal_rl(rl), self.dir / "internal_rl.png")
            _save_figure(plot_abstract_actions(self.rl_learner(force), envs.parse_task(cfg.rl.task), self.seed,
                                               n=min(64, cfg.rl.batch_episodes)), self.dir / "abstract_actions.png")
        write_report(self.dir, results)
        return results


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'section.field: <saved> in the folder, <current> now' for each field where a run folder's saved config (a
    JSON dict) differs from the current one. A field the saved config lacks (added to the code since) counts as
    its current value: a new field whose default keeps the old behaviour does not invalidate an existing folder."""
    out = []
    for k, v in current.items():
        old = saved.get(k, v)
        if isinstance(v, dict) and isinstance(old, dict):
            out += _config_differences(old, v, f"{prefix}{k}.")
        elif old != v:
            out.append(f"{prefix}{k}: {old!r} in the folder, {v!r} now")
    return out


def _json_save(obj, path):
    """Write through a temporary file and rename it, so that a reader (another process using the same run
    folder, or a resumed run after an interruption) never sees a half-written file."""
    text, tmp = json.dumps(obj, indent=1), Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_load(path):
    return json.loads(Path(path).read_text())


def plot_base_model(run: Path, history: dict, probes: list, sweep: dict, env: str = "grid") -> None:
    """pretrain.png (the training curve and the quality gate against time) and probes_controllers.png (Figs. 3-4)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    k = min(50, len(history["action_nll"]))                           # running mean over k steps
    smooth = np.convolve(history["action_nll"], np.ones(k) / k, "valid")
    ax[0].plot(np.arange(k - 1, len(history["action_nll"])), smooth)
    ax[0].set(xlabel="step", ylabel="action NLL", title="Pretraining (Eq. 5)",
              yscale="log" if min(history["action_nll"]) > 0 else "linear")   # a Gaussian's NLL goes negative
    mins = np.array(history["eval_time"]) / 60
    labels = {"sp_determined": "shortest-path mass, determined steps", "action_r2": "action R^2 (expert torques)",
              "probe_mid": "subgoal probe at L/2"}
    for i, (key, threshold) in enumerate(GATES[env]):
        ax[1].plot(mins, history.get(key, [np.nan] * len(mins)), "os"[i] + "-", c=f"C{i}", label=labels[key])
        ax[1].axhline(threshold, ls=":", c=f"C{i}")
    ax[1].axhline(0.25, ls="--", c="grey")
    ax[1].set(xlabel="training time (min)", ylim=(0, 1), title="Quality gate")
    ax[1].legend(fontsize=8)
    fig.tight_layout(), fig.savefig(run / "pretrain.png", dpi=100), plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(range(len(probes)), probes, "o-"), ax[0].set_xticks(range(len(probes)))
    ax[0].axhline(0.25, ls="--", c="grey", label="chance")
    ax[0].set(xlabel="layer (0 = embedding)", ylabel="probe accuracy", ylim=(0, 1),
              title="Linear probe of the current subgoal (Fig. 3)")
    ax[0].legend()
    ax[1].bar([str(l) for l in sweep["layers"]], sweep["success"])
    ax[1].axhline(sweep["base_success"], ls="--", c="grey", label="no control")
    ax[1].set(xlabel="controlled layer", ylabel="success on post-training task", ylim=(0, 1),
              title="Supervised controllers (Fig. 4)")
    ax[1].legend()
    fig.tight_layout(), fig.savefig(run / "probes_controllers.png", dpi=100), plt.close(fig)


def _save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_switching(model: BaseModel, meta: Metacontroller, data: Episodes, n: int = 6):
    """Fig. A3: beta over held-out episodes, with the true subgoal boundaries marked."""
    import matplotlib.pyplot as plt

    out = meta_outputs(model, meta, data.subset(slice(0, n)))
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.1 * n), sharex=True)
    for ax, beta, m, g in zip(axes, out["beta"], out["mask"], out["subgoal"]):
        T = int(m.sum())
        ax.plot(beta[:T], "k.-", lw=1)
        for t in np.flatnonzero(true_boundaries(g[None], m[None])[0]):
            ax.axvline(t, c="C3", ls="--", lw=1)
        ax.set(ylim=(-0.05, 1.05), yticks=[0, 1])
    axes[0].set_title("switching gate beta_t (black) and true subgoal boundaries (red)")
    axes[-1].set_xlabel("time step")
    fig.tight_layout()
    return fig


def plot_rate_distortion(rows: list):
    """Fig. 7: rate (KL) against distortion (action NLL) over the alpha sweep, frozen versus co-trained."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for base, marker in (("frozen", "o"), ("co-trained", "s")):
        pts = [r for r in rows if r["base"] == base]
        sc = ax.scatter([r["action_nll"] for r in pts], [r["kl"] for r in pts], c=[r["f1"] for r in pts],
                        marker=marker, vmin=0, vmax=1, cmap="viridis", label=base, edgecolors="k")
    fig.colorbar(sc, label="switch F1")
    ax.set_yscale("symlog", linthresh=1e-3)                           # collapsed runs sit near 0, others at tens
    ax.set(xlabel="distortion: action NLL per step", ylabel="rate: KL per step (nats)",
           title="Rate-distortion (Fig. 7)")
    ax.legend()
    fig.tight_layout()
    return fig


RL_LABELS = {"internal": "internal RL", "raw_action": "raw-action RL", "forced_switch": "forced switching",
             "co_trained": "co-trained metacontroller", "compile": "CompILE"}


def plot_internal_rl(rl: dict):
    """Fig. 8 / A5: success on the post-training task against episodes, median and 25-75% band over seeds,
    on a linear and a log scale; the dashed line is the upper end of the pretrained model's 95% interval.
    Where the expert's own success was measured (the ant), every curve is divided by it (Fig. 8b)."""
    import matplotlib.pyplot as plt

    scale = 1 / max(rl["expert_success"], 1e-9) if "expert_success" in rl else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (name, label) in enumerate(RL_LABELS.items()):
        if name not in rl:
            continue
        x = np.array(rl[name]["runs"][0]["episodes"])
        y = np.array([h["success"] for h in rl[name]["runs"]]) * scale
        lo, med, hi = np.percentile(y, [25, 50, 75], axis=0)
        for ax in axes:
            ax.plot(x, med, c=f"C{i}", label=f"{label} (lr {rl[name]['lr']:g})")
            ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.25)
    for ax in axes:
        ax.axhline(rl["base"]["interval"][1] * scale, c="grey", ls="--", lw=1, label="pretrained model (95% upper)")
        ax.set(xlabel="episodes", ylabel="success rate" if scale == 1 else
               f"success / expert's ({rl['expert_success']:.2f})")
    top = max(1.0, scale)                                               # normalised: the policy may beat the expert
    axes[0].set(ylim=(-0.02, top + 0.02), title="Internal RL on the post-training task (Fig. 8)")
    axes[1].set_yscale("symlog", linthresh=1e-3)                        # linear below 1e-3, so 0 is drawn
    axes[1].set(ylim=(0, top + 0.05), title="log scale (Fig. A5)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_abstract_actions(learner: InternalRL, task, seed: int = 0, n: int = 64):
    """The abstract actions the internal-RL policy takes: the path of one episode (a solved one if any of n
    is) drawn on the start frame, each segment between two firings of the switch in its own colour."""
    import matplotlib.pyplot as plt

    device = next(learner.policy.parameters()).device
    agent = InternalAgent(learner.meta, learner.policy, n, torch.Generator(device=device).manual_seed(seed + 10**9))
    out = rollout(learner.model, task, n, seed, agent.at, record=True)
    i = int(np.argmax(out["progress"] + 100 * out["success"]))           # solved, else the furthest
    T, fire = int(out["length"][i]), agent.record()["fire"][i].cpu().numpy()
    ant = learner.model.env == "ant"
    G, cell = (4, 100) if ant else (7, 40)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(envs.render_grid(out["agent"][i, 0], out["colour_cells"][i], out["wall_cells"][i], G, cell))
    if ant:                                                               # the torso's path, in cell units
        x, y = out["xy"][i, :T + 1].T
        cols, rows = x / envs.ANT_CELL + G / 2, G / 2 - y / envs.ANT_CELL
        jitter = np.zeros((T + 1, 2))
    else:                                                                 # cell centres
        rows, cols = np.divmod(out["agent"][i, :T + 1], G)
        rows, cols = rows + 0.5, cols + 0.5
        jitter = np.random.default_rng(0).uniform(-4, 4, (T + 1, 2))      # overlapping moves stay visible
    seg = np.cumsum(fire[:T]) - 1
    for t in range(T):
        ax.plot(cols[t:t + 2] * cell + jitter[t:t + 2, 0], rows[t:t + 2] * cell + jitter[t:t + 2, 1],
                c=f"C{seg[t] % 10}", lw=2.5)
        if fire[t]:
            ax.text(cols[t] * cell, rows[t] * cell, str(seg[t] + 1), fontsize=11, weight="bold",
                    ha="center", va="center", color="white", bbox=dict(boxstyle="circle", fc=f"C{seg[t] % 10}"))
    ax.set_title(f"{'solved' if out['success'][i] else 'unsolved'} episode: progress {out['progress'][i]}/{len(task)}, "
                 f"{int(fire[:T].sum())} abstract actions", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def write_report(run: Path, results: dict) -> None:
    lines = [f"# ETARL run: {run.name}", "", "| quantity | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in sorted(run.glob("*.png"))] + [""]
    (run / "report.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="grid", help=f"world: {' or '.join(WORLDS)}")
    p.add_argument("--preset", default="cpu", help="tiny, cpu or paper (with --env ant: the ant's versions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default runs/<env>-<preset>-s<seed>)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="run the metacontroller even if the base model fails the gate")
    p.add_argument("--sweep", action="store_true", help="also run the rate-distortion sweep of Fig. 7 (long)")
    p.add_argument("--bf16", action="store_true", help="pretrain in bfloat16 mixed precision (default folder "
                   "runs/<env>-<preset>-s<seed>-bf16)")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")                                             # figures go to files, no display needed
    try:
        get_preset(args.preset, args.env)
    except ValueError as err:
        p.error(str(err))
    try:
        run = Run(args.preset, args.seed, args.out, args.device, env=args.env, bf16=args.bf16)
    except ValueError as err:                                         # a run folder made with another configuration
        p.error(str(err))
    results = run.results(args.force, args.sweep)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
