"""T5Gemma text encoder wrapper (CODECS.md §4, PIPELINE.md §5) on the seeded preview size.

Catches: a changed negative prompt, a missing fp16 cast (the DiT sees fp16-rounded features), padding
with anything but zeros or to a length other than 640, truncating the prompt before the encoder
(the encoder must see every token; only its output is trimmed), a stale or shared cache entry, and a
broken ``is_encoder_decoder=False`` load of an encoder-decoder checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5GemmaConfig, T5GemmaForConditionalGeneration

from engine.codecs.text_encoder import NEGATIVE_PROMPT, TEXT_TARGET_LENGTH, ByteTokenizer, T5GemmaTextEncoder
from tests.conftest import SHARED_DIR


@pytest.fixture(scope="module")
def enc() -> T5GemmaTextEncoder:
    return T5GemmaTextEncoder.preview(seed=0)


def raw_hidden(enc: T5GemmaTextEncoder, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return enc.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_negative_prompt_constant():
    assert len(NEGATIVE_PROMPT) == 1719
    assert "\n" not in NEGATIVE_PROMPT
    assert NEGATIVE_PROMPT.startswith("Bright tones, overexposed, static, blurred details")
    assert NEGATIVE_PROMPT.endswith("out of tune, off-key, autotune artifacts")
    assert "many people in the background, walking backwards, low quality" in NEGATIVE_PROMPT
    assert TEXT_TARGET_LENGTH == 640


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok("hé") == [2, ord("h") + 3, 0xC3 + 3, 0xA9 + 3]
    assert tok("") == [2]
    assert tok.vocab_size == 259 and max(tok(bytes(range(256)).decode("latin-1"))) < 259


def test_short_prompt_fp16_rows_then_zero_padding(enc):
    feats, n = enc.encode("Hello")
    assert feats.shape == (640, 128) and feats.dtype == torch.float32 and n == 6
    raw = raw_hidden(enc, ByteTokenizer()("Hello"))
    assert torch.equal(feats[:6], raw.half().float())
    assert (feats[:6] != raw).any()  # the fp16 rounding is visible
    assert torch.count_nonzero(feats[6:]) == 0


def test_long_prompt_trimmed_after_encoding(enc):
    prompt = (SHARED_DIR / "media" / "prompt.txt").read_text()
    prompt = (prompt * 2)[:1600]
    feats, n = enc.encode(prompt)
    ids = ByteTokenizer()(prompt)
    assert len(ids) == 1601 and n == 640
    assert torch.equal(feats, raw_hidden(enc, ids)[:640].half().float())
    # Encoding only the first 640 tokens would give different features (bidirectional attention).
    assert not torch.equal(feats, raw_hidden(enc, ids[:640]).half().float())


def test_negative_prompt_encodes(enc):
    feats, n = enc.encode(NEGATIVE_PROMPT)
    assert n == 640 and torch.isfinite(feats).all()


def test_preview_is_seeded():
    a, b, c = (T5GemmaTextEncoder.preview(seed=s) for s in (1, 1, 2))
    fa, fb, fc = (e.encode("a talking head")[0] for e in (a, b, c))
    assert torch.equal(fa, fb) and not torch.equal(fa, fc)
    assert a.hidden_size == 128 and T5GemmaTextEncoder.preview(hidden_size=64).hidden_size == 64


def test_cache_hits_evicts_and_returns_copies():
    enc = T5GemmaTextEncoder.preview(seed=0)
    enc.cache_size = 2
    calls = []
    enc.model.register_forward_hook(lambda *args: calls.append(1))
    f1, _ = enc.encode("one")
    f1[0, 0] = 1234.0
    f1b, _ = enc.encode("one")
    assert len(calls) == 1 and f1b[0, 0] != 1234.0
    enc.encode("two")
    enc.encode("three")  # evicts "one"
    enc.encode("one")
    assert len(calls) == 4


def test_bad_prompt(enc):
    with pytest.raises(ValueError, match="prompt"):
        enc.encode(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden_size"):
        T5GemmaTextEncoder.preview(hidden_size=7)


def test_from_pretrained_encoder_only(tmp_path):
    """A full encoder-decoder checkpoint loads encoder-only; features equal the encoder's own output."""
    module = dict(
        vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
    )  # fmt: skip
    torch.manual_seed(0)
    full = T5GemmaForConditionalGeneration(
        T5GemmaConfig(encoder=dict(module), decoder=dict(module), vocab_size=8)
    )
    full.save_pretrained(tmp_path)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4, "talking": 5, "head": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(tmp_path)

    enc32 = T5GemmaTextEncoder.from_pretrained(tmp_path, dtype=torch.float32)
    feats, n = enc32.encode("a talking head")
    assert n == 4 and feats.shape == (640, 32) and enc32.hidden_size == 32
    with torch.inference_mode():
        ref = full.model.encoder(input_ids=torch.tensor([[2, 4, 5, 6]])).last_hidden_state[0]
    assert torch.equal(feats[:4], ref.half().float())
    enc16 = T5GemmaTextEncoder.from_pretrained(tmp_path)
    assert next(enc16.model.parameters()).dtype == torch.bfloat16
    assert not enc16.model.config.is_encoder_decoder


def test_seeded_encoder_has_the_9b_shapes_and_initialised_buffers():
    """``T5GemmaTextEncoder.seeded``: the 9B encoder's config (checked on the meta device, no memory),
    and at a small size a working encoder whose rotary buffers were rebuilt after ``to_empty``."""
    from transformers import T5GemmaConfig, T5GemmaEncoderModel

    from engine.codecs.text_encoder import T5GEMMA_9B_ENCODER

    config = T5GemmaConfig(encoder=dict(T5GEMMA_9B_ENCODER), decoder=dict(T5GEMMA_9B_ENCODER),
                           is_encoder_decoder=False, vocab_size=T5GEMMA_9B_ENCODER["vocab_size"])
    with torch.device("meta"):
        full = T5GemmaEncoderModel(config)
    assert 9.2e9 < sum(p.numel() for p in full.parameters()) < 9.3e9
    assert full.config.encoder.hidden_size == 3584  # the DiT's text_in_channels

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, vocab_size=512)
    encoder = T5GemmaTextEncoder.seeded("cpu", torch.float32, seed=3, **small)
    inv_freq = 1.0 / (encoder.model.config.encoder.rope_parameters["rope_theta"] ** (torch.arange(0, 32, 2) / 32))
    torch.testing.assert_close(encoder.model.encoder.rotary_emb.inv_freq, inv_freq.float())
    features, kept = encoder.encode("hello world")
    assert features.shape == (640, 64) and kept == 12  # BOS + 11 bytes
    assert torch.isfinite(features).all() and features[:kept].abs().sum() > 0 and not features[kept:].any()
    again = T5GemmaTextEncoder.seeded("cpu", torch.float32, seed=3, **small)
    assert torch.equal(again.encode("hello world")[0], features)  # seeded
    with pytest.raises(ValueError, match="unknown T5Gemma encoder keys \\['layers'\\]"):
        T5GemmaTextEncoder.seeded("cpu", layers=2)
