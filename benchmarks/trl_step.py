"""TRL's ``DPOTrainer`` training steps timed on a given model and pre-tokenized pairs, to put next to the project's
own steps. Written against TRL 1.16; importable without TRL (then ``trl_available()`` is False).

TRL trains the very model object it is given, with its defaults for DPO: sigmoid loss, β = 0.1, a frozen copy of the
initial policy as the reference and its forward on every step (``precompute_ref_log_probs=False``), TRL's fused LM
head (log-probs computed in tiles, the (B, T, V) logits never built), AdamW as ``Trainer`` picks it
(``adamw_torch_fused``, no weight decay), max grad norm 1.0, linear learning-rate decay. Here: no gradient
checkpointing, bf16 autocast on CUDA, float32 on CPU, no evaluation, logging, saving or telemetry. The pairs go in
already tokenized (``prompt_ids``, ``chosen_ids``, ``rejected_ids``): no EOS is added and nothing is re-tokenized, so
every row is exactly prompt + completion tokens (right-padded to the longest row of its batch by TRL's collator).

What one timed step covers (``on_step_begin`` to ``on_step_end`` of a ``TrainerCallback``, CUDA synchronised at both
ends): ``Trainer.training_step`` (the policy and reference forwards, the loss and TRL's per-step metrics with their
``.item()`` syncs, the backward), gradient clipping, the optimizer and scheduler steps and ``zero_grad``. Fetching and
collating the batch and copying it to the device happen before ``on_step_begin`` and are not timed.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
import threading
from typing import Any


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def _tokenizer(vocab: int, pad_id: int, eos_id: int) -> Any:
    """A word-level tokenizer over ``vocab`` ids with the pad and EOS tokens at ``pad_id`` and ``eos_id``: TRL asks
    for a processing class, and reads only its pad token when the data come tokenized."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    names = [f"<{i}>" for i in range(vocab)]
    names[eos_id] = "<eos>"
    names[pad_id] = "<eos>" if pad_id == eos_id else "<pad>"
    wordlevel = Tokenizer(WordLevel({name: i for i, name in enumerate(names)}, unk_token="<eos>"))
    return PreTrainedTokenizerFast(tokenizer_object=wordlevel, pad_token=names[pad_id], eos_token="<eos>",
                                   unk_token="<eos>")  # fmt: skip


def _trainer(model, pairs, pad_id: int, eos_id: int, batch: int, max_steps: int, device: str, lr: float, out: str,
             callback: Any) -> Any:  # fmt: skip
    """A ``DPOTrainer`` (as described above) on ``model`` and ``pairs``, writing nothing outside ``out``."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # type: ignore[override]
            return dataset  # TRL 1.16 always tokenizes text; these rows are token ids already

        def _send_telemetry(self) -> None:
            pass  # TRL pings the Hub from a thread when a trainer is made; a benchmark sends nothing

    cuda = device.startswith("cuda")
    rows = Dataset.from_dict({
        "prompt_ids": [list(p.prompt) for p in pairs],
        "chosen_ids": [list(p.chosen) for p in pairs],
        "rejected_ids": [list(p.rejected) for p in pairs],
    })  # fmt: skip
    config = DPOConfig(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=max_steps,
        learning_rate=lr, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False,
        max_length=max(p.length for p in pairs),
        gradient_checkpointing=False, bf16=cuda, fp16=False, use_cpu=not cuda, dataloader_num_workers=0,
        dataloader_drop_last=True, eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True,
    )  # fmt: skip
    trainer = PreTokenized(
        model=model, ref_model=copy.deepcopy(model).eval(), args=config, train_dataset=rows,
        processing_class=_tokenizer(model.config.vocab_size, pad_id, eos_id), callbacks=[callback],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # with tqdm off, Trainer prints its end-of-training summary
    return trainer


def _unpatch(model, own_forward: Any) -> None:
    """Undo TRL's fused-LM-head patch of ``model.forward`` (an instance attribute)."""
    if own_forward is None:
        model.__dict__.pop("forward", None)
    else:
        model.forward = own_forward


class TrlStep:
    """One TRL optimizer step per call, for callers that time steps themselves.

    ``Trainer.train`` runs in a background thread that a callback holds at each ``on_step_begin`` until the next
    call; a call returns at ``on_step_end`` (after a CUDA sync), so it covers one step as described above plus two
    thread hand-offs. ``close()`` stops the thread and removes the temporary output folder."""

    class _Stop(Exception):
        pass

    def __init__(self, model, pairs, pad_id: int, batch: int, device: str, steps: int = 10_000, lr: float = 1e-6,
                 eos_id: int | None = None) -> None:  # fmt: skip
        import torch
        from transformers import TrainerCallback

        cuda, outer = device.startswith("cuda"), self
        self.go, self.done, self.stopping, self.error = threading.Semaphore(0), threading.Semaphore(0), False, None

        class Gate(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs) -> None:
                outer.go.acquire()
                if outer.stopping:
                    raise TrlStep._Stop

            def on_step_end(self, args, state, control, **kwargs) -> None:
                if cuda:
                    torch.cuda.synchronize()
                outer.done.release()

        self.model, self.own_forward = model, model.__dict__.get("forward")
        self.out = tempfile.TemporaryDirectory(prefix="trl_step_")
        eos = pad_id if eos_id is None else eos_id
        self.trainer = _trainer(model, pairs, pad_id, eos, batch, steps, device, lr, self.out.name, Gate())
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        try:
            self.trainer.train()
        except TrlStep._Stop:
            pass
        except BaseException as error:  # handed to the caller's thread
            self.error = error
        finally:
            self.done.release()  # never leave a call waiting

    def __call__(self) -> None:
        if self.error is not None or not self.thread.is_alive():
            raise RuntimeError("TRL's training thread has stopped") from self.error
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise RuntimeError("TRL's training step failed") from self.error

    def close(self) -> None:
        self.stopping = True
        self.go.release()
        self.thread.join()
        _unpatch(self.model, self.own_forward)
        self.trainer = None  # frees the reference copy and the optimizer state now, not at the next gc
        self.out.cleanup()
