"""Golden fixture of Live Avatar's streaming pipeline: three blocks through upstream's
timestep-forcing pipeline-parallel generator (causal_s2v_pipeline_tpp_blockwise.py WanS2V.generate),
run as upstream runs it: 4 denoise ranks (one step each, each with its own KV cache) and 1 VAE
rank, torch.distributed point-to-point between them (gloo on the CPU here, NCCL upstream).

Settings: the tiny transformer of transformer.py (same weights), a tiny random Wan VAE saved in
the original .pth layout, 64x128 pixels, 4 Euler steps, infer_frames=24 so a clip is 2 blocks:
the sink update (block 0's first clean latent becomes the reference) takes effect at block 2,
the first block of clip 1, and block 2 also wraps the KV ring (6 latent frames).

What is fixed instead of computed, in the scratch environment only:
- encode_prompt returns the fixed text embedding saved in the fixture (the T5 has its own
  golden test); encode_audio returns zeros of the right shape, because for the first clips this
  pipeline feeds the model random features (torch.randn_like on rank 0, seeded here) and those
  are what the fixture records, block by block;
- the rolling sink distance upstream draws with random.randint(4, 30) is fixed at 26;
- the same tiny-size patches as transformer.py (width 5120 in _forward_sink; 40 heads x 128,
  3000 sink tokens in _initialize_kv_cache) and SDPA for the CUDA-only attention kernels.

Usage (scratch env): python scripts/golden/stream.py --upstream /path/to/LiveAvatar
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORLD = 5
BLOCKS = 3
SEED = 420
DISTANCE = 26
VAE_DIM = 8


def tiny_vae(seed: int):
    """Upstream's streaming Wan VAE wrapper around a small random WanVAE_ (z_dim 16 like the
    release, so Wan's latent mean/std apply)."""
    import torch

    import common
    from liveavatar.models.wan.wan_2_2.modules import vae_streaming as vs

    torch.manual_seed(seed)
    net = vs.WanVAE_(
        dim=VAE_DIM,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
    ).eval()
    common.randomize(net, seed)
    net.requires_grad_(False)  # as WanVAE.__init__ does
    wrapper = vs.WanVAE.__new__(vs.WanVAE)  # its __init__ hard-codes dim=96 and a file path
    wrapper.dtype = torch.float32
    wrapper.device = "cpu"
    mean = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508]
    mean += [0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
    std = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743]
    std += [3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
    wrapper.mean = torch.tensor(mean)
    wrapper.std = torch.tensor(std)
    wrapper.scale = [wrapper.mean, 1.0 / wrapper.std]
    wrapper.model = net
    return wrapper


def worker(rank: int, upstream: str, workdir: str, port: int) -> None:
    import traceback

    try:
        _worker(rank, upstream, workdir, port)
    except BaseException:
        (Path(workdir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def _worker(rank: int, upstream: str, workdir: str, port: int) -> None:
    sys.path.insert(0, str(HERE))
    import common

    common.setup(Path(upstream))
    common.exact_attention_stubs()
    import torch
    import torch.distributed as dist
    from PIL import Image
    from safetensors.torch import load_file

    import liveavatar.models.wan.causal_model_s2v as cm
    import liveavatar.models.wan.causal_s2v_pipeline_tpp_blockwise as tpp
    from liveavatar.models.wan.wan_2_2.configs import WAN_CONFIGS

    torch.set_num_threads(1)
    common.patch_source(
        cm.CausalWanModel_S2V,
        "_forward_sink",
        [("torch.zeros([1,5120,nf,", "torch.zeros([1,self.dim,nf,")],
    )
    cfg = common.TINY_S2V
    heads, hd = cfg["num_heads"], cfg["dim"] // cfg["num_heads"]
    common.patch_source(
        tpp.WanS2V,
        "_initialize_kv_cache",
        [("40, 128]", f"{heads}, {hd}]", 4), ("3000,", "200,", 2)],
    )
    common.patch_source(
        tpp.WanS2V, "_initialize_crossattn_cache", [("40, 128]", f"{heads}, {hd}]", 2)]
    )
    random.randint = lambda lo, hi: DISTANCE

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    fix = Path(workdir) / "fixture"
    model = cm.CausalWanModel_S2V(**cfg).eval()
    model.load_state_dict(load_file(fix / "transformer_weights.safetensors"))
    model.requires_grad_(False)  # as WanS2V._configure_model does
    inputs = load_file(fix / "stream_inputs_static.safetensors")

    s2v = tpp.WanS2V.__new__(tpp.WanS2V)
    config = dict(WAN_CONFIGS["s2v-14B"])
    s2v.config = config
    s2v.device = torch.device("cpu")
    s2v.rank = rank
    s2v.t5_cpu = True
    s2v.is_training = False
    s2v.num_train_timesteps = 1000
    s2v.num_frames_per_block = 3
    s2v.param_dtype = torch.float32
    s2v.single_gpu = False
    s2v.offload_kv_cache = False
    s2v.noise_model = model
    s2v.vae = tiny_vae(seed=3)
    s2v.motion_frames = 73
    s2v.drop_first_motion = True
    s2v.fps = 25
    s2v.audio_sample_m = 0
    s2v.sample_neg_prompt = config["sample_neg_prompt"]

    class _NoWav2Vec:  # generate() moves this model around before encode_audio
        model = torch.nn.Linear(1, 1)

    s2v.audio_encoder = _NoWav2Vec()
    context = inputs["context"]
    s2v.encode_prompt = lambda prompt, n_prompt=None, offload_model=True: ([context], None)
    s2v.encode_audio = lambda path, infer_frames: (
        torch.zeros(1, 25, cfg["audio_dim"], infer_frames * 4),
        4,
    )
    records: dict[str, torch.Tensor] = {}
    forward = model.forward
    calls = {"n": 0}

    def recording_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if kwargs.get("sink_flag"):
            records.setdefault("ref_latents", kwargs["ref_latents"].clone())
            records.setdefault("motion_latents", kwargs["motion_latents"].clone())
            if "ref_latents" in records and calls["n"] > 0:
                records["ref_latents_refreshed"] = kwargs["ref_latents"].clone()
        else:
            b = calls["n"]
            records[f"input.{b}"] = args[0][0].clone()
            records[f"audio.{b}"] = kwargs["audio_input"].clone()
            records[f"t.{b}"] = kwargs["t"].clone()
            records[f"velocity.{b}"] = out[0].clone()
            calls["n"] += 1
        return out

    model.forward = recording_forward
    send = dist.send
    sent = {"n": 0}

    def recording_send(tensor, dst, *args, **kwargs):
        if rank == 3 and dst == 4 and tensor.dim() == 4:  # a clean block for the VAE rank
            records[f"clean.{sent['n']}"] = tensor.clone()
            sent["n"] += 1
        return send(tensor, dst, *args, **kwargs)

    dist.send = recording_send
    if rank == 0:
        torch.manual_seed(1234)  # the random audio features rank 0 feeds the first clips
    image = Image.fromarray((inputs["image"].numpy() * 255).round().clip(0, 255).astype("uint8"))
    image_path = Path(workdir) / "reference.png"
    if rank == 0:
        image.save(image_path)
    dist.barrier()
    gen = s2v.generate(
        input_prompt="a tiny test",
        ref_image_path=str(image_path),
        audio_path="unused.wav",
        num_repeat=None,
        max_area=64 * 128,
        infer_frames=24,
        sample_solver="euler",
        sampling_steps=4,
        guide_scale=0.0,
        seed=SEED,
        offload_model=False,
        num_gpus_dit=4,
        enable_vae_parallel=True,
    )
    for produced, item in enumerate(gen):  # every rank yields once per block
        if item is not None:
            records[f"frames.{produced}"] = item.clone()
        if produced + 1 == BLOCKS:
            break
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in records.items()}, Path(workdir) / f"rank{rank}.safetensors"
    )
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # the generator holds sends of a 4th block; do not wait for them


def run(upstream: Path, out: Path) -> dict[str, Any]:
    import socket

    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file, save_file

    import common

    dst = out / "stream"
    dst.mkdir(parents=True, exist_ok=True)
    weights = out / "transformer" / "weights.safetensors"
    if not weights.is_file():
        raise SystemExit("run transformer.py first: the stream reuses its tiny weights")
    g = torch.Generator().manual_seed(5)
    static = {
        "context": torch.randn(5, common.TINY_S2V["text_dim"], generator=g),
        "image": (torch.rand(64, 128, 3, generator=g) * 255).round() / 255,
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "fixture").mkdir()
        (Path(tmp) / "fixture" / "transformer_weights.safetensors").write_bytes(
            weights.read_bytes()
        )
        save_file(static, Path(tmp) / "fixture" / "stream_inputs_static.safetensors")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=worker, args=(r, str(upstream), tmp, port)) for r in range(WORLD)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        errors = sorted(Path(tmp).glob("rank*.error"))
        if errors or any(p.exitcode != 0 for p in procs):
            for e in errors:
                print(f"--- {e.name}\n{e.read_text()}", file=sys.stderr)
            raise SystemExit(f"ranks exited with {[p.exitcode for p in procs]}")
        ranks = [load_file(Path(tmp) / f"rank{r}.safetensors") for r in range(WORLD)]
    upstream_vae = tiny_vae_state()
    torch.save(upstream_vae, dst / "Wan2.1_VAE.pth")
    # Stored small: the image and decoded frames as uint8 (frames of blocks 0 and 2: the primed
    # first block and the refreshed, wrapped third), the motion latents the pipeline reads (the
    # first 7 prime the decoder, the last 19 are packed into the sink) and every step's latent.
    motion = ranks[0]["motion_latents"]
    out_tensors: dict[str, torch.Tensor] = {
        "context": static["context"],
        "image": (static["image"] * 255).round().to(torch.uint8),
        "ref_latents": ranks[0]["ref_latents"],
        "motion_latents_first7": motion[:, :, :7],
        "motion_latents_last19": motion[:, :, -19:],
        "ref_latents_refreshed": ranks[0]["ref_latents_refreshed"],
    }
    for b in range(BLOCKS):
        out_tensors[f"audio.{b}"] = ranks[0][f"audio.{b}"]
        out_tensors[f"noise.{b}"] = ranks[0][f"input.{b}"]
        for step in range(1, 4):
            out_tensors[f"latent.{b}.{step}"] = ranks[step][f"input.{b}"]
        out_tensors[f"clean.{b}"] = ranks[3][f"clean.{b}"]
        if b != 1:
            frames = ranks[4][f"frames.{b}"]
            out_tensors[f"frames.{b}"] = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out_tensors["motion_frames_total"] = torch.tensor(motion.shape[2])
    save_file({k: v.contiguous() for k, v in out_tensors.items()}, dst / "stream.safetensors")
    meta = {
        "upstream": f"Alibaba-Quark/LiveAvatar@{common.upstream_commit(upstream)}",
        "pipeline": "liveavatar/models/wan/causal_s2v_pipeline_tpp_blockwise.py WanS2V.generate",
        "ranks": "4 denoise ranks (step = rank) + 1 VAE rank, gloo",
        "weights": "../transformer/weights.safetensors",
        "vae": "Wan2.1_VAE.pth (original key layout, WanVAE_ dim 8, dim_mult 1,1,1,1, one res block)",
        "seed": SEED,
        "infer_frames": 24,
        "blocks": BLOCKS,
        "sink_distance": DISTANCE,
        "size_hw": [64, 128],
    }
    common.write_json(dst / "meta.json", meta)
    return meta


def tiny_vae_state():
    return {k: v.clone() for k, v in tiny_vae(seed=3).model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=HERE.parents[1] / "tests/fixtures/liveavatar")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import common

    common.setup(args.upstream.resolve())
    print(run(args.upstream.resolve(), args.out.resolve()))


if __name__ == "__main__":
    main()
