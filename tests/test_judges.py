"""Judges (`--judge`): VADER and a reward model score a run's samples as its gold reward where the pairs come from
--data. Real vaderSentiment; a real (tiny, untrained) transformers sequence classifier built here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dpobench.judges import JudgeError, load_judge
from dpobench.task import build_tokenizer

VADER = importlib.util.find_spec("vaderSentiment") is not None
ROWS = [{"prompt": f"the {s} was", "chosen": g, "rejected": b}
        for s in ("movie", "plot", "acting", "story", "music", "cast") for g, b in (("great", "awful"), ("good", "dull"))]  # fmt: skip


def reward_model(folder: Path, labels: int = 1) -> Path:
    """A tiny Llama sequence classifier on the task's tokenizer, untrained: real weights, arbitrary scores."""
    from transformers import LlamaForSequenceClassification

    from dpobench.models import build_config

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = build_config("tiny", len(tokenizer), tokenizer)
    config.num_labels = labels
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_reward_model_scores_prompt_and_completion_batched_as_alone(tmp_path: Path) -> None:
    """Its score is the classifier's one output for "prompt completion"; batched and padded, each equals the score of
    the text alone (the pad id is set, so the last real token is read)."""
    from transformers import AutoModelForSequenceClassification

    folder = reward_model(tmp_path / "rm")
    judge = load_judge(str(folder))
    prompts, texts = ["the movie was", "the plot was"], ["great", "really very dull and boring"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = build_tokenizer()
    with torch.no_grad():
        alone = [
            model(**tokenizer(f"{p} {t}", return_tensors="pt")).logits[0, 0].item()
            for p, t in zip(prompts, texts, strict=True)
        ]
    assert judge(prompts, texts) == pytest.approx(alone, abs=1e-5)
    assert judge.describe.startswith(f"reward model {folder} (LlamaForSequenceClassification, weights ")


def test_what_is_not_a_reward_model_is_refused_in_one_line(tmp_path: Path, untrained_model: Path) -> None:
    with pytest.raises(JudgeError, match=r"a classifier with 2 outputs; a reward model has one"):
        load_judge(str(reward_model(tmp_path / "two", labels=2)))
    with pytest.raises(JudgeError, match=r"a LlamaForCausalLM is not a sequence classifier"):
        load_judge(str(untrained_model))
    with pytest.raises(JudgeError, match=r"^--judge 'vadr': neither vader nor a folder"):
        load_judge("vadr")


@pytest.mark.skipif(not VADER, reason="vaderSentiment not installed (the real extra)")
def test_without_data_a_judge_labels_the_models_own_samples(tmp_path: Path, untrained_model: Path) -> None:
    """--judge vader with no --data: the task's prompts, two samples of the model for each, the one VADER scores
    higher chosen (the DPO paper's controlled-sentiment set-up); each pair carries VADER's scores of its two
    completions, decoded and scored again here; the cells' gold reward is VADER's too, and there is no grammar rate."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from dpobench.config import SweepConfig
    from dpobench.data import DataRecipe, decode_completion
    from dpobench.models import load_model
    from dpobench.sweep import plan_sweep, prepare
    from dpobench.train import TrainConfig

    recipe = DataRecipe(train_prompts=40, heldout_prompts=8, eval_prompts=8, max_new_tokens=12)
    config = SweepConfig(model=str(untrained_model), judge="vader", variants=("dpo",), data_recipe=recipe,
                         train=TrainConfig(steps=2, batch_size=4), step_cost_rounds=0)  # fmt: skip
    prepared = prepare(plan_sweep(config), progress=lambda m: None)
    _, tokenizer = load_model(untrained_model)
    analyser = SentimentIntensityAnalyzer()
    vader = lambda ids: analyser.polarity_scores(decode_completion(tokenizer, ids))["compound"]  # noqa: E731
    pairs = prepared.data.train.pairs
    assert len(pairs) >= 10 and not prepared.data.has_gold
    assert prepared.data.info["labeller"].startswith("VADER compound sentiment")
    for pair in pairs:
        assert pair.chosen_gold == pytest.approx(vader(pair.chosen)) and pair.rejected_gold == pytest.approx(
            vader(pair.rejected)
        )
        assert pair.chosen_gold > pair.rejected_gold
    from dpobench.sweep import run_sweep

    summary = run_sweep(config, tmp_path / "out", progress=lambda m: None)
    assert summary.gold_reward.notna().all() and summary.grammatical_fraction.isna().all()


@pytest.mark.skipif(not VADER, reason="vaderSentiment not installed (the real extra)")
def test_vader_scores_each_sample_and_the_report_says_so(tmp_path: Path, untrained_model: Path) -> None:
    """A --data run judged by VADER: every cell's per-prompt gold values are VADER's compound scores of the samples
    the evaluator draws (drawn again here with its seed and scored independently); the cells are other cells than the
    unjudged run's, and the report names the judge."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from dpobench.config import load_config
    from dpobench.data import decode_completion, sample_completions
    from dpobench.models import load_model
    from dpobench.store import Store
    from dpobench.sweep import run_sweep
    from dpobench.tables import read_samples, read_tidy

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    given = {"model": str(untrained_model), "data": str(data), "variants": "dpo", "steps": 2, "batch_size": 4,
             "step_cost_rounds": 0}  # fmt: skip
    run_sweep(load_config({**given, "judge": "vader"}), tmp_path / "out", progress=lambda m: None)
    store = Store(tmp_path / "out" / "results.sqlite", readonly=True)
    cells = store.cells()
    reference = cells[cells.role == "reference"].cell_id.item()
    samples = read_samples(tmp_path / "out")
    got = samples[samples.cell_id == reference].sort_values("prompt").gold_reward.tolist()
    # the reference model's samples, drawn as the evaluator draws them (seed 0 + 1000), scored by VADER here
    model, tokenizer = load_model(untrained_model)
    from dpobench.data import load_pairs_file

    task = load_pairs_file(data, tokenizer, max_length=min(model.config.max_position_embeddings, 1024))
    drawn = sample_completions(model, tokenizer, task.eval_prompts, samples=1, max_new_tokens=48, seed=1000)
    analyser = SentimentIntensityAnalyzer()
    texts = [decode_completion(tokenizer, s[0]) for s in drawn]
    assert got == pytest.approx([analyser.polarity_scores(t)["compound"] for t in texts])
    # the health of real text, from the same samples, counted here without dpobench.degeneration: a sample loops
    # when a quarter of its word 3-grams repeat; distinct-2 is the unique word bigrams of all samples over all
    words = [t.lower().split() for t in texts]
    trigrams = [[tuple(w[i : i + 3]) for i in range(len(w) - 2)] for w in words]
    loops = [bool(g) and 1 - len(set(g)) / len(g) >= 0.25 for g in trigrams]
    bigrams = [tuple(w[i : i + 2]) for w in words for i in range(len(w) - 1)]
    measured = read_tidy(tmp_path / "out").query("cell_id == @reference").set_index("metric").value
    assert measured["repetitive_fraction"] == pytest.approx(sum(loops) / len(loops))
    assert measured["distinct_2"] == pytest.approx(len(set(bigrams)) / len(bigrams))
    run_sweep(load_config(given), tmp_path / "out", progress=lambda m: None)  # unjudged: other cells, no gold
    assert len(Store(tmp_path / "out" / "results.sqlite", readonly=True).cells()) == 4
    from dpobench.report import build_report

    header = dict(build_report(tmp_path / "out").header)
    assert header["gold reward by"].startswith("VADER compound sentiment of each completion (vaderSentiment 3.")
