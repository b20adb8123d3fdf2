"""Preference pairs: sampled from the SFT model and labelled by the gold reward (or a judge), or read from a file, a
dataset folder or the Hub; and unpaired examples, from pairs unrolled or from a file of unpaired rows.

Pairs are token ids (prompt, chosen, rejected), so that every cell of a sweep sees the very same
tensors. Scenarios change only the labels of the training pairs (``clean``, ``noisy``,
``length-biased``); held-out pairs are always labelled clean.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dpobench._util import atomic_path, one_line
from dpobench.task import TASK_VERSION, gold_reward, sample_review

__all__ = [
    "SCENARIOS",
    "UNPAIRED_SCENARIO",
    "DataError",
    "DataRecipe",
    "Example",
    "ExampleSet",
    "Pair",
    "PairSet",
    "TaskData",
    "apply_scenario",
    "cached_task_data",
    "decode_completion",
    "desirable_ratio",
    "encode_completion",
    "encode_prompt",
    "load_pairs_file",
    "make_task_data",
    "sample_completions",
    "task_prompt",
    "unroll",
]

SCENARIOS = ("clean", "noisy", "length-biased")
#: the unpaired scenarios, ``unpaired-D:U``: the clean pairs unrolled into desirable and undesirable examples, the
#: more plentiful side thinned to D:U (KTO's claim: it trains at 1:10). Only unpaired variants train in them; an
#: unpaired variant in a paired scenario trains on its pairs unrolled, 1:1
UNPAIRED_SCENARIO = re.compile(r"^unpaired-([1-9][0-9]*):([1-9][0-9]*)$")


class DataError(ValueError):
    """Bad user data: the message names the file, line or key and says what to do."""


@dataclass(frozen=True)
class Pair:
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]  # completion token ids, ending with EOS
    rejected: tuple[int, ...]
    weight: float = 1.0
    chosen_gold: float = math.nan  # gold rewards, when the task knows them
    rejected_gold: float = math.nan
    #: by how much the data's scores favour chosen over rejected (≥ 0): the synthetic task's |Δ gold| (whatever a
    #: scenario does to the labels), a data file's ``margin`` or ``score_chosen`` − ``score_rejected``; NaN where the
    #: data has none (or a bad one, which ``TaskData.info["margin_problem"]`` names). Variants declaring "margin" read it
    margin: float = math.nan

    @property
    def length(self) -> int:
        """Tokens in the pair's longer row (prompt + the longer completion): its width once padded."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PairSet:
    pairs: list[Pair]
    truncated: int = 0

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for p in self.pairs:  # margins are not in it: only the cells of variants that read them depend on them
            digest.update(json.dumps([p.prompt, p.chosen, p.rejected, p.weight]).encode())
        return digest.hexdigest()[:16]

    def margin_fingerprint(self) -> str:
        """The pairs' score margins, hashed: part of the identity of a cell whose variant reads them."""
        return hashlib.sha256(json.dumps([p.margin for p in self.pairs]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Example:
    """One unpaired example: a prompt, one completion, and whether the labeller found it desirable; with the
    completion of another example that KTO's KL estimate scores under this prompt (``kl_completion``)."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    desirable: bool
    kl_completion: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        """Tokens in the example's row, prompt and completion: its width once padded."""
        return len(self.prompt) + len(self.completion)


@dataclass
class ExampleSet:
    """Unpaired examples, as unpaired variants train on them."""

    examples: list[Example]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for e in self.examples:
            digest.update(json.dumps([e.prompt, e.completion, e.desirable, e.kl_completion]).encode())
        return digest.hexdigest()[:16]


def desirable_ratio(scenario: str) -> tuple[int, int] | None:
    """(D, U) of an unpaired scenario ``unpaired-D:U``; None for a paired one."""
    match = UNPAIRED_SCENARIO.match(scenario)
    return (int(match.group(1)), int(match.group(2))) if match else None


def unroll(pairs: PairSet, ratio: tuple[int, int] = (1, 1), seed: int = 0) -> ExampleSet:
    """The pairs as unpaired examples: each chosen completion desirable, each rejected one undesirable, the more
    plentiful side thinned to ``ratio`` = (D, U) (``thin``)."""
    return thin([(p.prompt, p.chosen) for p in pairs.pairs], [(p.prompt, p.rejected) for p in pairs.pairs], ratio,
                seed, source=f"{len(pairs.pairs)} pairs")  # fmt: skip


def thin(
    desirable: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    undesirable: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    ratio: tuple[int, int] | None, seed: int = 0, source: str = "the examples",
) -> ExampleSet:  # fmt: skip
    """Desirable and undesirable (prompt, completion) rows as unpaired examples: the more plentiful side thinned at
    random (the same for every cell) to ``ratio`` = (D, U), or every row kept where ``ratio`` is None. Each example's
    KL completion is the next example's in one fixed random cycle over them all (TRL rotates completions within each
    batch of its dataset; a fixed cycle lets the reference's log-probs of the mismatched rows be cached like the
    others)."""
    rng = random.Random(seed + 11)
    n_d, n_u = len(desirable), len(undesirable)
    keep_d, keep_u = (n_d, n_u) if ratio is None else (min(n_d, round(n_u * ratio[0] / ratio[1])),
                                                        min(n_u, round(n_d * ratio[1] / ratio[0])))  # fmt: skip
    if not (keep_d and keep_u):
        at = f"unpaired-{ratio[0]}:{ratio[1]}: " if ratio else ""
        raise DataError(f"{at}{source} keep no {'desirable' if not keep_d else 'undesirable'} example"
                        + (" at that ratio; use a ratio nearer 1:1, or more pairs" if ratio else ""))  # fmt: skip
    rows = [(*desirable[i], True) for i in sorted(rng.sample(range(n_d), keep_d))]
    rows += [(*undesirable[i], False) for i in sorted(rng.sample(range(n_u), keep_u))]
    cycle = list(range(len(rows)))
    rng.shuffle(cycle)
    after = {cycle[k]: cycle[(k + 1) % len(cycle)] for k in range(len(cycle))}
    return ExampleSet([Example(prompt, completion, good, rows[after[i]][1])
                       for i, (prompt, completion, good) in enumerate(rows)])  # fmt: skip


def scenario_examples(data: TaskData, pairs: PairSet, scenario: str) -> ExampleSet:
    """What an unpaired variant trains on in ``scenario``: the data's own unpaired examples (a file of unpaired
    rows), thinned to an ``unpaired-D:U`` scenario's ratio; or else ``pairs`` (the scenario's) unrolled, 1:1 or D:U."""
    ratio = desirable_ratio(scenario)
    if data.examples is None:
        return unroll(pairs, ratio or (1, 1))
    if ratio is None:
        return data.examples
    rows = data.examples.examples
    return thin([(e.prompt, e.completion) for e in rows if e.desirable],
                [(e.prompt, e.completion) for e in rows if not e.desirable], ratio, source=str(data.info.get("file")))  # fmt: skip


@dataclass
class TaskData:
    """Everything a sweep trains and evaluates on."""

    train: PairSet
    heldout: PairSet
    eval_prompts: list[tuple[int, ...]]  # held-out prompts the policy samples from
    has_gold: bool
    info: dict[str, Any] = field(default_factory=dict)
    #: a file's own unpaired training examples (rows of prompt, completion and label; ``train`` and ``heldout`` are
    #: then empty): only unpaired variants train on them. None where examples are pairs unrolled
    examples: ExampleSet | None = None

    def fingerprint(self) -> str:
        """What the cells train and are evaluated on, hashed: part of each cell's identity."""
        own = self.examples.fingerprint() if self.examples is not None else ""
        return self.train.fingerprint() + self.heldout.fingerprint() + own


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True).input_ids
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def encode_completion(tokenizer: Any, text: str) -> list[int]:
    return [*tokenizer(" " + text.strip(), add_special_tokens=False).input_ids, tokenizer.eos_token_id]


def decode_completion(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode([i for i in ids if i != tokenizer.eos_token_id], skip_special_tokens=True).strip()


@torch.no_grad()
def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    samples: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 512,
    device: str = "cpu",
) -> list[list[tuple[int, ...]]]:
    """``samples`` completions per prompt (token ids, ending with EOS when the model stopped)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    generator = torch.Generator(device=device).manual_seed(seed)
    flat = [p for p in prompts for _ in range(samples)]
    out: list[tuple[int, ...]] = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):  # left padding: every prompt ends at the same column
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        generated = []
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        past = None
        step_ids, step_pos = ids, position
        cache_arg = _cache_argument(model)
        for _ in range(max_new_tokens):
            result = model(
                input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, logits_to_keep=1,
                **{cache_arg: past},
            )  # fmt: skip
            past = getattr(result, cache_arg)
            logits = result.logits[:, -1, :].float() / temperature
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            generated.append(token)
            done |= token == eos
            if done.all():
                break
            step_ids = token[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        tokens = torch.stack(generated, dim=1).tolist()
        for row in tokens:
            completion = []
            for t in row:
                completion.append(t)
                if t == eos:
                    break
            out.append(tuple(t for t in completion if t != pad))
    return [out[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def _cache_argument(model: Any) -> str:
    """transformers ≥ 5.2x calls the KV cache `cache`; earlier versions `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class DataRecipe:
    """What determines the synthetic pairs; with the model fingerprint it keys the cache."""

    train_prompts: int = 2048
    heldout_prompts: int = 256
    eval_prompts: int = 256
    max_new_tokens: int = 48
    temperature: float = 1.0
    labels: str = "hard"  # or "bt": Bradley-Terry sampling with temperature bt_temperature
    bt_temperature: float = 0.1
    seed: int = 0
    #: each prompt as an instruct model is spoken to: the task's opening as the start of its answer to
    #: ``CHAT_REQUEST``, in the tokenizer's chat template (``task_prompt``)
    chat: bool = False

    def key(self, model_fingerprint: str) -> str:
        fields = asdict(self)
        if not self.chat:
            del fields["chat"]  # so that the pairs cached before the setting existed keep their keys
        blob = json.dumps({**fields, "model": model_fingerprint}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


#: what a chat model is asked for under ``DataRecipe.chat``; the task's opening starts its answer
CHAT_REQUEST = "Write a short movie review."


def task_prompt(tokenizer: Any, opening: str, chat: bool = False) -> list[int]:
    """The token ids of a task prompt: the review ``opening`` itself, or with ``chat`` the opening as the start of the
    model's answer to ``CHAT_REQUEST`` in its chat template (the model continues its own answer, as an instruct model
    is used; the task is still the DPO paper's: continue a review)."""
    if not chat:
        return encode_prompt(tokenizer, opening)
    head = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_REQUEST}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    return tokenizer(head + opening, add_special_tokens=False).input_ids


def make_task_data(
    model: Any, tokenizer: Any, recipe: DataRecipe, device: str = "cpu",
    labeller: Callable[[list[str], list[str]], list[float]] | None = None,
) -> TaskData:  # fmt: skip
    """Two samples from the model per prompt, labelled by the gold reward (the task's lexicon, or ``labeller``: a
    judge scoring (prompts, completions), ``dpobench.judges``); ties dropped. Pairs labelled by a judge carry its
    scores as their gold values; ``has_gold`` says the task's own gold reward made them."""
    rng = random.Random(recipe.seed)
    total = recipe.train_prompts + recipe.heldout_prompts + recipe.eval_prompts
    texts = [sample_review(rng).prompt for _ in range(total)]
    prompts = [task_prompt(tokenizer, text, recipe.chat) for text in texts]
    n_train, n_held = recipe.train_prompts, recipe.heldout_prompts
    samples = sample_completions(
        model, tokenizer, prompts[: n_train + n_held], samples=2, max_new_tokens=recipe.max_new_tokens,
        temperature=recipe.temperature, seed=recipe.seed, device=device,
    )  # fmt: skip
    decoded = [[decode_completion(tokenizer, s) for s in pair] for pair in samples]
    if labeller is None:
        scores = [[gold_reward(text) for text in pair] for pair in decoded]
    else:  # one call for every sample: a reward model scores them in batches
        flat = labeller([t for t, pair in zip(texts, decoded, strict=False) for _ in pair],
                        [text for pair in decoded for text in pair])  # fmt: skip
        scores = [flat[2 * i : 2 * i + 2] for i in range(len(decoded))]
    label_rng = random.Random(recipe.seed + 1)
    train, heldout, ties = [], [], 0
    for index, (prompt, (a, b)) in enumerate(zip(prompts, samples, strict=False)):
        ra, rb = scores[index]
        if abs(ra - rb) < 1e-9:
            ties += 1
            continue
        if recipe.labels == "bt":
            a_wins = label_rng.random() < 1 / (1 + math.exp(-(ra - rb) / recipe.bt_temperature))
        else:
            a_wins = ra > rb
        chosen, rejected, rc, rr = (a, b, ra, rb) if a_wins else (b, a, rb, ra)
        # The labeller's confidence in its label, σ(|Δ gold| / τ) ∈ (0.5, 1): the per-pair weight that
        # variants declaring "weights" (the seed's confidence weighting) receive.
        confidence = 1 / (1 + math.exp(-abs(rc - rr) / recipe.bt_temperature))
        (train if index < n_train else heldout).append(
            Pair(tuple(prompt), chosen, rejected, confidence, rc, rr, margin=abs(rc - rr))
        )
    return TaskData(
        train=PairSet(train),
        heldout=PairSet(heldout),
        eval_prompts=[tuple(p) for p in prompts[n_train + n_held :]],
        has_gold=labeller is None,
        info={"ties_dropped": ties, "recipe": asdict(recipe),
              **({"labeller": getattr(labeller, "describe", str(labeller))} if labeller is not None else {})},
    )  # fmt: skip


#: part of the pairs cache's key: bump it when sampling or the stored format changes, so older entries are not read
PAIRS_CACHE_VERSION = 1


def cached_task_data(
    model: Any, tokenizer: Any, recipe: DataRecipe, *, model_fingerprint: str, cache_dir: Path, device: str,
    progress: Callable[[str], None] = lambda message: None, labeller: Any = None,
) -> TaskData:  # fmt: skip
    """``make_task_data``, sampled once per (model, tokenizer, recipe, device kind, torch version) and kept as JSON
    in ``cache_dir/pairs``: the pairs a sweep trains on are a function of those alone, and sampling them is the
    slowest part of a sweep's start. An entry that cannot be read is sampled anew."""
    identity = "|".join([model_fingerprint, type(tokenizer).__name__, str(len(tokenizer)), torch.device(device).type,
                         torch.__version__, TASK_VERSION, str(PAIRS_CACHE_VERSION),
                         *([labeller.key] if labeller is not None else [])])  # fmt: skip
    path = cache_dir / "pairs" / f"{recipe.key(identity)}.json"
    if path.is_file():
        try:
            return _task_data_from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    progress("sampling preference pairs from the reference model (cached for later runs)")
    data = make_task_data(model, tokenizer, recipe, device=device, labeller=labeller)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_task_data_to_json(data)))
    return data


def _task_data_to_json(data: TaskData) -> dict[str, Any]:
    def pairs(pair_set: PairSet) -> dict[str, Any]:
        return {"pairs": [asdict(p) for p in pair_set.pairs], "truncated": pair_set.truncated}

    return {"train": pairs(data.train), "heldout": pairs(data.heldout), "eval_prompts": data.eval_prompts,
            "has_gold": data.has_gold, "info": data.info}  # fmt: skip


def _task_data_from_json(stored: dict[str, Any]) -> TaskData:
    def pairs(stored_set: dict[str, Any]) -> PairSet:
        rows = [Pair(**{"margin": abs(row["chosen_gold"] - row["rejected_gold"]),  # entries written before margins
                        **row, **{k: tuple(row[k]) for k in ("prompt", "chosen", "rejected")}})
                for row in stored_set["pairs"]]  # fmt: skip
        return PairSet(rows, stored_set["truncated"])

    return TaskData(train=pairs(stored["train"]), heldout=pairs(stored["heldout"]),
                    eval_prompts=[tuple(p) for p in stored["eval_prompts"]], has_gold=stored["has_gold"],
                    info=stored["info"])  # fmt: skip


def apply_scenario(
    pairs: PairSet, scenario: str, *, noise: float = 0.2, length_bonus: float = 0.03, seed: int = 0
) -> PairSet:
    """The training pairs as a scenario's labeller would have labelled them."""
    if scenario == "clean" or desirable_ratio(scenario):  # unpaired scenarios thin the clean pairs, once unrolled
        return pairs
    if scenario == "noisy":
        # Exactly round(ε·n) labels flipped, chosen at random but the same for every cell.
        flip = set(random.Random(seed + 7).sample(range(len(pairs.pairs)), round(noise * len(pairs.pairs))))
        return PairSet([_swap(p) if i in flip else p for i, p in enumerate(pairs.pairs)], pairs.truncated)
    if scenario == "length-biased":
        # The labeller adds `length_bonus` per completion token to the gold reward before comparing.
        relabelled = []
        for p in pairs.pairs:
            biased_c = p.chosen_gold + length_bonus * len(p.chosen)
            biased_r = p.rejected_gold + length_bonus * len(p.rejected)
            relabelled.append(_swap(p) if biased_r > biased_c else p)
        return PairSet(relabelled, pairs.truncated)
    raise DataError(
        f"unknown scenario {scenario!r}; use one of {', '.join(SCENARIOS)}, or unpaired-D:U (unpaired-1:10)"
    )


def _swap(p: Pair) -> Pair:
    return replace(p, chosen=p.rejected, rejected=p.chosen, chosen_gold=p.rejected_gold, rejected_gold=p.chosen_gold)


# --- user data ---


def load_pairs_file(
    path: str | Path, tokenizer: Any, max_length: int, heldout_fraction: float = 0.1, seed: int = 0,
    split: str = "train",
) -> TaskData:  # fmt: skip
    """Pairs from a JSONL / CSV / Parquet file or a Hugging Face ``datasets`` folder (``save_to_disk``; ``split`` of a
    DatasetDict), in TRL's conventions: ``prompt``, ``chosen``, ``rejected`` as text (and optional ``weight``); an
    implicit prompt (``chosen`` and ``rejected`` only: their shared start is the prompt); or conversational rows
    (lists of ``{"role", "content"}`` messages) rendered by the tokenizer's chat template. A file of unpaired rows
    (TRL's unpaired preference format: ``prompt``, ``completion``, ``label``) gives unpaired examples instead
    (``_load_unpaired``).

    A pair longer than ``max_length`` tokens keeps its prompt and the start of each completion
    (truncated from the end, EOS kept); such pairs are counted in ``truncated``.
    """
    path = Path(path)
    read = _read_rows(path, split)
    if read and _is_unpaired(read[0][1]):
        return _load_unpaired(path, read, tokenizer, max_length, heldout_fraction, seed)
    rows = [(where, _text_pair(path, where, row, tokenizer)) for where, row in read]
    pairs, truncated, margin_problem = [], 0, ""
    for where, row in rows:
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise DataError(f"{path}:{where}: missing key {key!r}; each row needs prompt, chosen and rejected")
            if not isinstance(row[key], str) or not row[key].strip():
                raise DataError(f"{path}:{where}: {key!r} must be a non-empty string")
        if row["chosen"].strip() == row["rejected"].strip():
            raise DataError(f"{path}:{where}: chosen and rejected are identical; drop the row or fix it")
        weight = row.get("weight", 1.0)
        try:
            weight = float(1.0 if weight in (None, "") else weight)
        except (TypeError, ValueError):
            raise DataError(f"{path}:{where}: weight {weight!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:  # a negative weight turns the pair's loss upside down
            raise DataError(f"{path}:{where}: weight {weight!r} must be a finite number ≥ 0")
        margin, problem = _row_margin(path, where, row)
        margin_problem = margin_problem or problem
        prompt, (chosen, rejected), cut = _encode(path, where, row, ("chosen", "rejected"), tokenizer, max_length)
        truncated += cut
        pairs.append(Pair(prompt, chosen, rejected, weight, margin=margin))
    if len(pairs) < 2:
        raise DataError(f"{path}: needs at least 2 pairs, found {len(pairs)}")
    _refuse_unknown_tokens(path, tokenizer, pairs)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(heldout_fraction * len(pairs)))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return TaskData(
        train=PairSet([pairs[i] for i in train], truncated),
        heldout=PairSet([pairs[i] for i in held]),
        eval_prompts=[pairs[i].prompt for i in held],
        has_gold=False,
        info={
            "file": str(path),
            "pairs": len(pairs),
            "truncated": truncated,
            **({"margin_problem": margin_problem} if margin_problem else {}),
        },
    )


def _encode(
    path: Path, where: str, row: dict[str, Any], keys: tuple[str, ...], tokenizer: Any, max_length: int
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], bool]:  # fmt: skip
    """A text row's prompt and its completions ``keys`` as token ids (as rendered, where the chat template wrote every
    special token), fitted to ``max_length``: the prompt kept, each completion cut from its end with EOS kept; and
    whether any was cut."""
    if row.get(_TEMPLATED):
        prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        completions = [_templated_completion(tokenizer, row[key]) for key in keys]
    else:
        prompt, completions = (
            encode_prompt(tokenizer, row["prompt"]),
            [encode_completion(tokenizer, row[k]) for k in keys],
        )
    room = max_length - len(prompt)
    if room < 2:
        raise DataError(f"{path}:{where}: the prompt alone has {len(prompt)} tokens, more than max length {max_length}")
    cut = any(len(c) > room for c in completions)
    if cut:
        completions = [c[: room - 1] + c[-1:] if len(c) > room else c for c in completions]
    return tuple(prompt), tuple(tuple(c) for c in completions), cut


def _is_unpaired(row: dict[str, Any]) -> bool:
    """A row in TRL's unpaired preference format: a completion and its label, no chosen and rejected."""
    return "completion" in row and "label" in row and "chosen" not in row and "rejected" not in row


def _label(path: Path, where: str, value: Any) -> bool:
    """A row's ``label`` as desirable (True) or not: a boolean, or its spelling in a CSV (true/false, 1/0)."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"{path}:{where}: label {value!r} is not a boolean; write true (desirable) or false")


def _load_unpaired(
    path: Path, read: list[tuple[str, dict[str, Any]]], tokenizer: Any, max_length: int, heldout_fraction: float,
    seed: int,
) -> TaskData:  # fmt: skip
    """Unpaired examples from rows of ``prompt``, ``completion`` (text, or lists of messages rendered by the chat
    template as pairs are) and ``label`` (desirable or not). A tenth of the rows is held out: their prompts are the
    evaluation prompts (there are no held-out pairs, so no held-out implicit-reward accuracy). The training rows
    are kept whole (their own desirable:undesirable ratio; ``unpaired-D:U`` scenarios thin them) and need both
    labels."""
    examples, truncated = [], 0
    for where, row in read:
        if not _is_unpaired(row):
            raise DataError(f"{path}:{where}: expected prompt, completion and label, as the file's first row has; "
                            "a file holds either unpaired rows or pairs (prompt, chosen, rejected)")  # fmt: skip
        desirable = _label(path, where, row["label"])
        if row.get("prompt") is None:
            raise DataError(f"{path}:{where}: missing key 'prompt'; an unpaired row needs prompt, completion, label")
        text = _text_pair(path, where, {**row, "chosen": row["completion"], "rejected": row["completion"]}, tokenizer)
        for key in ("prompt", "chosen"):
            if not isinstance(text[key], str) or not text[key].strip():
                raise DataError(f"{path}:{where}: {'prompt' if key == 'prompt' else 'completion'!r} must be a "
                                "non-empty string")  # fmt: skip
        prompt, (completion,), cut = _encode(path, where, text, ("chosen",), tokenizer, max_length)
        truncated += cut
        examples.append((prompt, completion, desirable))
    if len(examples) < 3:
        raise DataError(f"{path}: needs at least 3 unpaired rows (2 to train on, 1 held out), found {len(examples)}")
    _refuse_unknown_tokens(path, tokenizer, [Pair(p, c, c) for p, c, _ in examples])
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(heldout_fraction * len(examples)))
    train = [examples[i] for i in sorted(order[n_held:])]
    desirable = [(p, c) for p, c, good in train if good]
    undesirable = [(p, c) for p, c, good in train if not good]
    if not (desirable and undesirable):
        raise DataError(f"{path}: its training rows need both labels; {len(desirable)} are desirable (label true) and "
                        f"{len(undesirable)} undesirable (false)")  # fmt: skip
    held_prompts = dict.fromkeys(examples[i][0] for i in sorted(order[:n_held]))  # each prompt once, in file order
    return TaskData(
        train=PairSet([], truncated),
        heldout=PairSet([]),
        eval_prompts=list(held_prompts),
        has_gold=False,
        info={"file": str(path), "examples": len(examples), "desirable": len(desirable),
              "undesirable": len(undesirable), "truncated": truncated},
        examples=thin(desirable, undesirable, None, seed, source=str(path)),
    )  # fmt: skip


def _row_margin(path: Path, where: str, row: dict[str, Any]) -> tuple[float, str]:
    """A row's score margin: its ``margin``, or ``score_chosen`` − ``score_rejected`` (UltraFeedback's columns), or
    NaN without either; and what is wrong with it, if anything (it is then NaN too). A margin is a finite number ≥ 0
    (the chosen completion scored at least as high). Only the variants that read margins refuse a bad one: the file
    stays good for the others."""
    if row.get("margin") not in (None, ""):
        value, what = row["margin"], "margin"
    elif row.get("score_chosen") not in (None, "") and row.get("score_rejected") not in (None, ""):
        what = "score_chosen − score_rejected"
        try:
            value = float(row["score_chosen"]) - float(row["score_rejected"])
        except (TypeError, ValueError):
            return math.nan, (f"{path}:{where}: score_chosen {row['score_chosen']!r} or score_rejected "
                              f"{row['score_rejected']!r} is not a number")  # fmt: skip
    else:
        return math.nan, ""
    try:
        margin = float(value)
    except (TypeError, ValueError):
        return math.nan, f"{path}:{where}: margin {value!r} is not a number"
    if not math.isfinite(margin) or margin < 0:
        return math.nan, (f"{path}:{where}: {what} is {margin!r}; a margin is a finite number ≥ 0 (the chosen "
                          "completion scored at least as high as the rejected one)")  # fmt: skip
    return margin, ""


#: the most of a data file's tokens that may be the tokenizer's unknown token: beyond it the model would train on
#: ``<unk>``s (the default model's word-level tokenizer knows only the synthetic task's 75 words)
MAX_UNKNOWN_SHARE = 0.05


def _refuse_unknown_tokens(path: Path, tokenizer: Any, pairs: list[Pair]) -> None:
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:  # byte-level tokenizers (GPT-2, Llama 3, …) have no unknown token
        return
    tokens = [t for p in pairs for part in (p.prompt, p.chosen, p.rejected) for t in part]
    share = sum(t == unknown for t in tokens) / max(1, len(tokens))
    if share > MAX_UNKNOWN_SHARE:
        raise DataError(
            f"{path}: {share:.0%} of its tokens are unknown to the model's tokenizer ({len(tokenizer)} entries); "
            "pass --model with a model whose tokenizer covers this text (the default model knows only the "
            "synthetic task's words)"
        )


#: what ``--data`` takes for a Hugging Face Hub dataset's name (``org/name``) where no such file or folder exists
HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_dataset(path: Path) -> bool:
    """``--data`` names a Hub dataset: no file or folder of that name, ``org/name`` in form, and no file suffix."""
    return (not path.exists() and HUB_DATASET.match(str(path)) is not None
            and path.suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"))  # fmt: skip


def require_pairs_file(path: Path, split: str = "train") -> None:
    """A file or folder that exists, or a Hub dataset that ``datasets`` can load (its local cache, offline); checked
    before the slow work of a sweep."""
    if is_hub_dataset(path):
        _hub_rows(str(path), split)
        return
    if not (path.is_file() or path.is_dir()):
        raise DataError(f"{path}: no such file or folder; --data takes a JSONL, CSV or Parquet file of pairs, a "
                        "folder written by a Hugging Face dataset's save_to_disk, or a Hub dataset's name")  # fmt: skip


#: the key a row carries once the chat template has rendered it
_TEMPLATED = "_chat_template"


def _text_pair(source: Path, where: str, row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """A row in TRL's conventions as prompt, chosen and rejected text: an implicit prompt is the shared start of
    chosen and rejected (TRL's ``extract_prompt``); conversational rows (lists of messages) are rendered by the
    tokenizer's chat template, the completion being what the full conversation adds to the prompt's rendering
    (TRL's ``maybe_apply_chat_template``). Rows already in text form come back as they are."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
            cut = _shared_start(chosen, rejected)
            return {**row, "prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
        return row
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}:{where}: conversational rows (lists of messages) need a chat template, and this "
                        "model's tokenizer has none; give a chat model with --model, or rows of text")  # fmt: skip
    if prompt is None:  # implicit: the messages chosen and rejected share
        shared = _first_difference(chosen, rejected)
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    try:
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        texts = [tokenizer.apply_chat_template([*prompt, *side], tokenize=False) for side in (chosen, rejected)]
    except Exception as error:  # messages without role/content, a template that refuses them
        raise DataError(f"{source}:{where}: the chat template cannot render this row ({one_line(error)}); each message "
                        "needs a role and a content") from None  # fmt: skip
    if not all(text.startswith(head) for text in texts):
        raise DataError(f"{source}:{where}: the chat template renders the prompt differently inside the conversation; "
                        "give prompt, chosen and rejected as text")  # fmt: skip
    return {**row, "prompt": head, "chosen": texts[0][len(head) :], "rejected": texts[1][len(head) :], _TEMPLATED: True}


def _first_difference(chosen: Sequence[Any], rejected: Sequence[Any]) -> int:
    """The first index where two sequences (texts, lists of messages) differ; the shorter's length if none does."""
    return next(
        (i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), min(len(chosen), len(rejected))
    )


def _shared_start(chosen: str, rejected: str) -> int:
    """Where chosen and rejected first differ, moved back before a space (TRL's ``extract_prompt``)."""
    cut = _first_difference(chosen, rejected)
    return cut - 1 if cut > 0 and chosen[cut - 1] == " " else cut


def _templated_completion(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids if ids and ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, less a byte-order mark (Excel's "CSV UTF-8" writes one); other encodings are refused
    with the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}:line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from None


def _read_rows(path: Path, split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    if is_hub_dataset(path):
        return _hub_rows(str(path), split)
    require_pairs_file(path)
    if path.is_dir():
        return _dataset_rows(path, split)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:line {number}: not valid JSON ({error.msg}); one JSON object per line"
                ) from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:line {number}: expected a JSON object with prompt, chosen, rejected")
            rows.append((f"line {number}", value))
        return rows
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
        return [(f"row {i}", dict(r)) for i, r in enumerate(reader, start=2)]
    if suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except ImportError:
            raise DataError(
                f"{path}: reading Parquet needs pyarrow; `pip install pyarrow`, or give JSONL or CSV"
            ) from None
        except Exception as error:  # pyarrow's own errors for a corrupt file
            raise DataError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
        return [(f"row {i}", r) for i, r in enumerate(frame.to_dict("records"), start=1)]
    raise DataError(f"{path}: unknown format {suffix!r}; use .jsonl, .csv or .parquet")


def _hub_rows(name: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of ``split`` of the Hub dataset ``name``, through ``datasets.load_dataset``: from its local cache
    where the Hub cannot be reached (or ``HF_HUB_OFFLINE=1``), else downloaded and cached by ``datasets``."""
    datasets = _datasets(name)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # its notices ("using the latest cached version …") are not the sweep's
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # ConnectionError offline, DatasetNotFoundError, a split it lacks (ValueError), …
        raise DataError(f"{name}: no such file or folder, and no Hugging Face dataset of that name that datasets can "
                        f"load ({one_line(error)}); download it where the Hub can be reached, or give a file or a "
                        "save_to_disk folder") from None  # fmt: skip
    finally:
        datasets.logging.set_verbosity(verbosity)
    return [(f"row {i}", dict(row)) for i, row in enumerate(loaded, start=1)]


def _datasets(source: object) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: a Hugging Face dataset needs the datasets package; pip install 'dpobench[real]'") \
            from None  # fmt: skip
    return datasets


def _dataset_rows(folder: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a Hugging Face dataset saved with ``save_to_disk``: a Dataset, or ``split`` of a DatasetDict."""
    datasets = _datasets(folder)
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"{folder}: not a folder written by save_to_disk ({one_line(error)}); give a dataset folder "
                        "or a JSONL, CSV or Parquet file") from None  # fmt: skip
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{folder}: no split {split!r}; it has {', '.join(loaded)} (choose one with --split)")
        loaded = loaded[split]
    return [(f"row {i}", dict(row)) for i, row in enumerate(loaded, start=1)]
