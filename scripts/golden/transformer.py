"""Golden fixtures of Live Avatar's causal S2V transformer, from the upstream code.

Runs upstream's CausalWanModel_S2V (liveavatar/models/wan/causal_model_s2v.py) with the tiny
config of common.py and random weights, calling it exactly as upstream's streaming pipelines do:
one sink prefill (`sink_flag=True`), then three blocks of three latent frames that share one KV
cache whose ring holds two blocks, so the third block wraps around. Intermediate outputs (every
block, every audio injection, the audio encoder) are recorded with hooks.

Patches for the tiny config, in the scratch environment only:
- `_forward_sink` builds its empty noisy-token tensor with the 14B's width 5120: use self.dim.
- flash-attn / cuDNN attention kernels: SDPA in the inputs' dtype (common.exact_attention_stubs).
- the rolling sink distance upstream draws with random.randint(4, 30) at every forward is fixed
  per forward from the list below, and recorded.

Usage (scratch env): python scripts/golden/transformer.py --upstream /path/to/LiveAvatar
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DISTANCES = [26, 7, 29]  # sink distance of each block's forward: 30 (floor), 30, 6+29=35
TIMESTEPS = [999.0, 937.5, 833.3333]


def run(upstream: Path, out: Path) -> dict[str, Any]:
    import common

    common.setup(upstream)
    common.exact_attention_stubs()
    import torch
    from safetensors.torch import save_file

    import liveavatar.models.wan.causal_model_s2v as cm

    common.patch_source(
        cm.CausalWanModel_S2V,
        "_forward_sink",
        [("torch.zeros([1,5120,nf,", "torch.zeros([1,self.dim,nf,")],
    )
    torch.manual_seed(0)
    model = cm.CausalWanModel_S2V(**common.TINY_S2V).eval()
    common.randomize(model, seed=1)
    dst = out / "transformer"
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, dst / "weights.safetensors")
    common.write_json(dst / "config.json", common.config_json(common.TINY_S2V))

    cfg = common.TINY_S2V
    h, w = common.LATENT_HW
    fsl = (h // 2) * (w // 2)
    heads, hd = cfg["num_heads"], cfg["dim"] // cfg["num_heads"]
    g = torch.Generator().manual_seed(2)
    inputs = {
        "context": torch.randn(5, cfg["text_dim"], generator=g),
        "ref_latents": torch.randn(1, 16, 1, h, w, generator=g),
        "motion_latents": torch.randn(1, 16, 19, h, w, generator=g),
        "latents": torch.randn(3, 16, 3, h, w, generator=g),
        "audio": torch.randn(3, 25, cfg["audio_dim"], 12, generator=g),
    }
    ring_frames = 6  # two blocks: block 2 overwrites block 0
    sink_capacity = 200
    kv_cache = [
        {
            "k": torch.zeros(1, ring_frames * fsl, heads, hd),
            "v": torch.zeros(1, ring_frames * fsl, heads, hd),
            "cond_k": torch.zeros(1, sink_capacity, heads, hd),
            "cond_v": torch.zeros(1, sink_capacity, heads, hd),
            "cond_end": torch.tensor([0], dtype=torch.long),
        }
        for _ in range(cfg["num_layers"])
    ]
    cross = [{"k": None, "v": None, "is_init": False} for _ in range(cfg["num_layers"])]
    common_args = dict(
        context=[inputs["context"]],
        seq_len=None,
        cond_states=torch.zeros(1, 16, 3, h, w),
        motion_latents=inputs["motion_latents"],
        ref_latents=inputs["ref_latents"],
        motion_frames=[73, 19],
        drop_motion_frames=False,
    )
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model(
            [inputs["latents"][0]],
            t=torch.zeros(1, 3),
            **common_args,
            audio_input=inputs["audio"][0:1],
            sink_flag=True,
            kv_cache=kv_cache,
            crossattn_cache=cross,
            current_start=0,
            current_end=3 * fsl,
        )
        end = int(kv_cache[0]["cond_end"])
        for i, layer in enumerate(kv_cache):
            outputs[f"sink_k.{i}"] = layer["cond_k"][:, :end].clone()
            outputs[f"sink_v.{i}"] = layer["cond_v"][:, :end].clone()

        captured: dict[str, torch.Tensor] = {}
        hooks = [
            blk.register_forward_hook(
                lambda mod, args, res, i=i: captured.__setitem__(f"block.{i}", res.clone())
            )
            for i, blk in enumerate(model.blocks)
        ]
        hooks.append(
            model.casual_audio_encoder.register_forward_hook(
                lambda mod, args, res: captured.update(
                    {"audio_global": res[0].clone(), "audio_local": res[1].clone()}
                )
            )
        )
        after = model.after_transformer_block

        def record_after(idx, hidden, mask=None):
            res = after(idx, hidden, mask)
            captured[f"after.{idx}"] = res.clone()
            return res

        model.after_transformer_block = record_after
        for b in range(3):
            distance = DISTANCES[b]
            random.randint = lambda lo, hi, d=distance: d  # upstream's sink distance draw
            captured.clear()
            v = model(
                [inputs["latents"][b]],
                t=torch.full((1, 3), TIMESTEPS[b]),
                **common_args,
                audio_input=inputs["audio"][b : b + 1],
                kv_cache=kv_cache,
                crossattn_cache=cross,
                current_start=b * 3 * fsl,
                current_end=(b + 1) * 3 * fsl,
                mask=None,
            )
            outputs[f"velocity.{b}"] = v[0].clone()
            for key, val in captured.items():
                outputs[f"{key}.b{b}"] = val
        for hk in hooks:
            hk.remove()
    save_file({k: v.contiguous() for k, v in inputs.items()}, dst / "inputs.safetensors")
    save_file({k: v.contiguous() for k, v in outputs.items()}, dst / "outputs.safetensors")
    meta = {
        "upstream": f"Alibaba-Quark/LiveAvatar@{common.upstream_commit(upstream)}",
        "module": "liveavatar/models/wan/causal_model_s2v.py CausalWanModel_S2V",
        "tiny_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "latent_hw": list(common.LATENT_HW),
        "ring_frames": ring_frames,
        "sink_tokens": end,
        "sink_distances": DISTANCES,
        "timesteps": TIMESTEPS,
        "calls": "sink prefill (t=0, block 0's audio), then blocks 0..2 at current_start=3b frames",
    }
    common.write_json(dst / "meta.json", meta)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=HERE.parents[1] / "tests/fixtures/liveavatar")
    args = parser.parse_args()
    meta = run(args.upstream.resolve(), args.out.resolve())
    print(meta)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE))
    main()
