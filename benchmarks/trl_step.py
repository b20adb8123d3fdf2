"""TRL's ``DPOTrainer`` training steps timed on a given model and pre-tokenized pairs, to put next to
``step_speed.py``'s own loops. Written against TRL 1.16; importable without TRL (then ``trl_available()`` is False).

TRL trains the very model object it is given, with its defaults for DPO: sigmoid loss, β = 0.1, a frozen copy of the
initial policy as the reference and its forward on every step (``precompute_ref_log_probs=False``), TRL's fused LM
head (log-probs computed in tiles, the (B, T, V) logits never built), AdamW as ``Trainer`` picks it
(``adamw_torch_fused``), max grad norm 1.0, linear learning-rate decay. Here: no gradient checkpointing, bf16 autocast
on CUDA, float32 on CPU, no evaluation, logging or saving. The pairs go in already tokenized (``prompt_ids``,
``chosen_ids``, ``rejected_ids``): no EOS is added and nothing is re-tokenized, so every row is exactly
prompt + completion tokens, as in the plain loop.

What one step's time covers (a ``TrainerCallback``, from ``on_step_begin`` to ``on_step_end``, the device synchronised
at both ends on CUDA): ``Trainer.training_step`` (the policy and reference forwards, the loss and TRL's per-step
metrics with their ``.item()`` syncs, the backward), gradient clipping, the optimizer and scheduler steps and
``zero_grad``. Fetching and collating the batch and copying it to the device happen before ``on_step_begin`` and are
not timed (nor is ``step_speed.plain_run``'s building of its batch).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import tempfile
import time
from typing import Any


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def _tokenizer(vocab: int, pad_id: int, eos_id: int) -> Any:
    """A word-level tokenizer over ``vocab`` ids, with the pad and EOS tokens at ``pad_id`` and ``eos_id``: TRL asks
    for a processing class, and reads only its pad token from it when the data come tokenized."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    names = [f"<{i}>" for i in range(vocab)]
    names[eos_id] = "<eos>"
    names[pad_id] = "<eos>" if pad_id == eos_id else "<pad>"
    unk = "<eos>"
    wordlevel = Tokenizer(WordLevel({name: i for i, name in enumerate(names)}, unk_token=unk))
    return PreTrainedTokenizerFast(tokenizer_object=wordlevel, pad_token=names[pad_id], eos_token=unk, unk_token=unk)


def trl_run(model, pairs, pad_id: int, eos_id: int, batch: int, steps: int, device: str, lr: float = 1e-6,
            warmup: int = 2) -> tuple[list[float], float]:  # fmt: skip
    """Seconds per optimizer step for `steps` steps after `warmup` untimed ones, and peak device memory in GB (nan on CPU)."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = device.startswith("cuda")

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # type: ignore[override]
            # TRL 1.16 always tokenizes text columns; these rows are already (prompt_ids, chosen_ids, rejected_ids)
            return dataset

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start, self.seconds = 0.0, []

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.start)

    rows = Dataset.from_dict({
        "prompt_ids": [list(p.prompt) for p in pairs],
        "chosen_ids": [list(p.chosen) for p in pairs],
        "rejected_ids": [list(p.rejected) for p in pairs],
    })  # fmt: skip
    longest = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
    timer = StepTimer()
    own_forward = model.__dict__.get("forward")  # TRL patches the instance's forward with its fused LM head
    with tempfile.TemporaryDirectory(prefix="trl_step_") as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            max_steps=warmup + steps, learning_rate=lr, beta=0.1, loss_type=["sigmoid"],
            precompute_ref_log_probs=False, max_length=longest, gradient_checkpointing=False, bf16=cuda, fp16=False,
            use_cpu=not cuda, dataloader_num_workers=0, dataloader_drop_last=True, eval_strategy="no",
            save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        )  # fmt: skip
        trainer = PreTokenized(
            model=model, ref_model=copy.deepcopy(model).eval(), args=config, train_dataset=rows,
            processing_class=_tokenizer(model.config.vocab_size, pad_id, eos_id), callbacks=[timer],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # with tqdm off, Trainer prints its end-of-training summary
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan
    if own_forward is None:
        model.__dict__.pop("forward", None)
    else:
        model.forward = own_forward
    del trainer
    return timer.seconds[warmup:], memory
