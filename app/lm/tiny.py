"""A tiny randomly initialised model with a real tokenizer, built in code: fast plumbing for tests and demos.

It is a Gemma-3 architecture (sliding-window and full-attention layers, like the embedded model) with a byte-level BPE
tokenizer trained in milliseconds on the given texts, so every code path of the transformers backend runs for real.
Its output is gibberish, deterministic for a given seed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


CORPUS_FILE = Path(__file__).with_name("tiny_corpus.txt")
_CORPUS_SEP = "\n\x1e\n"


def default_corpus() -> list[str]:
    """A fixed snapshot of the product's prompt text (skills and prompts as they once were).

    The tiny model's tokenizer and weights are built from it, so they stay the same when a skill file changes, and
    tests that depend on what the random model happens to write do not move with every prompt edit.
    """
    return CORPUS_FILE.read_text(encoding="utf-8").split(_CORPUS_SEP)


def corpus_from(paths: Iterable[Path]) -> list[str]:
    """Every text file under the given folders (skills, prompts): a corpus that covers the product's vocabulary."""
    texts = []
    for root in paths:
        for f in sorted(Path(root).rglob("*")):
            if f.is_file() and f.suffix in {".yaml", ".yml", ".md", ".txt"}:
                texts.append(f.read_text(encoding="utf-8", errors="replace"))
    return texts or ["hello world"]


def build_tiny_lm(corpus: Iterable[str], seed: int = 0, sliding_window: int = 16, prefix_cache_entries: int = 128,
                  checkpoint_mb: int = 0):
    """A `TransformersLM` over a 4-layer Gemma-3 with random weights (about 100k parameters)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from .hf import TransformersLM

    tokenizer = build_tokenizer(corpus)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).to(torch.float32)
    # Random weights put EOS anywhere; a zero (tied) embedding row gives it logit 0, so generations have length.
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id].zero_()
    return TransformersLM(model, tokenizer, name="tiny", prefix_cache_entries=prefix_cache_entries,
                          checkpoint_mb=checkpoint_mb)
