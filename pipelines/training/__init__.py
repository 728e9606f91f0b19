"""Training data for the embedded default model, generated on the fly with no downloads.

- `speech`: speech-like audio synthesised in numpy, microphone/room augmentation, and the
  per-video-frame loudness envelope that lip sync is measured against.
- `avatar`: a procedural talking-avatar renderer driven by that audio (identities and face
  geometry live in `identity`, per-frame face controls from audio in `face_track`; `avatar`
  re-exports both).
- `dataset`: training/evaluation clips (reference image, frames, aligned audio) with a held-out
  split of identities and speakers.
- `metrics`: what `diffstream eval` reports, measured from pixels only: mouth openness, lip-sync
  correlation and identity drift.
"""
