"""Methods beyond offline losses, trained under the offline cells' conditions: what DPO is always compared against.

- ``best_of_n``: ``n`` samples of the reference per evaluation prompt, the learned reward model's favourite kept. No
  training; its KL from the reference is analytic (log n − (n − 1)/n).
- ``rloo``: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv:2402.14740) on the learned reward
  less β times each sample's KL from the reference, updated as TRL's ``RLOOTrainer`` of 0.11-0.19 did (a clipped
  probability ratio of whole completions over ``epochs`` passes of each batch of samples).
- ``grpo``: GRPO (Shao et al. 2024, arXiv:2402.03300): each group's learned rewards standardised as advantages, a
  clipped per-token ratio, and β times the k3 estimate of the KL to the reference added to the loss.
- ``ppo``: PPO with a value model (Schulman et al. 2017; the RLHF recipe of Ouyang et al. 2022, as TRL's
  ``PPOTrainer``): a per-token KL penalty, the learned reward at the last token, GAE, clipped policy and value
  losses. Four models: the policy, the reference, the reward model and the critic (initialised from the reward model).
- ``online_<variant>``, for any registered paired variant: online preference training (Guo et al. 2024,
  arXiv:2402.04792): every step samples two completions per prompt from the policy, the learned reward model (or,
  as an upper bound, the gold reward: ``labeller=gold``) labels them, and the variant's loss trains on the pairs.

Every method trains from the reference weights with the offline cells' optimizer, learning rate, warm-up, clipping,
precision and steps, on the same training prompts in the same seeded order, and draws as many completions per step
as an offline step trains on (two per pair: 2 × batch size). β is the KL coefficient of RLOO and PPO: the same β as
DPO's, whose loss is the closed form of that KL-regularised objective. Cells are evaluated by the same evaluator, with
the learned reward of the samples beside the gold (``proxy_reward``), and stored like any other cell.

These are methods, not losses: they are selected like variants (``--variants dpo,rloo,ppo,online_dpo,best_of_n``),
but no plugin registers them (no second hook until a second consumer needs one).
"""

from __future__ import annotations

import copy
import difflib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dpobench.cells import Cell, Prepared
from dpobench.data import Pair, sample_completions
from dpobench.logprobs import Batch, collate, per_token_rows, reference_logprobs, sequence_logprobs
from dpobench.losses import TOKEN_LOGPS, Param, PreferenceLoss, resolve_params
from dpobench.registry import LossSpec, Registry, UnknownLossError
from dpobench.reward_model import LEARNED_ABOVE, RewardModel, last_token_values, token_values
from dpobench.train import (
    CellResult,
    CellStopped,
    CellTrainer,
    optimizer_for,
    peak_memory_mb,
    run_steps,
)
from dpobench.train import batch_order as seeded_order

__all__ = [
    "DIVERGED_KL",
    "GRPO",
    "LISTED",
    "METHODS",
    "PPO",
    "RLOO",
    "BestOfN",
    "Method",
    "MethodSpec",
    "OnlinePreference",
    "gae",
    "grpo_advantages",
    "is_method",
    "k3_kl",
    "method_spec",
    "ppo_policy_loss",
    "ppo_value_loss",
    "resolve_names",
    "rloo_advantages",
]  # fmt: skip

#: an on-policy cell whose samples drift further than this from the reference (mean log π − log π_ref per completion,
#: nats) has diverged: it stops there with its reason. The preset rlhf's RL cells peak at 10.5 (benchmarks/RESULTS.md);
#: the default run's one collapse (APO-down, looping text) reached 185
DIVERGED_KL = 100.0

#: what ``online_<variant>`` is named by
ONLINE = "online_"

Steps = Callable[[int], None] | None


class Method:
    """A method's configuration (its declared parameters resolved, as a loss's are) and how it trains one cell."""

    name: ClassVar[str]
    paper: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}
    #: the models it holds while it trains (the seed notebook's "models required")
    models: tuple[str, ...] = ("policy", "reference", "reward model")

    def __init__(self, loss: PreferenceLoss | None = None, **hparams: Any) -> None:
        self.loss = loss
        self.hparams = {**(loss.hparams if loss is not None else {}),
                        **resolve_params(self.params, hparams, f"method {self.name!r}")}  # fmt: skip

    @property
    def uses_reward_model(self) -> bool:
        """Whether it needs the learned reward model (online training labelled by the gold reward does not)."""
        return True

    def run(self, prepared: Prepared, cell: Cell, on_step: Steps, should_stop: Callable[[], bool] | None) -> CellResult:
        """Train and evaluate ``cell``; a failed result, untrained, where its reward model did not learn."""
        problem = reward_model_problem(prepared, cell)
        if problem:
            return CellResult(status="failed", error=problem)
        return self.train(prepared, cell, on_step, should_stop)

    def train(
        self, prepared: Prepared, cell: Cell, on_step: Steps, should_stop: Callable[[], bool] | None
    ) -> CellResult:
        raise NotImplementedError


def _beta(doc: str) -> Param:
    return Param(0.1, "(0, inf)", doc)


class BestOfN(Method):
    """Best-of-N sampling from the reference, ranked by the learned reward model: the no-training baseline."""

    name = "best_of_n"
    paper = "Stiennon et al. 2020 (arXiv:2009.01325)"
    models = ("reference", "reward model")
    params = {"n": Param(16, "[1, inf)", "samples of the reference per prompt; the reward model's best is kept")}

    def train(
        self, prepared: Prepared, cell: Cell, on_step: Steps, should_stop: Callable[[], bool] | None
    ) -> CellResult:
        reward_model = prepared.reward_models[cell.scenario]
        evaluation = prepared.evaluator.best_of_n(self.hparams["n"], cell.seed, reward_model)
        return CellResult(evaluations=[evaluation])


@dataclass
class Rollout:
    """One step's samples: ``k`` completions of each of its prompts (grouped by prompt), collated, with the learned
    reward of each and the sampling policy's and the reference's log-probs (per token: (samples, width))."""

    rows: list[tuple[tuple[int, ...], tuple[int, ...]]]
    batch: Batch
    scores: torch.Tensor
    policy_tokens: torch.Tensor
    reference_tokens: torch.Tensor
    mask: torch.Tensor  # (samples, width): a completion token

    @property
    def kl(self) -> torch.Tensor:
        """log π − log π_ref of each sample, summed over its tokens."""
        return ((self.policy_tokens - self.reference_tokens) * self.mask).sum(-1)


class _OnPolicy(Method):
    """The loop RLOO, GRPO and PPO share: sample from the policy, score with the reward model, update ``epochs`` times
    on the batch of samples."""

    @property
    def samples_per_prompt(self) -> int:
        """Completions per prompt (RLOO's k, GRPO's group; PPO's 1): a step's prompts are 2 × batch size / this."""
        return int(self.hparams.get("samples", 1))

    def train(
        self, prepared: Prepared, cell: Cell, on_step: Steps, should_stop: Callable[[], bool] | None
    ) -> CellResult:
        config, device, seed = prepared.config.train, prepared.plan.device, cell.seed
        autocast = prepared.acceleration.autocast
        reward_model = prepared.reward_models[cell.scenario]
        policy = prepared.policy
        policy.load_state_dict(prepared.reference_state)
        policy.to(device).train()
        policy.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        self.setup(reward_model, device)
        parameters = [p for p in policy.parameters() if p.requires_grad] + self.extra_parameters()
        optimizer, schedule = optimizer_for(parameters, config)
        prompts = _training_prompts(prepared, cell)
        per_step = max(1, 2 * config.batch_size // self.samples_per_prompt)
        order = seeded_order(len(prompts), config.steps, per_step, seed)
        pad = prepared.tokenizer.pad_token_id

        def step(number: int) -> dict[str, float]:
            start = time.perf_counter()
            chosen = [prompts[i] for i in order[number].tolist()]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                rollout = _rollout(prepared, policy, reward_model, chosen, self.samples_per_prompt,
                                   seed * 1_000_003 + number, pad)  # fmt: skip
                _stop_if_diverged(rollout, number + 1)
                metrics = self.update(policy, rollout, parameters, optimizer, config.max_grad_norm, number + 1)
            schedule.step()  # the warm-up counts steps (batches of samples), as an offline cell's does
            elapsed = time.perf_counter() - start
            samples = len(rollout.rows)
            return {"step": number + 1, **metrics, "rollout_reward": float(rollout.scores.mean()),
                    "rollout_kl": float(rollout.kl.mean()), "step_time_ms": elapsed * 1e3,
                    "samples_per_s": samples / elapsed, "pairs_per_s": samples / 2 / elapsed,
                    # prompt and completion tokens of every sample, as an offline step counts each row's
                    "tokens_per_s": float(rollout.batch.attention_mask.sum()) / elapsed,
                    "peak_memory_mb": peak_memory_mb(device)}  # fmt: skip

        evaluator = prepared.evaluator
        try:
            return run_steps(CellResult(), step, policy, config,
                             lambda model, done: evaluator(model, done, None, seed, proxy=reward_model),
                             on_step, should_stop)  # fmt: skip
        finally:
            self.teardown()

    def setup(self, reward_model: RewardModel, device: str) -> None: ...

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def teardown(self) -> None: ...

    def update(self, policy: Any, rollout: Rollout, parameters: list[torch.nn.Parameter], optimizer: Any,
               max_grad_norm: float, step: int) -> dict[str, float]:  # fmt: skip
        raise NotImplementedError


class RLOO(_OnPolicy):
    """RLOO: REINFORCE with the other samples of the same prompt as the baseline, on reward − β·KL."""

    name = "rloo"
    paper = "arXiv:2402.14740"
    params = {
        "beta": _beta("the KL penalty's coefficient: reward − β·(log π − log π_ref) of each sample"),
        "samples": Param(2, "[2, inf)", "completions per prompt (k): each one's baseline is the mean of the others'"),
        "epochs": Param(4, "[1, inf)", "passes over each batch of samples (TRL's num_ppo_epochs)"),
        "clip": Param(0.2, "(0, inf)", "the probability ratio's clip range"),
    }

    def update(self, policy: Any, rollout: Rollout, parameters: list[torch.nn.Parameter], optimizer: Any,
               max_grad_norm: float, step: int) -> dict[str, float]:  # fmt: skip
        k, beta = self.hparams["samples"], self.hparams["beta"]
        old = (rollout.policy_tokens * rollout.mask).sum(-1)
        rewards = rollout.scores - beta * rollout.kl  # TRL's rlhf_reward: the score less the sequence's KL
        advantages = rloo_advantages(rewards.view(-1, k)).flatten()
        for _ in range(self.hparams["epochs"]):
            new, _ = sequence_logprobs(policy, rollout.batch)
            loss = ppo_policy_loss(new - old, advantages, self.hparams["clip"])
            grad_norm = _optimizer_step(loss, parameters, optimizer, max_grad_norm, step)
        return {"loss": float(loss.detach()), "grad_norm": grad_norm}


class GRPO(_OnPolicy):
    """GRPO: the group's rewards standardised as advantages, a clipped per-token ratio, the KL to the reference a
    loss term."""

    name = "grpo"
    paper = "arXiv:2402.03300"
    params = {
        "beta": _beta("the KL term's weight: β·k3(π, π_ref) per token, added to the loss (not to the reward)"),
        "samples": Param(4, "[2, inf)", "completions per prompt (the group): advantages are standardised within it"),
        "epochs": Param(1, "[1, inf)", "passes over each batch of samples (TRL's num_iterations)"),
        "clip": Param(0.2, "(0, inf)", "the per-token probability ratio's clip range"),
    }

    def update(self, policy: Any, rollout: Rollout, parameters: list[torch.nn.Parameter], optimizer: Any,
               max_grad_norm: float, step: int) -> dict[str, float]:  # fmt: skip
        mask, width, beta = rollout.mask, rollout.mask.shape[1], self.hparams["beta"]
        advantages = grpo_advantages(rollout.scores.view(-1, self.hparams["samples"])).flatten()[:, None]
        for _ in range(self.hparams["epochs"]):
            _, per_token = sequence_logprobs(policy, rollout.batch, statistics=("token_logps",), token_width=width)
            new = per_token["token_logps"]
            surrogate = clipped_surrogate(new - rollout.policy_tokens, advantages, self.hparams["clip"])
            per_token_loss = surrogate + beta * k3_kl(new, rollout.reference_tokens)
            # each completion's tokens averaged, then the completions (the GRPO paper's normalisation)
            loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1)).mean()
            grad_norm = _optimizer_step(loss, parameters, optimizer, max_grad_norm, step)
        return {"loss": float(loss.detach()), "grad_norm": grad_norm}


class PPO(_OnPolicy):
    """PPO with a value model: per-token KL penalty, the learned reward at the end, GAE and clipped losses."""

    name = "ppo"
    paper = "arXiv:1707.06347; arXiv:2203.02155"
    params = {
        "beta": _beta("the per-token KL penalty's coefficient: −β·(log π − log π_ref) at every token"),
        "epochs": Param(4, "[1, inf)", "passes over each batch of samples (TRL's num_ppo_epochs)"),
        "clip": Param(0.2, "(0, inf)", "the policy's probability ratio clip range"),
        "value_clip": Param(0.2, "(0, inf)", "how far a value prediction may move from the rollout's"),
        "value_coef": Param(0.1, "[0, inf)", "the value loss's weight beside the policy's"),
        "gamma": Param(1.0, "[0, 1]", "the discount"),
        "lam": Param(0.95, "[0, 1]", "GAE's λ"),
    }

    models = ("policy", "reference", "reward model", "critic")
    critic: Any = None

    def setup(self, reward_model: RewardModel, device: str) -> None:
        self.critic = copy.deepcopy(reward_model.model).to(device).train().requires_grad_(True)  # TRL: from the RM

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.critic.parameters())

    def teardown(self) -> None:
        self.critic = None

    def _values(self, batch: Batch, width: int) -> torch.Tensor:
        """The critic's value of the state before each completion token: (samples, width)."""
        values = (
            token_values(self.critic, batch.input_ids, batch.attention_mask).flatten().index_select(0, batch.positions)
        )
        return per_token_rows(values, batch, width)

    def update(self, policy: Any, rollout: Rollout, parameters: list[torch.nn.Parameter], optimizer: Any,
               max_grad_norm: float, step: int) -> dict[str, float]:  # fmt: skip
        mask, width = rollout.mask, rollout.mask.shape[1]
        with torch.no_grad():
            old_values = self._values(rollout.batch, width) * mask
            rewards = -self.hparams["beta"] * (rollout.policy_tokens - rollout.reference_tokens) * mask
            last = mask.sum(-1).long() - 1
            rewards[torch.arange(len(last)), last] += rollout.scores
            advantages = gae(rewards, old_values, mask, self.hparams["gamma"], self.hparams["lam"])
            returns = advantages + old_values
            advantages = _whiten(advantages, mask)
        for _ in range(self.hparams["epochs"]):
            _, per_token = sequence_logprobs(policy, rollout.batch, statistics=("token_logps",), token_width=width)
            policy_loss = ppo_policy_loss(per_token["token_logps"] - rollout.policy_tokens, advantages,
                                          self.hparams["clip"], mask)  # fmt: skip
            value_loss = ppo_value_loss(self._values(rollout.batch, width), old_values, returns,
                                        self.hparams["value_clip"], mask)  # fmt: skip
            loss = policy_loss + self.hparams["value_coef"] * value_loss
            grad_norm = _optimizer_step(loss, parameters, optimizer, max_grad_norm, step)
        return {"loss": float(policy_loss.detach()), "value_loss": float(value_loss.detach()), "grad_norm": grad_norm}


class OnlinePreference(Method):
    """A registered paired loss trained online: pairs sampled from the policy and labelled at every step."""

    name = "online"
    paper = "arXiv:2402.04792"
    params = {"labeller": Param("reward_model", ("reward_model", "gold"),
                                "what labels each step's pairs: the learned reward model, or the gold reward")}  # fmt: skip

    @property
    def uses_reward_model(self) -> bool:
        return self.hparams["labeller"] == "reward_model"

    @property
    def models(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("policy", "reference", "reward model") if self.uses_reward_model else ("policy", "reference")

    def train(
        self, prepared: Prepared, cell: Cell, on_step: Steps, should_stop: Callable[[], bool] | None
    ) -> CellResult:
        assert self.loss is not None
        config, device, seed, loss = prepared.config.train, prepared.plan.device, cell.seed, self.loss
        reward_model = prepared.reward_models.get(cell.scenario)
        loss.to(device)
        trainer = CellTrainer(prepared.policy, prepared.reference_state, loss, prepared.trains[cell.scenario],
                              prepared.train_reference, prepared.tokenizer.pad_token_id, config, seed,
                              prepared.acceleration, prepared.reference)  # fmt: skip
        prompts = _training_prompts(prepared, cell)
        order = seeded_order(len(prompts), config.steps, config.batch_size, seed)
        pad, autocast = prepared.tokenizer.pad_token_id, prepared.acceleration.autocast
        evaluator = prepared.evaluator

        def step(number: int) -> dict[str, float]:
            start = time.perf_counter()
            chosen = [prompts[i] for i in order[number].tolist()]
            policy = prepared.policy.eval()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                drawn = sample_completions(policy, prepared.tokenizer, chosen, samples=2, seed=seed * 1_000_003 + number,
                                           max_new_tokens=evaluator.max_new_tokens, device=device)  # fmt: skip
            policy.train()
            rows = [(p, s) for p, group in zip(chosen, drawn, strict=True) for s in group]
            if self.hparams["labeller"] == "gold":
                values = torch.tensor(evaluator.gold([p for p, _ in rows], [s for _, s in rows])).view(-1, 2)
            else:
                values = reward_model.score(rows).view(-1, 2)
            first, second = values[:, 0], values[:, 1]
            pairs = [Pair(p, a, b, margin=float(abs(ra - rb))) if ra > rb else Pair(p, b, a, margin=float(abs(ra - rb)))
                     for p, (a, b), ra, rb in zip(chosen, drawn, first.tolist(), second.tolist(), strict=True)
                     if ra != rb]  # fmt: skip
            if not pairs:
                raise CellStopped(
                    "failed", f"step {number + 1}: the labeller tied every sampled pair; nothing to train"
                )
            reference = reference_logprobs(prepared.reference, pairs, pad, device=device, autocast=autocast,
                                           token_logps=TOKEN_LOGPS in loss.inputs)  # fmt: skip
            metrics = trainer.step_on(pairs, reference)
            elapsed = time.perf_counter() - start
            policy_mean = (metrics["chosen_logp"] + metrics["rejected_logp"]) / 2  # before the update
            reference_mean = float((reference.chosen + reference.rejected).mean()) / 2
            # the learned reward of what it labelled; gold labels are not on the learned reward's scale
            learned = {"rollout_reward": float(values.mean())} if self.uses_reward_model else {}
            return {**metrics, **learned, "rollout_kl": policy_mean - reference_mean, "step_time_ms": elapsed * 1e3,
                    "samples_per_s": len(rows) / elapsed, "pairs_per_s": len(pairs) / elapsed,
                    "tokens_per_s": sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs) / elapsed}  # fmt: skip

        return run_steps(CellResult(), step, prepared.policy, config,
                         lambda model, done: evaluator(model, done, loss, seed, proxy=reward_model),
                         on_step, should_stop)  # fmt: skip


#: the methods by name (``online_<variant>`` is ``OnlinePreference`` with that variant's loss)
METHODS: dict[str, type[Method]] = {m.name: m for m in (BestOfN, RLOO, GRPO, PPO)}

#: every method as ``dpobench list`` shows it: its name on the command line, and its class
LISTED: dict[str, type[Method]] = {**METHODS, f"{ONLINE}<variant>": OnlinePreference}


@dataclass(frozen=True)
class MethodSpec:
    """A method as a sweep selects it, under the name ``--variants`` gives; an online method carries its loss's spec."""

    name: str
    cls: type[Method]
    loss: LossSpec | None = None

    @property
    def plugin(self) -> str:
        """Whose code the cells run: the loss's plugin for an online method (so that edited loss code trains anew)."""
        return self.loss.plugin if self.loss is not None else "dpobench"

    @property
    def version(self) -> str:
        return self.loss.version if self.loss is not None else ""

    @property
    def params(self) -> dict[str, Param]:
        return {**(self.loss.params if self.loss is not None else {}), **self.cls.params}

    @property
    def unpaired(self) -> bool:
        return False

    def build(self, **values: Any) -> Method:
        """The method with these parameters (the loss's built from its own, checked as a loss's are)."""
        own = {k: v for k, v in values.items() if k in self.cls.params}
        loss = self.loss.build(**{k: v for k, v in values.items() if k not in own}) if self.loss is not None else None
        if loss is not None:
            loss.name = self.name
        return self.cls(loss, **own)


def method_spec(name: str, registry: Registry) -> MethodSpec | None:
    """The method ``name`` selects, or None where it names none (a loss variant, or nothing). ``online_X`` of a
    variant that trains on unpaired examples raises ``UnknownLossError``, naming the paired ones."""
    if name in METHODS:
        return MethodSpec(name, METHODS[name])
    if name.startswith(ONLINE) and name not in registry:
        base = name[len(ONLINE) :]
        spec = registry[base]  # an unknown variant: the registry's error, with its did-you-mean
        if spec.cls.unpaired:
            raise UnknownLossError(f"{name}: {base} trains on unpaired examples, and online training samples pairs; "
                                   "use online_ with a paired variant (online_dpo, online_ipo, …)")  # fmt: skip
        return MethodSpec(name, OnlinePreference, spec)
    return None


def is_method(name: str, registry: Registry) -> bool:
    """Whether ``name`` selects a method (of a loss the registry holds, for ``online_<variant>``)."""
    return name in METHODS or (name.startswith(ONLINE) and name[len(ONLINE) :] in registry)


def resolve_names(names: Iterable[str], registry: Registry) -> tuple[list[str], dict[str, MethodSpec]]:
    """``--variants`` split into loss variants and methods; a name that is neither raises ``UnknownLossError`` with
    the closest of both."""
    losses, methods = [], {}
    for name in names:
        spec = method_spec(name, registry)
        if spec is not None:
            methods[name] = spec
        elif name in registry:
            losses.append(name)
        else:
            close = difflib.get_close_matches(name, [*registry, *METHODS], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; `dpobench list` shows them all"
            raise UnknownLossError(f"unknown loss variant {name!r}{hint}")
    return losses, methods


def reward_model_problem(prepared: Prepared, cell: Cell) -> str:
    """Why a method cell cannot train (its reward model did not learn), or ""."""
    method = cell.method
    if method is None or not method.uses_reward_model:
        return ""
    accuracy = prepared.reward_models[cell.scenario].info["heldout_accuracy"]
    if accuracy > LEARNED_ABOVE:
        return ""
    return (f"the reward model did not learn the preferences (held-out accuracy {accuracy:.2f} ≤ {LEARNED_ABOVE}): "
            "not trained against it; more or cleaner pairs would teach it")  # fmt: skip


# -- the estimators, each checked against hand-worked values (tests/test_methods.py) ------------------------------


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Each of k samples' reward less the mean of the other k − 1 of its prompt: (prompts, k) → (prompts, k)."""
    k = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Each of k samples' reward standardised within its prompt's group: (r − mean) / (sd + 10⁻⁴), sd with k − 1
    (TRL's GRPO): (prompts, k) → (prompts, k)."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-4)


def k3_kl(logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(π‖π_ref) per token, exp(d) − d − 1 with d = log π_ref − log π: unbiased on
    samples of π, and never negative."""
    d = reference_logps - logps
    return d.exp() - d - 1


def ppo_policy_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """PPO's clipped surrogate (``clipped_surrogate``) averaged, over the ``mask``'s tokens where given."""
    return _mean(clipped_surrogate(log_ratio, advantages, clip), mask)


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """max(−A·r, −A·clip(r, 1 − ε, 1 + ε)) with r = exp(log_ratio), elementwise: the loss that stops rewarding a
    ratio once it has moved ε in the advantage's direction."""
    ratio = log_ratio.exp()
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float, mask: torch.Tensor
) -> torch.Tensor:
    """½·max((V − R)², (clip(V, V_old ± ε) − R)²), averaged over the ``mask``'s tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * _mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates per token (Schulman et al. 2016): A_t = δ_t + γλ·A_{t+1}, δ_t = r_t +
    γ·V_{t+1} − V_t, with V and A zero after a completion's last token (``mask``)."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    following = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(following)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        following = (delta + gamma * lam * following) * mask[:, t]
        advantages[:, t] = following
    return advantages


def _whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit variance over the ``mask``'s tokens (TRL's masked_whiten)."""
    mean = _mean(values, mask)
    variance = _mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def _mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return values.mean() if mask is None else (values * mask).sum() / mask.sum()


# -- the rollout and the update they share -----------------------------------------------------------------------


def _training_prompts(prepared: Prepared, cell: Cell) -> list[tuple[int, ...]]:
    """The prompts of the scenario's training pairs, in the pairs' order: what the offline cells train on."""
    return [pair.prompt for pair in prepared.trains[cell.scenario].pairs]


@torch.no_grad()
def _rollout(
    prepared: Prepared, policy: Any, reward_model: RewardModel, prompts: list[tuple[int, ...]], k: int, seed: int,
    pad: int,
) -> Rollout:  # fmt: skip
    """``k`` samples of the policy per prompt, with their learned rewards and both models' per-token log-probs."""
    policy.eval()
    try:
        drawn = sample_completions(policy, prepared.tokenizer, prompts, samples=k, seed=seed, device=prepared.plan.device,
                                   max_new_tokens=prepared.evaluator.max_new_tokens)  # fmt: skip
        rows = [(p, s) for p, group in zip(prompts, drawn, strict=True) for s in group]
        batch = collate(rows, pad).to(prepared.plan.device)
        width = max(len(s) for _, s in rows)
        _, mine = sequence_logprobs(policy, batch, statistics=("token_logps",), token_width=width)
        _, theirs = sequence_logprobs(prepared.reference, batch, statistics=("token_logps",), token_width=width)
        scores = last_token_values(reward_model.model, batch.input_ids, batch.attention_mask)
    finally:
        policy.train()
    mask = (torch.arange(width, device=batch.tokens.device)[None, :] < batch.tokens[:, None]).float()
    return Rollout(rows, batch, scores, mine["token_logps"], theirs["token_logps"], mask)


def _stop_if_diverged(rollout: Rollout, step: int) -> None:
    kl = float(rollout.kl.mean())
    if not math.isfinite(kl) or not bool(rollout.scores.isfinite().all()):
        raise CellStopped("diverged", f"step {step}: the samples' log-probabilities or rewards are not finite")
    if kl > DIVERGED_KL:
        raise CellStopped("diverged", f"step {step}: the samples' KL from the reference is {kl:.0f} nats, past the "
                                      f"bound of {DIVERGED_KL:g}")  # fmt: skip


def _optimizer_step(
    loss: torch.Tensor, parameters: list[torch.nn.Parameter], optimizer: Any, max_grad_norm: float, step: int
) -> float:
    """One update, the offline step's way: a loss that is not finite stops the cell (diverged) before it lands."""
    if not torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise CellStopped("diverged", f"step {step}: the loss is {float(loss)}")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)
