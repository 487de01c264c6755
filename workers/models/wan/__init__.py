"""The Wan2.1 family (Self-Forcing / CausVid / LongLive checkpoints) on diffusers' Wan modules."""
