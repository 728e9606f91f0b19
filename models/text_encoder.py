"""The prompt encoder of Live Avatar (Wan2.2-S2V-14B): umT5-XXL's encoder, run by transformers.

Wan ships the encoder as one bf16 ``.pth`` in its own key layout (``blocks.N.attn.q.weight`` ...)
and the tokenizer as a Hugging Face folder inside the checkpoint folder. We do not keep a copy of
the network: a key map turns Wan's state dict into ``transformers.UMT5EncoderModel``'s, whose
computation is the same (no attention scaling, a relative position table per layer, gated tanh-GELU
feed-forward, RMS norms without bias).

::

    prompt ─▶ clean (ftfy, html unescape x2, collapse whitespace) ─▶ umT5 tokenizer (+ "</s>", <= 512)
           ─▶ UMT5EncoderModel ─▶ [1, L, 4096], L = real token count (the DiT pads to 512 itself)
                                        │
    PromptEncoder: bounded LRU cache keyed by the raw prompt; after encoding the model stays on
    its device, is parked on the CPU, or is freed (then only cached prompts can be served).

Upstream pads every prompt to 512 tokens and masks the padding out; the masked keys get exactly
zero attention weight, so encoding only the real tokens gives the same embeddings and is cheaper.
"""

from __future__ import annotations

import gc
import html
import json
import pickle
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.errors import ConfigError, ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
TEXT_LEN = 512  # Wan's text_len: prompts are truncated to this many tokens, "</s>" included

# Per-block parameters: Wan's name after "blocks.N." -> transformers' after "encoder.block.N.".
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the branch that goes through GELU
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_KEYS = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_BLOCK_KEYS_BACK = {v: k for k, v in _BLOCK_KEYS.items()}
_TOP_KEYS_BACK = {v: k for k, v in _TOP_KEYS.items()}
_TIED_KEY = "encoder.embed_tokens.weight"  # transformers ties it to shared.weight


def wan_to_hf_key(key: str) -> str | None:
    """transformers' name of one Wan umT5 parameter; None when `key` is not one of them."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _BLOCK_KEYS:
        return f"encoder.block.{parts[1]}.{_BLOCK_KEYS[parts[2]]}"
    return None


def hf_to_wan_key(key: str) -> str | None:
    """Wan's name of one UMT5EncoderModel parameter; None when `key` has no Wan counterpart."""
    if key in _TOP_KEYS_BACK:
        return _TOP_KEYS_BACK[key]
    parts = key.split(".", 3)
    if (
        len(parts) == 4
        and parts[:2] == ["encoder", "block"]
        and parts[2].isdigit()
        and parts[3] in _BLOCK_KEYS_BACK
    ):
        return f"blocks.{parts[2]}.{_BLOCK_KEYS_BACK[parts[3]]}"
    return None


def wan_to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's encoder state dict in UMT5EncoderModel's names (the tied input embedding included)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = wan_to_hf_key(key)
        if new is None:
            raise KeyError(f"{key!r} is not a parameter of Wan's umT5 encoder")
        out[new] = value
    if "shared.weight" in out:
        out[_TIED_KEY] = out["shared.weight"]
    return out


def hf_to_wan_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UMT5EncoderModel's state dict in Wan's names (the tied copy of the embedding dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == _TIED_KEY:
            continue
        new = hf_to_wan_key(key)
        if new is None:
            raise KeyError(f"{key!r} has no counterpart in Wan's umT5 encoder")
        out[new] = value
    return out


def _few(keys: Sequence[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def umt5_config_from_state_dict(
    state: Mapping[str, torch.Tensor], source: str | Path = "state dict"
) -> UMT5Config:
    """The UMT5Config that Wan's encoder state dict describes, every size read from a shape.

    Raises ConfigError naming `source` when the keys or shapes are not those of a umT5 encoder
    in Wan's layout (a DiT, a VAE, or T5 v1.1 with one shared position table, for instance).
    """
    from transformers import UMT5Config

    if "pos_embedding.embedding.weight" in state:
        raise ConfigError(
            f"{source}: one position table shared by all layers (T5 layout); "
            "umT5 has one per layer -- this is not Wan's umT5 encoder"
        )
    unknown = [k for k in state if wan_to_hf_key(k) is None]
    if unknown or "token_embedding.weight" not in state:
        raise ConfigError(
            f"{source}: not Wan's umT5 encoder "
            + (f"(unexpected keys {_few(unknown)})" if unknown else "(no 'token_embedding.weight')")
        )
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if not layers or layers != list(range(len(layers))):
        raise ConfigError(f"{source}: umT5 encoder blocks are not numbered 0..N-1 ({layers[:8]})")
    expected = {*_TOP_KEYS, *(f"blocks.{i}.{s}" for i in layers for s in _BLOCK_KEYS)}
    missing = sorted(expected - set(state))
    if missing:
        raise ConfigError(f"{source}: umT5 encoder is missing {_few(missing)}")

    vocab, dim = state["token_embedding.weight"].shape
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    dim_attn = state["blocks.0.attn.q.weight"].shape[0]
    dim_ffn = state["blocks.0.ffn.fc1.weight"].shape[0]
    if heads < 1 or dim_attn % heads:
        raise ConfigError(f"{source}: attention width {dim_attn} not divisible by {heads} heads")
    shapes = {
        "norm1.weight": (dim,),
        "norm2.weight": (dim,),
        "attn.q.weight": (dim_attn, dim),
        "attn.k.weight": (dim_attn, dim),
        "attn.v.weight": (dim_attn, dim),
        "attn.o.weight": (dim, dim_attn),
        "pos_embedding.embedding.weight": (buckets, heads),
        "ffn.gate.0.weight": (dim_ffn, dim),
        "ffn.fc1.weight": (dim_ffn, dim),
        "ffn.fc2.weight": (dim, dim_ffn),
    }
    wanted = {"norm.weight": (dim,)} | {
        f"blocks.{i}.{s}": shape for i in layers for s, shape in shapes.items()
    }
    for key, shape in wanted.items():
        if tuple(state[key].shape) != shape:
            raise ConfigError(
                f"{source}: {key!r} has shape {tuple(state[key].shape)}, expected {shape} "
                f"(d_model {dim}, {heads} heads of {dim_attn // heads}, d_ff {dim_ffn})"
            )
    return UMT5Config(
        vocab_size=vocab,
        d_model=dim,
        d_kv=dim_attn // heads,
        num_heads=heads,
        d_ff=dim_ffn,
        num_layers=len(layers),
        num_decoder_layers=len(layers),
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,  # fixed in Wan's T5RelativeEmbedding as in umT5
        feed_forward_proj="gated-gelu",  # tanh-approximated GELU on the gate branch
        layer_norm_epsilon=1e-6,
        # eager: scores in the model dtype plus the bias, softmax accumulated in float32 and
        # rounded once, as upstream's T5Attention: in bf16 on CPU within one ulp of upstream,
        # where SDPA's bf16 kernel is up to ~3 ulps off. At <= 512 tokens the scores are cheap.
        attn_implementation="eager",
    )


# What torch.load raises for a truncated, corrupt or non-checkpoint file (weights_only included).
_UNREADABLE = (
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)


def _read_state_dict(pth: Path) -> dict[str, torch.Tensor]:
    if not pth.is_file():
        raise ModelNotFoundError(
            f"{pth}: umT5 encoder checkpoint not found (Wan's {T5_CHECKPOINT})"
        )
    try:
        state = torch.load(pth, map_location="cpu", weights_only=True, mmap=True)
    except _UNREADABLE as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{pth}: not a readable PyTorch checkpoint, truncated or corrupt? ({reason[:160]})"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"{pth}: not a state dict of tensors (got {type(state).__name__})")
    return dict(state)


def load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerBase:
    """The umT5 tokenizer from a local folder (never the network)."""
    from transformers import AutoTokenizer

    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: umT5 tokenizer folder not found ({T5_TOKENIZER}/)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... by case
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{folder}: not a usable tokenizer folder ({reason[:160]})") from None
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ConfigError(f"{folder}: tokenizer has no eos or pad token, not umT5's")
    return tokenizer


def load_umt5_encoder(
    pth: str | Path,
    tokenizer_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[UMT5EncoderModel, PreTrainedTokenizerBase]:
    """Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` as an eval-mode UMT5EncoderModel, and its tokenizer.

    The model is built on the meta device and the (memory-mapped) checkpoint tensors are assigned
    into it, so the 5.7B-parameter XXL never exists twice in memory.
    """
    from transformers import UMT5EncoderModel

    pth = Path(pth)
    state = _read_state_dict(pth)
    config = umt5_config_from_state_dict(state, pth)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"{tokenizer_dir}: tokenizer has {len(tokenizer)} tokens but {pth.name} embeds only "
            f"{config.vocab_size}; the tokenizer belongs to another model"
        )
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    hf_state = {k: v.to(dtype) for k, v in wan_to_hf_state_dict(state).items()}
    hf_state[_TIED_KEY] = hf_state["shared.weight"]
    result = model.load_state_dict(hf_state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:  # the key map and transformers disagree
        raise ConfigError(
            f"{pth}: transformers' UMT5EncoderModel expects other keys "
            f"(missing {_few(result.missing_keys)}, unexpected {_few(result.unexpected_keys)})"
        )
    model.encoder.embed_tokens.weight = model.shared.weight  # one tensor, as transformers ties it
    model = model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy (mojibake, NFC, control characters), HTML entities
    unescaped twice, whitespace runs -> one space. `regex` as upstream: its ``\\s`` differs from
    `re`'s only on U+001C..U+001F, which ftfy has already removed, but same module, same answer."""
    import ftfy
    import regex

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, text_len: int = TEXT_LEN
) -> torch.Tensor:
    """Token ids [1, L] of the cleaned prompt, "</s>" appended, truncated to `text_len` tokens.
    Upstream pads to `text_len` and trims the padding off the output; we never add it."""
    encoded = tokenizer(
        [clean_prompt(prompt)],
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return encoded.input_ids


class AfterEncode(str, Enum):
    """What happens to the encoder once a call to `encode`/`encode_all` has run it."""

    KEEP = "keep"  # stays on its device: a new prompt costs one forward
    OFFLOAD = "offload"  # parked on the CPU: frees device memory, a new prompt also pays two copies
    FREE = "free"  # dropped: frees all its memory, only prompts already cached can be served


def _after_encode(value: AfterEncode | str) -> AfterEncode:
    try:
        return AfterEncode(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in AfterEncode)
        raise ConfigError(f"after_encode must be one of {choices}, got {value!r}") from None


class PromptEncoder:
    """Prompt -> umT5 embeddings [1, L, dim], cached per distinct prompt.

    A session usually repeats one prompt, and the XXL encoder costs ~11 GB of bf16 weights, so the
    embeddings are kept in a small LRU cache and the model can be offloaded or freed after use.
    Thread-safe: one lock serialises cache access and forwards, so a prompt asked for by two
    sessions at once is encoded once. The returned tensors are shared: do not modify them in place.
    """

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device = "cpu",
        output_device: str | torch.device | None = None,
        text_len: int = TEXT_LEN,
        cache_size: int = 8,
        after_encode: AfterEncode | str = AfterEncode.KEEP,
    ) -> None:
        if cache_size < 1:
            raise ConfigError(f"prompt cache size must be at least 1, got {cache_size}")
        if text_len < 1:
            raise ConfigError(f"text length must be at least 1 token, got {text_len}")
        self.after_encode = _after_encode(after_encode)
        self.device = torch.device(device)
        self.output_device = torch.device(output_device) if output_device else self.device
        self.text_len = text_len
        self.cache_size = cache_size
        self.dim = int(model.config.d_model)
        self.tokenizer = tokenizer
        self.forward_calls = 0  # model runs so far: cache hits do not count
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        home = torch.device("cpu") if self.after_encode is AfterEncode.OFFLOAD else self.device
        self._model: UMT5EncoderModel | None = model.to(home)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        checkpoint: str = T5_CHECKPOINT,
        tokenizer: str = T5_TOKENIZER,
        **kwargs: Any,
    ) -> PromptEncoder:
        """The encoder of a Wan checkpoint folder (``<dir>/models_t5_...pth``, ``<dir>/google/umt5-xxl``)."""
        after = _after_encode(kwargs.get("after_encode", AfterEncode.KEEP))
        load_on = "cpu" if after is AfterEncode.OFFLOAD else device
        folder = Path(checkpoint_dir)
        model, tok = load_umt5_encoder(folder / checkpoint, folder / tokenizer, load_on, dtype)
        return cls(model, tok, device=device, **kwargs)

    @property
    def model_loaded(self) -> bool:
        """False once the model was freed (after_encode='free'): only cached prompts remain."""
        return self._model is not None

    def cached(self, prompt: str) -> bool:
        with self._lock:
            return prompt in self._cache

    def encode(self, prompt: str) -> torch.Tensor:
        """Embeddings [1, L, dim] of one prompt, L its real token count (1 for "": just "</s>")."""
        return self.encode_all([prompt])[0]

    def encode_all(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Several prompts (say, a prompt and its negative) with one after-encode step at the end,
        so that after_encode='free' can still serve all of them."""
        if isinstance(prompts, str):
            raise TypeError("encode_all takes a sequence of prompts, not one string")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
        if len(set(prompts)) > self.cache_size and self.after_encode is AfterEncode.FREE:
            raise ConfigError(
                f"{len(set(prompts))} prompts do not fit a cache of {self.cache_size} "
                "with after_encode='free'; raise the cache size"
            )
        with self._lock:
            results: dict[str, torch.Tensor] = {}
            missing = []
            for prompt in prompts:
                if prompt in self._cache:
                    self._cache.move_to_end(prompt)
                    results[prompt] = self._cache[prompt]
                elif prompt not in missing:
                    missing.append(prompt)
            if missing:
                try:
                    for prompt in missing:
                        results[prompt] = self._remember(prompt, self._run(prompt))
                finally:  # a failed forward still parks the model; it is freed only on success
                    self._after_run(freeing=len(results) == len(set(prompts)))
            return [results[p] for p in prompts]

    def cache_clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def _remember(self, prompt: str, embeddings: torch.Tensor) -> torch.Tensor:
        self._cache[prompt] = embeddings
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeddings

    def _run(self, prompt: str) -> torch.Tensor:
        if self._model is None:
            shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
            raise ConfigError(
                f"prompt {shown!r} is not cached and the text encoder was freed after encoding "
                "(after_encode='free'); restart with after_encode='keep' or 'offload' to change prompts"
            )
        if self.after_encode is AfterEncode.OFFLOAD:
            self._model.to(self.device)
        ids = tokenize_prompt(self.tokenizer, prompt, self.text_len).to(self.device)
        with torch.no_grad():
            out = self._model(input_ids=ids).last_hidden_state
        self.forward_calls += 1
        return out.to(self.output_device)

    def _after_run(self, freeing: bool) -> None:
        if self.after_encode is AfterEncode.OFFLOAD and self._model is not None:
            self._model.to("cpu")
        elif self.after_encode is AfterEncode.FREE and self._model is not None and freeing:
            self._model = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


# ---- a tiny umT5 in Wan's layout, for tests and golden fixtures --------------------------------

TINY_UMT5 = {
    "dim": 16,
    "dim_attn": 16,
    "dim_ffn": 32,
    "num_heads": 2,
    "num_layers": 2,
    "num_buckets": 32,
}

_TINY_WORDS = (  # split on spaces
    "a an the and of in on to with at is are her his their its this that it from for by as "
    "young old woman man girl boy person people hair long short black brown white red blue "
    "green bright dark light studio room office street camera talking speaking smiling looking "
    "sitting standing front background face eyes mouth head hands natural calm warm soft clear "
    "video high quality detailed realistic portrait close up shot wearing shirt jacket dress "
    "tom jerry show cafe end word"
)
_TINY_SUFFIXES = ("s", "ed", "ing", "er", "ly", "es", "'s")
_TINY_CJK = "一位年轻女子正在对着镜头说话的是明亮工作室，。"


def _tiny_vocab() -> list[tuple[str, float]]:
    """umT5's id layout (<pad> 0, </s> 1, <unk> 2) over a few hundred hand-picked pieces; whole
    words score higher than their letters so the Viterbi split prefers them."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    vocab += [(f"▁{w}", -6.0 - 0.01 * i) for i, w in enumerate(_TINY_WORDS.split())]
    vocab += [(s, -7.0) for s in _TINY_SUFFIXES]
    vocab += [(chr(c), -9.0) for c in range(33, 127)]  # printable ASCII, one piece per character
    vocab += [(f"▁{chr(c)}", -8.5) for c in range(ord("a"), ord("z") + 1)]
    vocab += [(c, -8.0) for c in _TINY_CJK]
    seen: set[str] = set()
    return [(p, s) for p, s in vocab if not (p in seen or seen.add(p))]


def _write_tiny_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = _tiny_vocab()
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))  # unknown characters -> <unk>
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": TEXT_LEN}
    (folder / "tokenizer_config.json").write_text(json.dumps(config | special, indent=1) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")
    return len(vocab)


def write_tiny_umt5(ckpt_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random umT5 encoder as Wan ships it: ``<ckpt_dir>/models_t5_umt5-xxl-enc-bf16.pth``
    (Wan's keys, bf16, sizes of TINY_UMT5) and ``<ckpt_dir>/google/umt5-xxl/`` (a tokenizer built
    on the spot with umT5's special ids). Same seed, same tensors. Returns the .pth path."""
    ckpt_dir = Path(ckpt_dir)
    n_tokens = _write_tiny_tokenizer(ckpt_dir / T5_TOKENIZER)
    vocab = -(-n_tokens // 64) * 64  # rows past the tokenizer, as umT5's 256384 > 256300
    t = TINY_UMT5
    d, a, f, h = t["dim"], t["dim_attn"], t["dim_ffn"], t["num_heads"]
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm_weight() -> torch.Tensor:  # not all ones, so a skipped norm weight shows
        return 1.0 + normal(d, std=0.2)

    state = {"token_embedding.weight": normal(vocab, d, std=1.0)}
    for i in range(t["num_layers"]):
        p = f"blocks.{i}."
        state |= {
            p + "norm1.weight": norm_weight(),
            p + "attn.q.weight": normal(a, d, std=(d * a / h) ** -0.5 * 2),
            p + "attn.k.weight": normal(a, d, std=d**-0.5),
            p + "attn.v.weight": normal(a, d, std=d**-0.5),
            p + "attn.o.weight": normal(d, a, std=a**-0.5),
            p + "norm2.weight": norm_weight(),
            p + "ffn.gate.0.weight": normal(f, d, std=d**-0.5),
            p + "ffn.fc1.weight": normal(f, d, std=d**-0.5),
            p + "ffn.fc2.weight": normal(d, f, std=f**-0.5),
            p + "pos_embedding.embedding.weight": normal(t["num_buckets"], h, std=1.0),
        }
    state["norm.weight"] = norm_weight()
    path = ckpt_dir / T5_CHECKPOINT
    torch.save({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, path)
    return path
