"""Golden fixtures for the umT5 prompt encoder (models/text_encoder.py), from upstream's own code.

Runs in the scratch environment. Writes a tiny umT5 in Wan's layout with the project's
`write_tiny_umt5` (the checkpoint files become fixtures too), loads it into upstream's T5Encoder,
wraps it as upstream's T5EncoderModel with upstream's HuggingfaceTokenizer(seq_len=512,
clean='whitespace'), and records, per prompt: upstream's cleaned text, token ids (padding trimmed)
and embeddings in float32 and bfloat16.

    cd /tmp/up/LiveAvatar && PYTHONPATH=/work/main/scripts/golden:/work/main:/tmp/up/LiveAvatar \\
        /tmp/upenv/bin/python /work/main/scripts/golden/t5.py --upstream /tmp/up/LiveAvatar
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import _shim  # noqa: F401  (CUDA -> CPU; must precede upstream imports)
import torch
from safetensors.torch import save_file

from models.text_encoder import T5_CHECKPOINT, T5_TOKENIZER, TEXT_LEN, TINY_UMT5, write_tiny_umt5

PART = "t5"
MODULES = "liveavatar/models/wan/wan_2_2/modules"

PROMPTS = [
    "A young woman with long black hair is talking to the camera in a bright studio.",
    # HTML entities escaped twice and three times next to a literal tag (with a literal "<", ftfy
    # leaves entities alone and upstream's two html.unescape calls do the work), a combining
    # accent for ftfy's NFC, mojibake, tabs/newline/no-break space, and U+001F, which ftfy drops
    "  Tom &amp;amp; Jerry&#39;s <i>show</i>\t\n&lt;b&gt; &amp;amp;amp; "
    "cafe\u0301 caf\u00c3\u00a9\u00a0 \x1f end  ",
    "一位年轻女子正在对着镜头说话，背景是明亮的工作室。",
    # past 512 tokens: upstream truncates and keeps "</s>" as token 512
    " ".join(["the woman is talking with calm warm face"] * 80),
    "",
]


def _upstream_t5(upstream: Path) -> types.ModuleType:
    """Import modules/t5.py (and its .tokenizers) without running modules/__init__.py, which pulls
    the DiT, both VAEs and flash-attention for nothing: a bare package pointing at the folder."""
    name = "_upstream_wan22_modules"
    package = types.ModuleType(name)
    package.__path__ = [str(upstream / MODULES)]
    sys.modules[name] = package
    return importlib.import_module(f"{name}.t5")


def _upstream_wrapper(t5, pth: Path, tokenizer_dir: Path, vocab: int, dtype: torch.dtype):
    """Upstream's T5EncoderModel around a tiny T5Encoder. Its __init__ hard-codes umt5_xxl (a
    256384 x 4096 embedding and 24 layers), so the object is made with __new__ and given the
    attributes its __init__ would set; the model is built, cast and loaded as umt5_xxl() and
    __init__ do: construct in float32, .to(dtype), load_state_dict of the bf16 checkpoint."""
    t = TINY_UMT5
    model = t5.T5Encoder(
        vocab=vocab,
        dim=t["dim"],
        dim_attn=t["dim_attn"],
        dim_ffn=t["dim_ffn"],
        num_heads=t["num_heads"],
        num_layers=t["num_layers"],
        num_buckets=t["num_buckets"],
        shared_pos=False,  # umT5: one relative position table per layer
        dropout=0.1,
    )
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    model.load_state_dict(torch.load(pth, map_location="cpu"))
    wrapper = t5.T5EncoderModel.__new__(t5.T5EncoderModel)
    wrapper.text_len = TEXT_LEN
    wrapper.dtype = dtype
    wrapper.device = torch.device("cpu")
    wrapper.checkpoint_path = str(pth)
    wrapper.tokenizer_path = str(tokenizer_dir)
    wrapper.model = model
    wrapper.tokenizer = t5.HuggingfaceTokenizer(
        name=str(tokenizer_dir), seq_len=TEXT_LEN, clean="whitespace"
    )
    return wrapper


def run(upstream: Path, out: Path) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer folder is local
    torch.manual_seed(0)
    part = out / PART
    ckpt = part / "ckpt"
    pth = write_tiny_umt5(ckpt, seed=0)
    tokenizer_dir = ckpt / T5_TOKENIZER
    vocab = torch.load(pth, map_location="cpu")["token_embedding.weight"].shape[0]
    t5 = _upstream_t5(upstream)

    ids: dict[str, torch.Tensor] = {}
    cleaned: list[str] = []
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        wrapper = _upstream_wrapper(t5, pth, tokenizer_dir, vocab, dtype)
        dname = str(dtype).removeprefix("torch.")
        embeddings[dname] = {}
        for i, prompt in enumerate(PROMPTS):
            with torch.no_grad():
                (context,) = wrapper([prompt], torch.device("cpu"))  # upstream's call, one prompt
            embeddings[dname][f"p{i}"] = context.contiguous()
            if dtype == torch.float32:
                padded, mask = wrapper.tokenizer(
                    [prompt], return_mask=True, add_special_tokens=True
                )
                assert padded.shape == (1, TEXT_LEN)
                ids[f"p{i}"] = padded[0, : int(mask.sum())].contiguous()
                cleaned.append(wrapper.tokenizer._clean(prompt))

    save_file(ids, str(part / "ids.safetensors"))
    for dname, tensors in embeddings.items():
        save_file(tensors, str(part / f"embeddings_{dname}.safetensors"))
    commit = subprocess.run(
        ["git", "-C", str(upstream), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "upstream": f"Alibaba-Quark/LiveAvatar@{commit}",
        "upstream_files": [f"{MODULES}/t5.py", f"{MODULES}/tokenizers.py"],
        "checkpoint": f"ckpt/{T5_CHECKPOINT}",
        "tokenizer": f"ckpt/{T5_TOKENIZER}",
        "seed": 0,
        "sizes": TINY_UMT5 | {"vocab": vocab},
        "text_len": TEXT_LEN,
        "prompts": PROMPTS,
        "cleaned": cleaned,
        "lengths": [int(ids[f"p{i}"].numel()) for i in range(len(PROMPTS))],
        "dtypes": list(embeddings),
        "transformers": __import__("transformers").__version__,
        "ftfy": __import__("ftfy").__version__,
        "torch": torch.__version__,
    }
    (part / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", type=Path, default=Path("/tmp/up/LiveAvatar"))
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "tests/fixtures/liveavatar",
    )
    args = parser.parse_args()
    meta = run(args.upstream, args.out)
    print(json.dumps({k: meta[k] for k in ("upstream", "lengths", "sizes")}))


if __name__ == "__main__":
    main()
