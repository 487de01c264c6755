"""The demo world: seeded procedural 2-D worlds, camera trajectories, and the world model's training.

``render``: worlds and camera views; ``trajectory``: closed-form camera paths; ``camera``: what the
rollout core asks of a stream's camera (poses, actions, the true first view, pose keys);
``data``/``forward``/``train``: teacher-forced, chunk-causal training of the tiny family on worlds.
"""
