"""The run configuration: one typed schema, defaults in one place.

Flower hands every app a flat ``run_config`` dict (``[tool.flwr.app.config]`` in
pyproject.toml plus ``--run-config`` overrides) whose keys look like
``reward.learning-rate``. :func:`RunConfig.from_flower` turns it into the nested,
typed dataclasses below and refuses unknown keys and wrong types, naming the key.
``tests/test_config.py`` checks that pyproject.toml lists exactly these defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A run-config key is unknown, has the wrong type, or an invalid value."""


NODE_MODEL_KEYS = ("device", "dtype")
"""Node-config keys a SuperNode may set for itself (``--node-config "device='cuda:1'"``)."""


@dataclass(frozen=True)
class ModelConfig:
    """The shared base model and the LoRA adapters put on it."""

    base: str = "builtin:english"
    """A local directory or hub id for ``from_pretrained``. ``builtin:english`` is a small
    Llama pretrained on this machine, once, on WordNet's English (:mod:`common.english_base`;
    every machine of a federation must hold the same copy: ``fedrlhf base``);
    ``builtin:tiny`` a randomly initialised one with a byte-level tokenizer (tests)."""
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: str = "auto"
    """Comma-separated module names, ``all-linear``, or ``auto``: PEFT's default for the
    architecture (the query and value projections: ``q_proj,v_proj`` in Llama, Qwen2 and
    Gemma, ``c_attn`` in GPT-2). Fewer adapter parameters mean less DP noise in total,
    and fewer bytes on the wire."""
    reward_pooling: str = "mean"
    """How the reward head reads the sequence: ``mean`` of the final hidden states
    over all tokens, or the ``last`` token's (as Hugging Face's classifiers do)."""
    max_length: int = 96
    """Prompt + response tokens; longer texts are truncated from the left of the
    prompt so the response is always scored whole."""
    device: str = "auto"
    """Where the frozen base runs: ``auto`` (CUDA if present, else MPS, else CPU),
    ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. A SuperNode's node config key ``device``
    overrides it for that node, so partners on GPUs and on CPUs share one federation."""
    dtype: str = "auto"
    """The frozen base's precision: ``auto`` (bfloat16 on a GPU that has it, float16 on
    one that does not, float32 on CPU and MPS), ``float32``, ``bfloat16`` or ``float16``.
    Adapters, heads, per-sample gradients, clipping, noise and the wire stay float32.
    Node config key ``dtype`` overrides it for that node."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% more time).
    Without DP only: Opacus's per-sample gradient hooks do not survive the recomputation."""
    attn_implementation: str = "default"
    """Passed to ``from_pretrained`` (``eager``, ``sdpa``, ``flash_attention_2``);
    ``default`` lets Transformers choose."""
    trust_remote_code: bool = False
    """Let ``from_pretrained`` run code shipped with the checkpoint. Off: a partner
    should read such code before it runs on the machine that holds its data."""


@dataclass(frozen=True)
class RewardConfig:
    """Reward-model rounds: Bradley-Terry on local comparisons."""

    rounds: int = 12
    local_epochs: float = 2.0
    """Expected passes over the local training comparisons per round; with Poisson
    sampling the number of steps is ``round(local_epochs / sample_rate)``."""
    batch_size: int = 256
    """Expected number of comparisons per step (Poisson sampling draws around it)."""
    optimizer: str = "sgd"
    """``sgd`` (with momentum) or ``adam``. Under DP noise, Adam's per-coordinate
    scaling turns noise-dominated coordinates into steps of full learning-rate size;
    SGD keeps noise steps small, and does much better at the same epsilon."""
    learning_rate: float = 0.5
    momentum: float = 0.9
    heldout_fraction: float = 0.1
    """Share of local comparisons (chosen by content hash, so stable across runs) kept
    out of training for federated evaluation."""


@dataclass(frozen=True)
class PolicyConfig:
    """Policy rounds after the reward rounds: KL-constrained PPO, or DPO.

    Every PPO detail is a named setting here (see :mod:`client.ppo_training`).
    """

    rounds: int = 10
    """Policy rounds (0: the run ends after the reward model)."""
    objective: str = "ppo"
    """``ppo`` against the federation's reward model (its advantage estimator is
    ``advantage``), or ``dpo`` on the local comparisons (no reward model needed, reward
    rounds may be 0). The default, PPO with RLOO advantages, bought the most true
    utility per nat of KL of the four methods in the default simulation under DP
    (README, "Policy rounds"; ``fedrlhf simulate --compare-objectives``)."""
    lora_rank: int = 4
    lora_targets: str = "all-linear"
    """The policy adapter's modules. LoRA on the attention projections alone barely
    moves a small model's outputs; the MLPs carry most of what a policy changes."""
    freeze_lora_a: bool = False
    """Train the policy adapter's B matrices only, A staying at its seeded start
    (FFA-LoRA, Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated
    Learning"): A gets no gradient while B = 0, so DP-SGD would give it noise alone;
    with A fixed, the federated mean of the B updates is exactly the mean of the
    clients' weight deltas."""
    iterations: int = 2
    """PPO iterations per round (rollouts, then updates), or DPO steps per round."""
    batch_size: int = 64
    """Expected prompts per PPO iteration (comparisons per DPO step); Poisson-sampled
    under DP, so one prompt's rollout (one comparison) is one privacy unit. Under DP,
    few large batches beat many small ones: the noise on a mean gradient falls with
    the batch faster than the noise multiplier a higher sampling rate needs grows."""
    measure_prompts: int = 256
    """Expected prompts (a Poisson sample) on which each client measures a policy's KL and
    score for the server, per release. The noise on a noised mean falls with the
    prompts measured; their privacy cost is amplified by the sampling rate."""
    optimizer: str = "sgd"
    """``sgd`` (with momentum) or ``adam``; the client's optimizer, fresh each round.
    Under DP noise Adam's per-coordinate scaling turns noise-only coordinates into
    full-size steps (a random walk away from the reference); SGD keeps them small."""
    learning_rate: float = 0.2
    momentum: float = 0.9
    ppo_epochs: int = 4
    max_grad_norm: float = 0.2
    """Per-unit clipping norm C of the policy phase's DP-SGD (one prompt's responses or
    one comparison). RLOO's per-prompt gradients at the reference have norms of about
    0.2-0.9 (10th-90th percentile) in the simulation: clipped at 0.2 nearly all are
    normalized, and the clipped mean keeps 0.16 C of signal against 0.08 C at C = 1, so
    the same noise multiplier buys 1.9 times the signal-to-noise (a smaller C needs a
    larger learning rate; ``benchmarks/policy_gradient_snr.py``). For DPO use about 4 (``--compare-objectives`` does): DPO's
    per-comparison gradients at beta 1.5 have norms of about 3-5 on the simulation's
    base, and clipping all of them to 1 bought less true utility per nat of KL."""
    minibatches: int = 1
    """Minibatches per epoch. Under DP keep 1: each minibatch step pays the full noise
    on a smaller batch."""
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    kl_estimator: str = "k3"
    """Per-token KL(policy || reference) in the reward: ``k1`` or ``k3``."""
    kl_control: str = "adaptive"
    """``adaptive`` (Ziegler et al.: beta steers the KL to kl-target) or ``fixed``."""
    beta: float = 0.1
    """PPO's initial (or fixed) KL coefficient (DPO starts from ``dpo_beta``)."""
    kl_target: float = 0.5
    """Target KL to the reference, in nats per response (summed over its tokens)."""
    kl_horizon: float = 10000.0
    """Samples (PPO rollouts, DPO comparisons) over which the adaptive controller
    closes the KL error. A round trains on about clients x iterations x batch-size of
    them; the controller moves beta by at most 20% x samples / horizon per round."""
    kl_bound: float = 0.75
    """Trust region: a round whose aggregated KL would pass this is scaled back or rejected.
    In the simulation, under DP, true utility stops rising past about 0.2 nats and
    falls past about a nat, while the reward model's score keeps climbing."""
    trust_region: str = "scale"
    """Past the bound: ``scale`` the step back to it, ``reject`` the round, or ``shrink``
    (take the step, then pull the policy towards the reference until it is back at the
    bound; see :func:`server.kl_controller.trust_region`)."""
    trust_region_kl: str = "aggregate"
    """Whose KL the trust region reads: ``aggregate``, the aggregated candidate policy's,
    measured by the clients on their prompts in one more masked exchange per round (a
    statistics release, charged); or ``local``, the mean over clients of their own
    updated policies' KL (no extra exchange, but local steps overshoot the aggregate's
    KL several times over: their DP noise and non-IID drift average out)."""
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    value_coef: float = 0.02
    """Weight of the value loss. Under DP the per-rollout gradient is clipped as a
    whole; the value head's gradient is large and would take most of the clip norm."""
    target_approx_kl: float = 0.1
    """Without DP, stop a PPO iteration's epochs once the approximate KL to the
    rollout policy passes this (off under DP: it would read private data)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response cut off at max-new-tokens."""
    whiten_advantages: bool = True
    """Whiten GAE's advantages over the batch (the critic-free ones are centred by
    their group baseline already)."""
    advantage: str = "rloo"
    """PPO's advantage estimator: ``gae`` (a value head), or critic-free ``rloo``
    (baseline: the mean reward of the prompt's other responses) or ``grpo`` (the
    group's mean and std). Critic-free estimators need ``samples-per-prompt >= 2``."""
    samples_per_prompt: int = 4
    """Responses sampled for each prompt of a PPO batch. All of a prompt's responses
    form one privacy unit: their gradients are averaged before clipping."""
    kl_penalty: str = "reward"
    """Where beta * KL(policy || reference) enters PPO: ``reward`` (a per-token penalty
    on the reward) or ``loss`` (GRPO's per-token k3 term in the loss)."""
    dpo_beta: float = 1.5
    """DPO's initial (or fixed) beta. DPO optimizes the same KL-regularized objective as
    PPO (optimum ``pi_ref * exp(r / beta)``, r the annotators' Bradley-Terry reward), so
    the KL controller moves it like PPO's beta. The steps descend the loss divided by
    beta, so beta sets the margin past which a comparison stops pushing (where the
    policy settles), and the learning rate alone the step size."""

    @property
    def measures_candidate(self) -> bool:
        """Whether each training round is followed by a measurement of the candidate."""
        return self.trust_region_kl == "aggregate"

    @property
    def method(self) -> str:
        """The method's name in reports: ``dpo``, ``ppo`` (GAE), ``rloo`` or ``grpo``."""
        if self.objective == "dpo":
            return "dpo"
        return "ppo" if self.advantage == "gae" else self.advantage

    @property
    def initial_beta(self) -> float:
        """The KL coefficient of the first policy round, for this objective."""
        return self.dpo_beta if self.objective == "dpo" else self.beta


@dataclass(frozen=True)
class PrivacyConfig:
    """Example-level DP-SGD on every client, accounted over the whole run."""

    enabled: bool = True
    """DP can be switched off only explicitly; every report then says so."""
    epsilon: float = 8.0
    """Each client's total budget over all rounds and phases (and earlier runs on
    the same store)."""
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    """Per-example clipping norm C of the reward phase (the policy phase has its own,
    ``policy.max-grad-norm``: its losses' gradients have another scale)."""
    noise: str = "calibrated"
    """``calibrated``: each round, pick the smallest noise multiplier with which the
    rounds still planned fit the remaining budget. ``fixed``: use noise_multiplier."""
    noise_multiplier: float = 1.0
    """The reward phase's noise under ``fixed`` (the policy phase calibrates)."""
    reward_share: float = 0.85
    """When policy rounds follow, the reward phase plans to spend epsilon * reward-share;
    the policy phase then plans its rounds to use what composition leaves of epsilon."""
    accountant: str = "rdp"
    """``rdp`` or ``prv`` (Opacus accountants)."""
    statistics_share: float = 0.1
    """Share of epsilon for the statistics clients report (held-out accuracy, reward
    score, KL): every planned release alone would spend epsilon * statistics-share
    (:mod:`common.dp_statistics`). Training gets what composition leaves."""
    secure_noise: bool = True
    """Draw DP-SGD's Poisson samples and Gaussian noise from a cryptographically secure
    generator (:mod:`common.dp_randomness`). The simulation and the tests turn it off
    for reproducible runs; their reports say so."""


@dataclass(frozen=True)
class FederationConfig:
    """Client sampling and secure aggregation."""

    min_clients: int = 2
    """Clients that must be connected before a round starts, and that must
    survive a round for its aggregate to be used."""
    fraction_train: float = 1.0
    secure_aggregation: bool = True
    secagg_shares: str = "auto"
    """Key shares per client (SecAgg+'s k, :mod:`server.share_graph`): ``auto``, the
    smallest k that survives ``secagg-dropout`` within ``secagg-failure`` (it grows
    like log n: 19 of 100 clients at the defaults); ``all`` (SecAgg's complete graph);
    or a number, e.g. ``"21"``."""
    secagg_threshold: float = 0.5
    """Shares that rebuild a client's keys: more than this fraction of k (at least a
    strict majority, so no minority of a client's neighbours can unmask it). The
    round survives any k - t dropouts."""
    secagg_dropout: float = 0.1
    """Independent dropout rate each round must survive under ``secagg-shares=auto``."""
    secagg_failure: float = 0.001
    """Accepted chance that dropouts at ``secagg-dropout`` fail a round (it is retried)."""
    secagg_clipping_range: float = 4.0
    """Update values (and scaled statistics) are clipped to +-this before
    quantization; clients refuse to send values outside it."""
    secagg_quantization_range: int = 4194304
    round_timeout: float = 600.0
    """Seconds to wait for replies in each stage of a round."""
    poll_interval: float = 0.05
    """Seconds between the server's pulls for replies (Flower's own loop waits 3 s)."""
    node_wait_timeout: float = 600.0
    """Seconds to wait for min_clients nodes to connect."""


@dataclass(frozen=True)
class ServerConfig:
    """How the coordinator turns the mean client update into the next model."""

    optimizer: str = "fedavg"
    """``fedavg`` (global += lr * mean update) or ``fedadam``."""
    learning_rate: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


@dataclass(frozen=True)
class ClientConfig:
    """Where each client finds its local store."""

    store: str = "fedrlhf-store.sqlite"
    """Path of the client's SQLite store, used when the SuperNode's node config has
    no ``store`` key. ``{partition-id}`` is replaced by the node's partition id."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; mirrors ``[tool.flwr.app.config]``."""

    seed: int = 0
    run_dir: str = "runs/latest"
    """Where the server writes checkpoints, state, metrics and the report."""
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat run config; missing keys take the defaults."""
        remaining = dict(run_config)
        config = _build(cls, "", remaining)
        if remaining:
            raise ConfigError(f"unknown run-config key(s): {', '.join(sorted(remaining))}")
        config.validate()
        return config

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """The flat ``section.key-name`` form Flower uses (and pyproject.toml holds)."""
        return _flatten(self, "")

    def replace(self, **flat: bool | int | float | str) -> RunConfig:
        """A copy with some flat keys overridden, e.g. ``replace(**{"reward.rounds": 3})``."""
        return RunConfig.from_flower({**self.to_flower(), **flat})

    def on_node(self, node_config: Mapping[str, Any]) -> RunConfig:
        """This config with the SuperNode's own ``device`` and ``dtype``, if it set them."""
        flat = {f"model.{key}": node_config[key] for key in NODE_MODEL_KEYS if key in node_config}
        return self.replace(**flat) if flat else self

    @property
    def policy_model(self) -> ModelConfig:
        """The model settings with the policy adapter's own LoRA shape."""
        return dataclasses.replace(
            self.model, lora_rank=self.policy.lora_rank, lora_targets=self.policy.lora_targets
        )

    @property
    def reward_epsilon(self) -> float:
        """The budget the reward phase plans to spend (all of it without policy rounds)."""
        share = self.privacy.reward_share if self.policy.rounds > 0 else 1.0
        return self.privacy.epsilon * share

    def validate(self) -> None:
        """Refuse values that are well-typed but meaningless."""
        checks = [
            (self.model.lora_rank > 0, "model.lora-rank must be > 0"),
            (self.model.max_length >= 8, "model.max-length must be >= 8"),
            (
                self.model.device == "auto"
                or self.model.device in ("cpu", "cuda", "mps")
                or self.model.device.startswith("cuda:"),
                "model.device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
            ),
            (
                self.model.dtype in ("auto", "float32", "bfloat16", "float16"),
                "model.dtype must be 'auto', 'float32', 'bfloat16' or 'float16'",
            ),
            (
                self.model.reward_pooling in ("mean", "last"),
                "model.reward-pooling must be 'mean' or 'last'",
            ),
            (self.reward.rounds >= 0, "reward.rounds must be >= 0"),
            (self.reward.local_epochs > 0, "reward.local-epochs must be > 0"),
            (self.reward.batch_size > 0, "reward.batch-size must be > 0"),
            (self.reward.optimizer in ("sgd", "adam"), "reward.optimizer must be 'sgd' or 'adam'"),
            (self.reward.learning_rate > 0, "reward.learning-rate must be > 0"),
            (0 <= self.reward.heldout_fraction < 1, "reward.heldout-fraction must be in [0, 1)"),
            (self.policy.rounds >= 0, "policy.rounds must be >= 0"),
            (self.policy.objective in ("ppo", "dpo"), "policy.objective must be 'ppo' or 'dpo'"),
            (self.policy.lora_rank > 0, "policy.lora-rank must be > 0"),
            (self.policy.iterations >= 1, "policy.iterations must be >= 1"),
            (self.policy.batch_size >= 1, "policy.batch-size must be >= 1"),
            (self.policy.measure_prompts >= 1, "policy.measure-prompts must be >= 1"),
            (self.policy.optimizer in ("sgd", "adam"), "policy.optimizer must be 'sgd' or 'adam'"),
            (self.policy.learning_rate > 0, "policy.learning-rate must be > 0"),
            (self.policy.ppo_epochs >= 1, "policy.ppo-epochs must be >= 1"),
            (self.policy.minibatches >= 1, "policy.minibatches must be >= 1"),
            (self.policy.max_new_tokens >= 1, "policy.max-new-tokens must be >= 1"),
            (self.policy.temperature > 0, "policy.temperature must be > 0"),
            (0 < self.policy.top_p <= 1, "policy.top-p must be in (0, 1]"),
            (self.policy.kl_estimator in ("k1", "k3"), "policy.kl-estimator must be 'k1' or 'k3'"),
            (
                self.policy.advantage in ("gae", "rloo", "grpo"),
                "policy.advantage must be 'gae', 'rloo' or 'grpo'",
            ),
            (self.policy.samples_per_prompt >= 1, "policy.samples-per-prompt must be >= 1"),
            (
                self.policy.advantage == "gae" or self.policy.samples_per_prompt >= 2,
                "policy.advantage 'rloo' and 'grpo' need policy.samples-per-prompt >= 2",
            ),
            (
                self.policy.kl_penalty in ("reward", "loss"),
                "policy.kl-penalty must be 'reward' or 'loss'",
            ),
            (
                self.policy.kl_control in ("adaptive", "fixed"),
                "policy.kl-control must be 'adaptive' or 'fixed'",
            ),
            (self.policy.beta >= 0, "policy.beta must be >= 0"),
            (self.policy.kl_target > 0, "policy.kl-target must be > 0"),
            (self.policy.kl_horizon > 0, "policy.kl-horizon must be > 0"),
            (
                self.policy.kl_bound >= self.policy.kl_target,
                "policy.kl-bound must be >= policy.kl-target",
            ),
            (
                self.policy.trust_region in ("scale", "reject", "shrink"),
                "policy.trust-region must be 'scale', 'reject' or 'shrink'",
            ),
            (
                self.policy.trust_region_kl in ("aggregate", "local"),
                "policy.trust-region-kl must be 'aggregate' or 'local'",
            ),
            (0 < self.policy.gamma <= 1, "policy.gamma must be in (0, 1]"),
            (0 <= self.policy.lam <= 1, "policy.lam must be in [0, 1]"),
            (self.policy.clip_range > 0, "policy.clip-range must be > 0"),
            (self.policy.value_clip_range > 0, "policy.value-clip-range must be > 0"),
            (self.policy.dpo_beta > 0, "policy.dpo-beta must be > 0"),
            (self.privacy.epsilon > 0, "privacy.epsilon must be > 0"),
            (0 < self.privacy.reward_share <= 1, "privacy.reward-share must be in (0, 1]"),
            (
                0 < self.privacy.statistics_share < 1,
                "privacy.statistics-share must be in (0, 1)",
            ),
            (0 < self.privacy.delta < 1, "privacy.delta must be in (0, 1)"),
            (self.privacy.max_grad_norm > 0, "privacy.max-grad-norm must be > 0"),
            (self.policy.max_grad_norm > 0, "policy.max-grad-norm must be > 0"),
            (
                self.privacy.noise in ("calibrated", "fixed"),
                "privacy.noise must be 'calibrated' or 'fixed'",
            ),
            (self.privacy.noise_multiplier > 0, "privacy.noise-multiplier must be > 0"),
            (
                self.privacy.accountant in ("rdp", "prv"),
                "privacy.accountant must be 'rdp' or 'prv'",
            ),
            (self.federation.min_clients >= 1, "federation.min-clients must be >= 1"),
            (
                0 < self.federation.fraction_train <= 1,
                "federation.fraction-train must be in (0, 1]",
            ),
            (
                self.federation.secagg_shares in ("auto", "all")
                or (
                    self.federation.secagg_shares.isdigit()
                    and int(self.federation.secagg_shares) >= 3
                ),
                "federation.secagg-shares must be 'auto', 'all' or a number of shares >= 3",
            ),
            (
                0.5 <= self.federation.secagg_threshold < 1,
                "federation.secagg-threshold must be in [0.5, 1)",
            ),
            (
                0 <= self.federation.secagg_dropout < 0.5,
                "federation.secagg-dropout must be in [0, 0.5)",
            ),
            (
                0 < self.federation.secagg_failure < 1,
                "federation.secagg-failure must be in (0, 1)",
            ),
            (self.federation.poll_interval > 0, "federation.poll-interval must be > 0"),
            (
                self.federation.secagg_clipping_range > 0,
                "federation.secagg-clipping-range must be > 0",
            ),
            (
                self.server.optimizer in ("fedavg", "fedadam"),
                "server.optimizer must be 'fedavg' or 'fedadam'",
            ),
            (self.server.learning_rate > 0, "server.learning-rate must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.model.gradient_checkpointing and self.privacy.enabled:
            raise ConfigError(
                "model.gradient-checkpointing cannot be used with DP (privacy.enabled): "
                "Opacus's hooks record each layer's activations in the forward pass, and "
                "checkpointing's recomputation leaves per-sample gradients missing"
            )
        if self.federation.secure_aggregation and self.federation.min_clients < 2:
            raise ConfigError("secure aggregation needs federation.min-clients >= 2")


def _key(prefix: str, name: str) -> str:
    return f"{prefix}{name.replace('_', '-')}"


def _build(schema: type, prefix: str, remaining: dict[str, Any]) -> Any:
    hints = get_type_hints(schema)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = _build(kind, _key(prefix, f.name) + ".", remaining)
            continue
        key = _key(prefix, f.name)
        if key not in remaining:
            continue
        values[f.name] = _coerce(key, remaining.pop(key), kind)
    return schema(**values)


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"run-config key {key!r} must be true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"run-config key {key!r} must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"run-config key {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _flatten(config: Any, prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(_flatten(value, _key(prefix, f.name) + "."))
        else:
            flat[_key(prefix, f.name)] = value
    return flat
