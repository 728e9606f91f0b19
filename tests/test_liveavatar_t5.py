"""umT5 prompt encoder (models/text_encoder.py) against upstream Live Avatar's T5EncoderModel.

Fixtures: tests/fixtures/liveavatar/t5, written by scripts/golden/t5.py from upstream's t5.py and
tokenizers.py on a tiny umT5 (d_model 16, 2 layers, 2 heads, d_ff 32, vocab 256) in Wan's key
layout, whose checkpoint and tokenizer folder are fixtures too.

Tolerances: float32 rtol = atol = 1e-5 (measured: 3.6e-7 at most). bfloat16: rtol = atol = 2**-6
per element (two bf16 ulps at |x| = 1) and a mean |difference| of at most 2**-10 per prompt.
Measured on CPU: bit-identical but for one token of the 44-token prompt, 6 of 16 values there
up to 2 ulps (0.0078) off; mean 3.6e-5. Upstream attends over 512 padded keys and we over the
real ones only, so float32 sums run in another order and a rounding can flip. Attention through
SDPA instead of eager (mean 5e-3, max 0.05) or the feed-forward output kept in float32 as
transformers' from_pretrained does (mean 4e-3, max 0.03) fail the bf16 test.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.errors import ConfigError, ModelNotFoundError
from models.text_encoder import (
    T5_CHECKPOINT,
    T5_TOKENIZER,
    TEXT_LEN,
    AfterEncode,
    PromptEncoder,
    clean_prompt,
    hf_to_wan_key,
    hf_to_wan_state_dict,
    load_tokenizer,
    load_umt5_encoder,
    tokenize_prompt,
    umt5_config_from_state_dict,
    wan_to_hf_key,
    wan_to_hf_state_dict,
    write_tiny_umt5,
)

FIXTURES = Path(__file__).parent / "fixtures/liveavatar/t5"
PTH = FIXTURES / "ckpt" / T5_CHECKPOINT
TOKENIZER = FIXTURES / "ckpt" / T5_TOKENIZER
META = json.loads((FIXTURES / "meta.json").read_text())
PROMPTS: list[str] = META["prompts"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-6}
MEAN_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2**-10}


def _wan_state() -> dict[str, torch.Tensor]:
    return torch.load(PTH, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def loaded() -> dict[torch.dtype, tuple]:
    return {dt: load_umt5_encoder(PTH, TOKENIZER, dtype=dt) for dt in TOLERANCE}


def _encoder(loaded, dtype=torch.float32, **kwargs) -> PromptEncoder:
    model, tokenizer = loaded[dtype]
    return PromptEncoder(model, tokenizer, **kwargs)


# ---- key map and config -------------------------------------------------------------------------


def test_key_map_both_ways_covers_umt5_encoder_model():
    """Wan's keys map onto exactly UMT5EncoderModel's state dict and back to themselves.
    Fails if a key is dropped from either map (tried: removed "norm2.weight": KeyError in the
    forward map and a missing key in the model's set), or if the reverse map is not the inverse."""
    from transformers import UMT5EncoderModel

    wan = _wan_state()
    hf = wan_to_hf_state_dict(wan)
    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config_from_state_dict(wan, PTH))
    assert set(hf) == set(model.state_dict())
    assert hf["encoder.embed_tokens.weight"] is hf["shared.weight"]
    back = hf_to_wan_state_dict(hf)
    assert set(back) == set(wan)
    assert all(back[k] is wan[k] for k in wan)
    for key in wan:
        assert hf_to_wan_key(wan_to_hf_key(key)) == key
    for key in model.state_dict():
        if key != "encoder.embed_tokens.weight":
            assert wan_to_hf_key(hf_to_wan_key(key)) == key
    assert wan_to_hf_key("blocks.0.attn.x.weight") is None
    assert hf_to_wan_key("decoder.block.0.layer.0.SelfAttention.q.weight") is None
    with pytest.raises(KeyError):
        wan_to_hf_state_dict({"head.weight": torch.zeros(1)})


def test_config_inferred_from_shapes():
    """Every size comes from a shape of the state dict. Fails if heads are read from the wrong
    axis of the position table (tried: 32 heads, ConfigError 'width 16 not divisible')."""
    config = umt5_config_from_state_dict(_wan_state(), PTH)
    sizes = META["sizes"]
    assert config.vocab_size == sizes["vocab"]
    assert config.d_model == sizes["dim"]
    assert config.num_heads == sizes["num_heads"]
    assert config.d_kv * config.num_heads == sizes["dim_attn"]
    assert config.d_ff == sizes["dim_ffn"]
    assert config.num_layers == sizes["num_layers"]
    assert config.relative_attention_num_buckets == sizes["num_buckets"]
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"  # tanh GELU, as Wan's


def test_config_of_the_released_xxl_sizes():
    """Shapes of the released file (upstream's umt5_xxl: vocab 256384, dim 4096, 64 heads,
    d_ff 10240, 24 layers, 32 buckets; meta tensors, nothing allocated) give that config."""
    d, f, h, n = 4096, 10240, 64, 24
    shapes = {"norm1.weight": (d,), "norm2.weight": (d,), "attn.o.weight": (d, d)}
    shapes |= {f"attn.{x}.weight": (d, d) for x in "qkv"}
    shapes |= {"ffn.gate.0.weight": (f, d), "ffn.fc1.weight": (f, d), "ffn.fc2.weight": (d, f)}
    shapes |= {"pos_embedding.embedding.weight": (32, h)}
    state = {"token_embedding.weight": (256384, d), "norm.weight": (d,)}
    state |= {f"blocks.{i}.{k}": v for i in range(n) for k, v in shapes.items()}
    config = umt5_config_from_state_dict(
        {k: torch.empty(v, device="meta") for k, v in state.items()}, "xxl"
    )
    assert (config.vocab_size, config.d_model, config.num_heads, config.d_kv) == (256384, d, h, 64)
    assert (config.d_ff, config.num_layers, config.relative_attention_num_buckets) == (f, n, 32)


# ---- cleaning, tokens, embeddings against upstream -----------------------------------------------


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_cleaning_matches_upstream(index):
    """Upstream's 'whitespace' cleaning, string for string. Fails if HTML is unescaped once
    instead of twice (tried: '&amp;' stays), if ftfy is skipped (tried: mojibake 'cafÃ©' and
    U+001F stay), or if whitespace runs are not collapsed (tried)."""
    assert clean_prompt(PROMPTS[index]) == META["cleaned"][index]


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_token_ids_match_upstream(loaded, index):
    """Our ids are upstream's with the padding trimmed: "</s>" appended, 512 at most with "</s>"
    last, "" -> ["</s>"]. Fails without truncation (tried: 641 ids), with add_special_tokens=False
    (tried: one id short, no "</s>"), or without cleaning (tried: 71 ids instead of 44)."""
    _, tokenizer = loaded[torch.float32]
    ids = tokenize_prompt(tokenizer, PROMPTS[index])
    expected = load_file(FIXTURES / "ids.safetensors")[f"p{index}"]
    assert ids.shape == (1, META["lengths"][index])
    assert torch.equal(ids[0], expected)
    assert ids[0, -1].item() == tokenizer.eos_token_id == 1
    assert ids.shape[1] <= TEXT_LEN


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_embeddings_match_upstream(loaded, dtype):
    """PromptEncoder.encode gives upstream's T5EncoderModel output ([L, 16] per prompt, padding
    trimmed) as [1, L, 16], for every fixture prompt, including "" and a prompt past 512 tokens.
    Fails if gate and fc1 are swapped in the key map (tried: off by up to 3.4), if the relative
    distance cap is 64 instead of 128 (tried: up to 1.4), if the final norm weight is skipped
    (tried: up to 1.1), with gated ReLU for gated GELU (tried: up to 0.75), or, in bf16 only, if
    attention runs through SDPA (tried: up to 0.05) or wo stays in float32 (tried: up to 0.03)."""
    encoder = _encoder(loaded, dtype)
    expected = load_file(FIXTURES / f"embeddings_{str(dtype).removeprefix('torch.')}.safetensors")
    tol = TOLERANCE[dtype]
    for index, prompt in enumerate(PROMPTS):
        out = encoder.encode(prompt)
        ref = expected[f"p{index}"]
        assert out.dtype == dtype and out.shape == (1, *ref.shape)
        torch.testing.assert_close(out[0], ref, rtol=tol, atol=tol, msg=f"prompt {index}")
        mean = (out[0].float() - ref.float()).abs().mean().item()
        assert mean <= MEAN_TOLERANCE[dtype], f"prompt {index}: mean difference {mean:.2e}"
    assert encoder.forward_calls == len(PROMPTS)


# ---- cache, offload, free -------------------------------------------------------------------------


def test_cache_returns_same_tensor_without_running_the_model(loaded):
    """A repeated prompt is the very same tensor and costs no forward; the cache is an LRU of the
    configured size. Fails if the cache is bypassed (tried: 2 calls) or if a hit does not
    refresh the entry's recency (tried: removed move_to_end, 'a' was evicted instead of 'b')."""
    encoder = _encoder(loaded, cache_size=2)
    first = encoder.encode("a woman")
    assert encoder.encode("a woman") is first
    assert encoder.forward_calls == 1
    encoder.encode("a man")
    encoder.encode("a woman")  # most recent again
    encoder.encode("a girl")  # evicts "a man"
    assert encoder.cached("a woman") and not encoder.cached("a man")
    assert encoder.encode("a woman") is first
    assert encoder.forward_calls == 3
    encoder.encode("a man")
    assert encoder.forward_calls == 4
    both = encoder.encode_all(["a man", "a man"])
    assert both[0] is both[1] and encoder.forward_calls == 4


def test_cache_is_thread_safe(loaded):
    """Eight threads asking for one new prompt at once run the model once and get one tensor.
    Fails without the lock (tried: 8 forwards, 8 different tensors)."""
    encoder = _encoder(loaded)
    model = encoder._model
    real_forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.05)  # widen the window in which an unlocked cache would miss twice
        return real_forward(*args, **kwargs)

    model.forward = slow_forward
    try:
        results: list[torch.Tensor] = []
        threads = [
            threading.Thread(target=lambda: results.append(encoder.encode("the same prompt")))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        del model.forward
    assert encoder.forward_calls == 1
    assert len(results) == 8 and all(r is results[0] for r in results)


class _MoveLog:
    """Records where the model is sent; the machine has no GPU, so moves are only observed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.moves, self._to = model, [], model.to
        model.to = self.to

    def to(self, device, *args, **kwargs):
        self.moves.append(str(device))
        return self._to(device, *args, **kwargs)

    def close(self) -> None:
        del self.model.to


def test_offload_parks_the_model_on_cpu_between_prompts(loaded):
    """after_encode='offload': for a new prompt the model goes to the encoding device and back to
    the CPU; a cached prompt moves nothing. Fails if the move back is skipped (tried)."""
    model, tokenizer = loaded[torch.float32]
    log = _MoveLog(model)
    try:
        encoder = PromptEncoder(model, tokenizer, device="cpu", after_encode="offload")
        log.moves.clear()
        out = encoder.encode("a woman talking")
        assert log.moves == ["cpu", "cpu"]  # to `device` for the forward, then parked
        assert encoder.encode("a woman talking") is out and log.moves == ["cpu", "cpu"]
        assert encoder.model_loaded
    finally:
        log.close()
    torch.testing.assert_close(out, _encoder(loaded).encode("a woman talking"), rtol=0, atol=0)


def test_keep_leaves_the_model_alone(loaded):
    """after_encode='keep' never moves the model after construction. Fails if keep offloads
    too (tried: one move to the CPU)."""
    model, tokenizer = loaded[torch.float32]
    log = _MoveLog(model)
    try:
        encoder = PromptEncoder(model, tokenizer, after_encode=AfterEncode.KEEP)
        log.moves.clear()
        encoder.encode_all(["one", "two"])
        assert log.moves == [] and encoder.model_loaded
    finally:
        log.close()


def test_free_releases_the_model_and_serves_only_cached_prompts():
    """after_encode='free': after the first encode_all the model is gone (no reference left),
    its prompts are still served, a new prompt raises ConfigError telling how to restart. Fails
    if the model is kept (tried: not dropped at all) or a reference to it survives (tried: kept
    in another attribute, the weakref stays alive)."""
    model, tokenizer = load_umt5_encoder(PTH, TOKENIZER, dtype=torch.float32)
    ref = weakref.ref(model)
    encoder = PromptEncoder(model, tokenizer, after_encode="free", cache_size=4)
    del model
    prompt, negative = encoder.encode_all(["a woman talking", ""])
    assert not encoder.model_loaded and ref() is None
    assert encoder.encode("a woman talking") is prompt and encoder.encode("") is negative
    with pytest.raises(ConfigError, match=r"not cached.*freed.*after_encode='keep' or 'offload'"):
        encoder.encode("a new prompt")
    small = PromptEncoder(*load_umt5_encoder(PTH, TOKENIZER), after_encode="free", cache_size=1)
    with pytest.raises(ConfigError, match="cache of 1"):
        small.encode_all(["a", "b"])  # the first would be evicted before it could be served


def test_failed_forward_parks_but_does_not_free(loaded):
    """A forward that raises still sends an offloaded model back to the CPU, and does not free
    a 'free' model, so the user can retry. Fails if the after-encode step skips errors (tried:
    no finally, moves == ['cpu']) or frees regardless (tried: freeing=True, model gone)."""
    model, tokenizer = loaded[torch.float32]
    log = _MoveLog(model)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    model.forward = broken
    try:
        offload = PromptEncoder(model, tokenizer, after_encode="offload")
        log.moves.clear()
        with pytest.raises(RuntimeError, match="out of memory"):
            offload.encode("a prompt")
        assert log.moves == ["cpu", "cpu"]
        free = PromptEncoder(model, tokenizer, after_encode="free")
        with pytest.raises(RuntimeError, match="out of memory"):
            free.encode("a prompt")
        assert free.model_loaded and not free.cached("a prompt")
    finally:
        del model.forward
        log.close()


def test_encoder_argument_errors(loaded):
    """Bad options are ConfigErrors; a bare string to encode_all is a TypeError, not N prompts."""
    model, tokenizer = loaded[torch.float32]
    with pytest.raises(ConfigError, match="after_encode must be one of"):
        PromptEncoder(model, tokenizer, after_encode="delete")
    with pytest.raises(ConfigError, match="cache size"):
        PromptEncoder(model, tokenizer, cache_size=0)
    encoder = PromptEncoder(model, tokenizer)
    with pytest.raises(TypeError):
        encoder.encode_all("a prompt")
    with pytest.raises(TypeError):
        encoder.encode(None)


def test_from_checkpoint_reads_wan_folder_layout(loaded):
    """A Wan checkpoint folder (the .pth next to google/umt5-xxl/) gives the same encoder."""
    encoder = PromptEncoder.from_checkpoint(FIXTURES / "ckpt", dtype=torch.float32, cache_size=3)
    assert encoder.dim == META["sizes"]["dim"] and encoder.cache_size == 3
    expected = _encoder(loaded).encode(PROMPTS[0])
    torch.testing.assert_close(encoder.encode(PROMPTS[0]), expected, rtol=0, atol=0)


# ---- errors a user can cause ---------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_checkpoint_and_tokenizer(tmp_path):
    """Missing files are ModelNotFoundError naming the path."""
    with pytest.raises(ModelNotFoundError) as exc:
        load_umt5_encoder(tmp_path / T5_CHECKPOINT, TOKENIZER)
    assert "not found" in _one_line(exc, tmp_path / T5_CHECKPOINT)
    with pytest.raises(ModelNotFoundError) as exc:
        load_umt5_encoder(PTH, tmp_path / "google/umt5-xxl")
    assert "tokenizer folder not found" in _one_line(exc, tmp_path / "google/umt5-xxl")


def test_truncated_checkpoint(tmp_path):
    """Half a .pth, or an empty one, is a ConfigError naming it. Fails without the guard around
    torch.load (tried: a bare OSError '[Errno 22] Invalid argument' from the memory map)."""
    bad = tmp_path / T5_CHECKPOINT
    data = PTH.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as exc:
        load_umt5_encoder(bad, TOKENIZER)
    assert "truncated" in _one_line(exc, bad)
    bad.write_bytes(b"")
    with pytest.raises(ConfigError) as exc:
        load_umt5_encoder(bad, TOKENIZER)
    _one_line(exc, bad)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda s: {"patch_embedding.weight": torch.zeros(4, 4)}, "not Wan's umT5 encoder"),
        (lambda s: s | {"pos_embedding.embedding.weight": torch.zeros(32, 2)}, "shared"),
        (lambda s: {k: v for k, v in s.items() if k != "blocks.1.norm2.weight"}, "missing"),
        (lambda s: s | {"blocks.1.ffn.fc2.weight": s["blocks.1.ffn.fc2.weight"].T}, "shape"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("blocks.0.")}, "numbered"),
        (lambda s: [s], "not a state dict"),
        (lambda s: s | {"token_embedding.weight": torch.zeros(100, 16)}, "another model"),
    ],
    ids=["other-model", "t5-shared-pos", "missing-key", "wrong-shape", "gap", "list", "vocab"],
)
def test_state_dict_of_another_model(tmp_path, change, words):
    """A checkpoint that is not Wan's umT5 encoder is a ConfigError naming the file (or the
    tokenizer folder, when its vocabulary outgrows the embedding). Fails if shapes are not
    checked (tried: transformers' multi-line RuntimeError 'size mismatch' surfaced instead)."""
    path = tmp_path / T5_CHECKPOINT
    torch.save(change(_wan_state()), path)
    with pytest.raises(ConfigError, match=words) as exc:
        load_umt5_encoder(path, TOKENIZER)
    _one_line(exc, TOKENIZER if words == "another model" else path)


def test_tokenizer_folder_without_tokenizer(tmp_path):
    """A folder with no tokenizer files is a ConfigError naming it, not a transformers trace."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as exc:
        load_tokenizer(tmp_path)
    _one_line(exc, tmp_path)


# ---- the tiny writer -------------------------------------------------------------------------------


def test_tiny_writer_reproduces_fixture_and_loads_cleanly(tmp_path):
    """write_tiny_umt5 with seed 0 gives the fixture's tensors bit for bit, its files load into
    UMT5EncoderModel with zero missing and unexpected keys, and another seed gives other weights.
    Fails if the writer stops being deterministic (tried: no generator) or changes a Wan key
    (tried: 'ffn.gate.weight' for 'ffn.gate.0.weight')."""
    from transformers import UMT5EncoderModel

    pth = write_tiny_umt5(tmp_path, seed=0)
    assert pth == tmp_path / T5_CHECKPOINT
    state = torch.load(pth, map_location="cpu", weights_only=True)
    fixture = _wan_state()
    assert state.keys() == fixture.keys()
    assert all(
        torch.equal(state[k], fixture[k]) and state[k].dtype == torch.bfloat16 for k in state
    )
    model = UMT5EncoderModel(umt5_config_from_state_dict(state, pth))
    result = model.load_state_dict(wan_to_hf_state_dict(state), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    other = torch.load(write_tiny_umt5(tmp_path / "s1", seed=1), weights_only=True)
    assert not torch.equal(other["blocks.0.attn.q.weight"], state["blocks.0.attn.q.weight"])


def test_tiny_tokenizer_behaves_like_umt5(tmp_path):
    """The written tokenizer loads offline through AutoTokenizer as umT5's own class, has umT5's
    special ids (pad 0, "</s>" 1 appended, unk 2) and takes any Unicode; it tokenizes every
    fixture prompt as the fixture's tokenizer did. Fails if the special pieces are reordered
    (tried: "</s>" first, ids (1, 0, 2))."""
    write_tiny_umt5(tmp_path)
    tokenizer = load_tokenizer(tmp_path / T5_TOKENIZER)
    assert type(tokenizer).__name__ == "T5Tokenizer"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenize_prompt(tokenizer, "一位女子 🙂 Ωmega ∑ talking")[0].tolist()
    assert ids[-1] == 1 and 2 in ids and 0 not in ids
    assert tokenize_prompt(tokenizer, "")[0].tolist() == [1]
    padded = tokenizer(["a"], padding="max_length", max_length=4).input_ids[0]
    assert padded[-2:] == [0, 0]
    fixture_ids = load_file(FIXTURES / "ids.safetensors")
    for index, prompt in enumerate(PROMPTS):
        assert torch.equal(tokenize_prompt(tokenizer, prompt)[0], fixture_ids[f"p{index}"])
