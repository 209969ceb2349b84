"""Text encoder: T5Gemma 9B-9B (UL2), encoder only (CODECS.md §4, PIPELINE.md §5).

``encode(prompt)`` returns the DiT's text context: ``last_hidden_state`` (after the encoder's final
norm), cast to fp16, zero-padded / trimmed to 640 rows, cast to fp32, plus the number of rows that
carry tokens, ``min(n_tok, 640)``.

Loading (checked with the installed transformers 5.23): ``T5GemmaEncoderModel.from_pretrained(path,
is_encoder_decoder=False, dtype=torch.bfloat16)`` works. ``is_encoder_decoder`` is an attribute of
``T5GemmaConfig``, so the keyword overrides the saved (encoder-decoder) config, which
``T5GemmaEncoderModel.__init__`` requires to be False; ``dtype`` is the v5 name of ``torch_dtype``. The
``model.encoder.*`` weights of a full encoder-decoder checkpoint load into the encoder and the
``model.decoder.*`` weights are reported as unexpected and skipped. T5Gemma has no SDPA path in this
version (eager attention only).

The preview encoder is the same class at a tiny size (2 layers, hidden 128, 2 query heads, 1 KV head,
vocab 259) with seeded weights and the UTF-8 :class:`ByteTokenizer`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, T5GemmaConfig, T5GemmaEncoderModel

logger = logging.getLogger(__name__)

__all__ = ["NEGATIVE_PROMPT", "T5GEMMA_9B_ENCODER", "TEXT_TARGET_LENGTH", "ByteTokenizer", "T5GemmaTextEncoder"]

TEXT_TARGET_LENGTH = 640  # rows of the text context (PIPELINE.md §5)

# The encoder half of google/t5gemma-9b-9b-ul2 (a Gemma 2 9B stack; its public config.json).
T5GEMMA_9B_ENCODER: dict[str, int | float] = dict(
    vocab_size=256_000,
    hidden_size=3584,
    intermediate_size=14_336,
    num_hidden_layers=42,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
)

# PIPELINE.md §5: the null / negative context for CFG, 1,719 characters, no line breaks.
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards, low quality, worst quality, poor quality, noise, background noise, hiss, hum,"
    " buzz, crackle, static, compression artifacts, MP3 artifacts, digital clipping, distortion, "
    "muffled, muddy, unclear, echo, reverb, room echo, over-reverberated, hollow sound, distant, "
    "washed out, harsh, shrill, piercing, grating, tinny, thin sound, boomy, bass-heavy, flat EQ, "
    "over-compressed, abrupt cut, jarring transition, sudden silence, looping artifact, music, "
    "instrumental, sirens, alarms, crowd noise, unrelated sound effects, chaotic, disorganized, "
    "messy, cheap sound, emotionless, flat delivery, deadpan, lifeless, apathetic, robotic, "
    "mechanical, monotone, flat intonation, undynamic, boring, reading from a script, AI voice, "
    "synthetic, text-to-speech, TTS, insincere, fake emotion, exaggerated, overly dramatic, "
    "melodramatic, cheesy, cringey, hesitant, unconfident, tired, weak voice, stuttering, stammering,"
    " mumbling, slurred speech, mispronounced, bad articulation, lisp, vocal fry, creaky voice, mouth"
    " clicks, lip smacks, wet mouth sounds, heavy breathing, audible inhales, plosives, p-pops, "
    "coughing, clearing throat, sneezing, speaking too fast, rushed, speaking too slow, dragged out, "
    "unnatural pauses, awkward silence, choppy, disjointed, multiple speakers, two voices, background"
    " talking, out of tune, off-key, autotune artifacts"
)


class ByteTokenizer:
    """UTF-8 byte tokenizer for the preview encoder (vocabulary 259).

    Ids: ``0`` pad, ``1`` eos, ``2`` bos (the Gemma convention), and byte ``b`` -> ``b + 3``. A call
    returns ``[bos] + [b + 3 for b in text.encode("utf-8")]`` (a BOS and no EOS, like Gemma's
    default special tokens); no truncation.
    """

    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = 2
    offset = 3
    vocab_size = 256 + offset

    def __call__(self, text: str) -> list[int]:
        """Token ids of ``text`` (``len(text.encode('utf-8')) + 1`` ids)."""
        return [self.bos_token_id] + [b + self.offset for b in text.encode("utf-8")]


class T5GemmaTextEncoder:
    """T5Gemma encoder producing the DiT's text context (PIPELINE.md §5).

    Keeps an LRU cache of the last ``cache_size`` prompts (idle segments repeat prompts); prompts are
    never logged.
    """

    def __init__(
        self, model: T5GemmaEncoderModel, tokenizer: Callable[[str], list[int]], cache_size: int = 16
    ) -> None:
        """Wrap a loaded encoder and a tokenizer callable ``text -> list[int]`` (default special tokens).

        Raises:
            ValueError: ``cache_size`` is negative.
        """
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int | None], tuple[torch.Tensor, int]] = OrderedDict()

    @classmethod
    def preview(cls, seed: int = 0, hidden_size: int = 128) -> T5GemmaTextEncoder:
        """Tiny random-weight encoder of the same class (``torch.manual_seed(seed)``) with :class:`ByteTokenizer`.

        2 layers, ``hidden_size`` wide (multiple of 2), 2 query heads of ``hidden_size/2``, 1 KV head,
        MLP ``2 * hidden_size``, vocab 259, fp32. A 1,600-character prompt encodes in ~0.1 s on 2 CPU cores.

        Raises:
            ValueError: ``hidden_size`` not a positive even number.
        """
        if hidden_size <= 0 or hidden_size % 2:
            raise ValueError(f"hidden_size must be a positive even number, got {hidden_size}")
        tok = ByteTokenizer()
        module = dict(
            vocab_size=tok.vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=hidden_size // 2,
            query_pre_attn_scalar=hidden_size // 2,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        )
        config = T5GemmaConfig(
            encoder=dict(module), decoder=dict(module), is_encoder_decoder=False, vocab_size=tok.vocab_size
        )
        torch.manual_seed(seed)
        return cls(T5GemmaEncoderModel(config), tok)

    @classmethod
    def seeded(
        cls,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
        **overrides: int | float,
    ) -> T5GemmaTextEncoder:
        """The T5Gemma 9B encoder's shapes (:data:`T5GEMMA_9B_ENCODER`, ``overrides`` replacing any key)
        with seeded, untrained weights: built on the meta device, materialised on ``device`` in
        ``dtype`` and filled there with ``N(0, 0.02)`` draws from one ``torch.Generator(device)``
        (RMSNorm weights 0, i.e. scale 1). For the memory and time of a resident encoder where the
        checkpoint cannot be downloaded (``ops/bench --resident-text-encoder``); the features mean
        nothing. Tokenizer: :class:`ByteTokenizer` (its ids lie inside the 256,000-word vocabulary).

        About 9.2 B parameters, 18.5 GB in bf16, at the default shapes.

        Raises:
            ValueError: an override names no key of :data:`T5GEMMA_9B_ENCODER`.
        """
        unknown = sorted(set(overrides) - set(T5GEMMA_9B_ENCODER))
        if unknown:
            raise ValueError(f"unknown T5Gemma encoder keys {unknown}; known: {sorted(T5GEMMA_9B_ENCODER)}")
        tok = ByteTokenizer()
        module = {**T5GEMMA_9B_ENCODER, **overrides, "pad_token_id": tok.pad_token_id,
                  "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
        config = T5GemmaConfig(encoder=dict(module), decoder=dict(module), is_encoder_decoder=False,
                               vocab_size=module["vocab_size"])
        device = torch.device(device)
        with torch.device("meta"):
            model = T5GemmaEncoderModel(config)
        model = model.to(dtype).to_empty(device=device)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.zero_()
                    continue
                flat = param.view(-1)
                for start in range(0, flat.numel(), 1 << 26):
                    n = min(1 << 26, flat.numel() - start)
                    flat[start:start + n].copy_(torch.randn(n, generator=gen, device=device).mul_(0.02))
            # to_empty left the buffers (rotary inverse frequencies) uninitialised: rebuild each
            # module that owns buffers on the CPU from its own config and copy them over.
            for module in model.modules():
                own = dict(module.named_buffers(recurse=False))
                if own:
                    fresh = type(module)(config=module.config)
                    for buffer_name, buffer in own.items():
                        buffer.copy_(getattr(fresh, buffer_name))
        return cls(model.eval().requires_grad_(False), tok)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        cache_size: int = 16,
    ) -> T5GemmaTextEncoder:
        """Load ``google/t5gemma-9b-9b-ul2`` (HF format): ``AutoTokenizer`` + encoder only, weights in ``dtype``.

        Args:
            path: local directory or Hub id.
            dtype: weight dtype (bf16 upstream, CODECS.md §4).
            device: target device.
            cache_size: number of prompts kept in the LRU cache.
        """
        hf_tok = AutoTokenizer.from_pretrained(str(path))
        model = T5GemmaEncoderModel.from_pretrained(str(path), is_encoder_decoder=False, dtype=dtype)

        def tokenize(text: str) -> list[int]:
            return list(hf_tok(text)["input_ids"])

        return cls(model.to(device), tokenize, cache_size=cache_size)

    @property
    def hidden_size(self) -> int:
        """Width of the text features (3584 for T5Gemma 9B)."""
        return int(self.model.config.encoder.hidden_size)

    @property
    def device(self) -> torch.device:
        """Device of the encoder weights."""
        return next(self.model.parameters()).device

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` with the tokenizer :meth:`encode` uses (default special tokens).

        Raises:
            ValueError: ``prompt`` is not a string.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        return list(self.tokenizer(prompt))

    def count_tokens(self, prompt: str) -> int:
        """Number of tokens of ``prompt`` (BOS included), as :meth:`encode` would see them untruncated.

        Raises:
            ValueError: ``prompt`` is not a string.
        """
        return len(self.tokenize(prompt))

    @torch.no_grad()
    def encode(self, prompt: str, max_input_tokens: int | None = None) -> tuple[torch.Tensor, int]:
        """Encode one prompt (PIPELINE.md §5).

        By default the encoder sees the whole prompt (no truncation, attention mask all ones), as the
        reference does; its ``last_hidden_state`` is cast to fp16, zero-padded or trimmed to 640 rows,
        and cast to fp32. ``max_input_tokens`` bounds the cost: only the first that many token ids
        are encoded (the kept rows then miss the cut tail's context; bidirectional attention).

        Args:
            prompt: text (never logged).
            max_input_tokens: encode at most this many leading token ids (None: all).

        Returns:
            ``(features, n_kept)``: ``float32 [640, hidden_size]`` on the encoder's device, and
            ``n_kept = min(n_tok, 640)``, the number of leading rows that carry tokens. The tensor is a
            fresh copy (safe to modify).

        Raises:
            ValueError: ``prompt`` is not a string, it tokenizes to nothing, or ``max_input_tokens < 1``.
        """
        if max_input_tokens is not None and max_input_tokens < 1:
            raise ValueError(f"max_input_tokens must be >= 1, got {max_input_tokens}")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        key = (prompt, max_input_tokens)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[0].clone(), hit[1]
        ids = self.tokenize(prompt)
        if max_input_tokens is not None:
            ids = ids[:max_input_tokens]
        if len(ids) == 0:
            raise ValueError("prompt tokenized to 0 tokens; at least 1 is required")
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state[
            0
        ]
        n_kept = min(hidden.shape[0], TEXT_TARGET_LENGTH)
        out = torch.zeros(TEXT_TARGET_LENGTH, hidden.shape[1], dtype=torch.float16, device=hidden.device)
        out[:n_kept] = hidden[:n_kept].to(torch.float16)
        out = out.float()
        if self.cache_size > 0:
            self._cache[key] = (out, n_kept)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out.clone(), n_kept
