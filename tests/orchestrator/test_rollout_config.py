"""`--config FILE` and the rollout flags: the Self-Forcing / LongLive YAML keys a user already has."""

import pytest

from orchestrator.cli import build_parser
from orchestrator.cli_common import UsageError, build_config

SELF_FORCING_YAML = """\
denoising_step_list: [1000, 750, 500, 250]
warp_denoising_step: true
num_frame_per_block: 3
model_kwargs:
  timestep_shift: 5.0
lr: 2.0e-06
"""
LONGLIVE_YAML = """\
denoising_step_list: [1000, 750, 500, 250]
model_kwargs:
  local_attn_size: 15
  sink_size: 3
  timestep_shift: 8.0
"""


def config(tmp_path, text: str, name: str, *flags: str):
    (tmp_path / name).write_text(text)
    args = build_parser().parse_args(["plan", "--preset", "longlive-1.3b", "--config", str(tmp_path / name), *flags])
    return build_config(args)


def test_self_forcing_yaml_sets_steps_and_shift(tmp_path, capsys):
    cfg = config(tmp_path, SELF_FORCING_YAML, "sf.yaml")
    assert cfg.denoising_steps == (1000, 750, 500, 250) and cfg.shift == 5.0 and cfg.frames_per_chunk == 3
    assert cfg.sigmas == pytest.approx((1.0, 0.9375, 0.833333, 0.625), abs=1e-6)
    assert "lr" in capsys.readouterr().err  # training keys are named as ignored, not silently dropped


def test_longlive_local_attn_size_counts_sink_and_chunk(tmp_path):
    cfg = config(tmp_path, LONGLIVE_YAML, "ll.yaml")
    assert (cfg.sink_frames, cfg.window_frames, cfg.shift) == (3, 9, 8.0)  # 15 = sink 3 + 9 cached + 3 new
    assert cfg.max_temporal_id == 14  # relative ids: room for the longer context
    assert cfg.sigmas[1] == pytest.approx(0.96)


def test_flags_override_the_file_and_toml_takes_longroll_names(tmp_path):
    cfg = config(tmp_path, "window_frames = 12\nshift = 3.0\nposition = 'absolute'\n", "r.toml", "--shift", "6")
    assert cfg.window_frames == 12 and cfg.shift == 6.0 and cfg.position == "absolute"
    args = build_parser().parse_args(
        ["plan", "--preset", "self-forcing-1.3b", "--denoising-steps", "1000,500", "--height", "240", "--width", "416"]
    )
    cfg = build_config(args)
    assert cfg.sigmas == pytest.approx((1.0, 5 * 0.5 / 3)) and (cfg.latent_height, cfg.latent_width) == (30, 52)


@pytest.mark.parametrize(
    "text, name, message",
    [
        ("denoising_step_list: [1000, 750", "bad.yaml", "does not parse"),
        ("- 1\n- 2\n", "list.yaml", "mapping"),
        ("model_kwargs:\n  local_attn_size: 5\n", "small.yaml", "local_attn_size"),
        ("denoising_step_list: [2000]\n", "steps.yaml", "denoising_steps"),
    ],
)
def test_bad_config_is_a_usage_error(tmp_path, text, name, message):
    with pytest.raises(UsageError, match=message):
        config(tmp_path, text, name)
