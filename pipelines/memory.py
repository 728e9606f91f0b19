"""What one device holds in a strategy's layout, part by part (bytes).

A device is described by its *places* (pipelines/model_shape.py: FIRST encodes audio and
prompts, SINK builds sinks from the reference image itself, DECODE decodes) and by the
transformer layers and denoising steps it runs. Each part of the model says where it lives
(ModelShape.components, ModelShape.vae_places), so the same arithmetic serves every strategy:

    local          FIRST, SINK, DECODE; every layer; S rings (timestep forcing) or 1 (reencode)
    tpp step rank  every layer; the rings of its steps; rank 0 is also FIRST; SINK
    dualparal      its layers; (history + S in-flight blocks) frames of keys/values for them;
                   rank 0 is FIRST and SINK (it starts the sink pass)
    tpp+layers     its layers of its steps' rings; the first layer rank of each step group is
                   SINK, the very first rank FIRST
    decode rank    DECODE only

Per device:  weights of the layers it runs + shared transformer parts (embeddings, head,
             condition encoders) + the components at its places
             per session: KV rings of its steps + the sink (sink tokens, not one frame, for
             Live Avatar), the prompt's cross-attention keys/values, the decode cache
             working sets: one forward of one block, one block's decode (traced on meta)
"""

from __future__ import annotations

from pipelines.model_shape import DECODE, ModelShape


def device_memory(
    shape: ModelShape,
    *,
    places: frozenset[str] | set[str],
    layers: range | None,
    rings: int = 0,
    frames: int | None = None,
    device: str = "cuda",
    sessions: int = 1,
) -> dict[str, int]:
    """Bytes per part on one device. `layers`: the transformer layers it runs (None: none);
    `rings`: how many KV rings of `frames` latent frames (default the window) it keeps for them."""
    b = shape.bytes
    out: dict[str, int] = {}
    if layers is not None and len(layers):
        n = len(layers)
        held = shape.shared_params + sum(shape.layer_params[i] for i in layers)
        out["transformer"] = held * b
        frames = shape.window_frames if frames is None else frames
        out["KV cache"] = sessions * (rings * shape.kv_bytes(frames, n) + shape.sink_kv_bytes(n))
        out["prompt K/V"] = sessions * shape.prompt_kv_bytes(n)
        out["activations"] = shape.activation_bytes(device)
    if set(shape.vae_places) & set(places):
        out["VAE"] = shape.vae_params * b
    for c in shape.components:
        if set(c.places) & set(places):
            out[c.name] = c.params * b
    if DECODE in places:
        out["decode cache"] = sessions * shape.decode_cache_bytes
        out["decode working set"] = shape.decode_working_bytes
    return out
