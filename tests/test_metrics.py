"""grpo.metrics: what a run records (sampler vs trainer mismatch, reward and length statistics)."""

from __future__ import annotations

import pytest
import torch

from grpo.metrics import sampler_mismatch


def test_sampler_mismatch_worked_example():
    sampler = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    trainer = torch.tensor([[-1.1, -1.8], [-0.7, 5.0]])  # the 5.0 sits on padding and must not count
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    m = sampler_mismatch(sampler, trainer, mask)
    assert m["mismatch/logp_abs_diff"] == pytest.approx((0.1 + 0.2 + 0.2) / 3)
    assert m["mismatch/logp_abs_diff_max"] == pytest.approx(0.2)
    ratios = [torch.tensor(0.1).exp().item(), torch.tensor(-0.2).exp().item()]  # exp(-0.1 + 0.2), exp(-0.2)
    assert m["mismatch/seq_ratio_mean"] == pytest.approx(sum(ratios) / 2, rel=1e-6)
    assert m["mismatch/seq_ratio_min"] == pytest.approx(ratios[1], rel=1e-6)
    assert m["mismatch/seq_ratio_max"] == pytest.approx(ratios[0], rel=1e-6)


def test_sampler_mismatch_rejects_shapes_that_differ():
    with pytest.raises(ValueError, match="shapes differ"):
        sampler_mismatch(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


# ---------------------------------------------------------------- the plot (plot_metrics and its helpers)

import json  # noqa: E402  (appended section: the plot tests were added after the mismatch tests above)

from grpo.plot import _metrics_figure, _nice_ceiling, plot_metrics, smooth  # noqa: E402

FORMAT_FUNCS = ["xmlcount_reward_func", "soft_format_reward_func", "strict_format_reward_func"]
FORMAT_FUNCS += ["int_reward_func"]
ALL_PANELS = [
    "total reward",
    "reward functions scored up to 2 (unweighted means)",
    "reward functions scored up to 0.5 (unweighted means)",
    "accuracy per source",
    "reward per source",
    "KL to reference",
    "completion length (tokens)",
    "entropy (nats per token)",
    "clip ratio (fraction of tokens clipped)",
]


def training_record(step: int, with_eval: bool = False) -> dict:
    """One metrics.jsonl row as the trainer writes it (TRL 1.16 names), values a simple function of step."""
    record = {"step": step, "reward": 1.0 + 0.01 * step, "reward_std": 0.5, "kl": 0.001 * step}
    for name in FORMAT_FUNCS:
        record[f"rewards/{name}/mean"] = 0.25
        record[f"rewards/{name}/std"] = 0.1
    record["rewards/correctness_reward_func/mean"] = 0.02 * step
    for source in ("gsm8k", "pubmedqa"):
        record[f"reward/{source}"] = 1.0
        record[f"accuracy/{source}"] = 0.1
    record.update({"completions/mean_length": 40.0, "entropy": 0.5, "clip_ratio/region_mean": 0.0})
    record["learning_rate"] = 1e-5
    if with_eval:
        record.update({"eval/reward": 1.5, "eval/accuracy": 0.3, "eval/accuracy/gsm8k": 0.2})
        record.update({"eval/accuracy/pubmedqa": 0.4, "eval/completion_length": 42.0})
    return record


def write_metrics(path, rows) -> None:
    """rows: dicts (written as JSON) or raw strings (written as they are, for broken lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def line(ax, label):
    return next(ln for ln in ax.get_lines() if ln.get_label() == label)


def assert_png_drawn(path, width, height):
    """A PNG of the figure's size (dpi 100) with ink on it, not a blank canvas."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    not_white = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert not_white > 0.02, f"only {not_white:.1%} of the pixels are drawn"


def test_smooth_worked_example():
    assert smooth([0, 2, 4, 10], window=2) == [0.0, 1.0, 3.0, 7.0]
    assert smooth([0, 2, 4, 10], window=3) == pytest.approx([0.0, 1.0, 2.0, 16 / 3])
    assert smooth([0, 2, 4, 10], window=1) == [0, 2, 4, 10]
    assert smooth([0, 2, 4, 10], window=10) == [0.0, 1.0, 2.0, 4.0]  # longer than the data: running mean
    assert smooth([], window=3) == []
    with pytest.raises(ValueError, match="window must be at least 1"):
        smooth([1.0], window=0)


def test_nice_ceiling_examples():
    examples = {0.37: 0.5, 1.08: 2.0, 3.0: 5.0, 0.5: 0.5, 0.1: 0.1, 2.0: 2.0, 7.0: 10.0, 0.0: 0.0, -0.3: 0.0}
    assert {value: _nice_ceiling(value) for value in examples} == examples


def test_plot_with_eval_keys_draws_every_panel(tmp_path):
    rows = [training_record(step, with_eval=step % 10 == 0) for step in range(1, 31)]
    write_metrics(tmp_path / "metrics.jsonl", rows)
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.png")
    assert png == tmp_path / "metrics.png"
    assert_png_drawn(png, width=1650, height=1080)  # 3 x 3 panels of 5.5 x 3.6 inches at dpi 100

    fig = _metrics_figure(rows)
    assert [ax.get_title() for ax in fig.axes] == ALL_PANELS
    accuracy = panel(fig, "accuracy per source")
    gsm8k_eval = line(accuracy, "gsm8k (eval)")
    assert list(gsm8k_eval.get_xdata()) == [10, 20, 30] and gsm8k_eval.get_marker() == "o"
    assert gsm8k_eval.get_color() == line(accuracy, "gsm8k").get_color()  # one source, one colour
    assert list(line(accuracy, "all sources (eval)").get_ydata()) == [0.3, 0.3, 0.3]
    assert list(line(panel(fig, "total reward"), "reward (eval)").get_xdata()) == [10, 20, 30]
    length = panel(fig, "completion length (tokens)")
    assert list(line(length, "completion length (eval)").get_ydata()) == [42.0, 42.0, 42.0]
    assert "30 steps" in fig._suptitle.get_text() and "last 3 values" in fig._suptitle.get_text()


def test_plot_without_eval_keys(tmp_path):
    rows = [training_record(step) for step in range(1, 31)]
    write_metrics(tmp_path / "metrics.jsonl", rows)
    assert_png_drawn(plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png"), width=1650, height=1080)
    fig = _metrics_figure(rows)
    assert [ax.get_title() for ax in fig.axes] == ALL_PANELS
    labels = [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]
    assert not [label for label in labels if "(eval)" in label]


def test_each_curve_is_raw_under_its_moving_average():
    kl = [0.0, 0.3, 0.6, 0.3]
    rows = [dict(training_record(step), kl=value) for step, value in zip(range(1, 5), kl, strict=True)]
    raw, smoothed = panel(_metrics_figure(rows, window=2), "KL to reference").get_lines()
    assert list(raw.get_ydata()) == kl
    assert list(smoothed.get_ydata()) == pytest.approx([0.0, 0.15, 0.45, 0.45])  # (0.6 + 0.3) / 2 at step 4
    assert smoothed.get_linewidth() > raw.get_linewidth() and raw.get_alpha() < 1


def test_reward_functions_of_different_maxima_get_their_own_axes():
    rows = [training_record(step) for step in range(1, 5)]
    for row, custom in zip(rows, [0.2, 0.8, 0.5, 0.6], strict=True):
        row["rewards/mypkg.rewards:fn/mean"] = custom  # unknown: scale from its top mean, 0.8 -> 1
        row["rewards/soft_overlong_punishment/mean"] = -0.1
    fig = _metrics_figure(rows)
    reward_panels = [ax for ax in fig.axes if ax.get_title().startswith("reward functions")]
    legends = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in reward_panels}
    assert list(legends.items()) == [  # highest maximum first
        ("reward functions scored up to 2 (unweighted means)", ["correctness_reward_func"]),
        ("reward functions scored up to 1 (unweighted means)", ["mypkg.rewards:fn (scale from data)"]),
        ("reward functions scored up to 0.5 (unweighted means)", sorted(FORMAT_FUNCS)),
        ("reward functions scored up to 0 (unweighted means)", ["soft_overlong_punishment"]),
    ]


def test_plot_of_a_single_step(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", [training_record(1)])
    assert_png_drawn(plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png"), width=1650, height=1080)
    fig = _metrics_figure([training_record(1)])
    assert [ax.get_title() for ax in fig.axes] == ALL_PANELS
    for ax in fig.axes:  # one point draws no line segment: every curve is a visible dot, no raw twin
        assert all(ln.get_marker() == "o" and len(ln.get_xdata()) == 1 for ln in ax.get_lines())
    assert "1 step " in fig._suptitle.get_text() and "lines: each step" in fig._suptitle.get_text()


def test_unknown_keys_and_values_that_are_not_numbers_are_skipped(tmp_path):
    rows = [training_record(step) for step in range(1, 7)]
    rows[0]["my_metric/extra"] = 3.0  # an unknown numeric key: no panel of its own
    rows[0]["note"] = "text"
    rows[1]["kl"] = "nan"
    rows[2]["kl"] = None
    rows[3]["kl"] = float("nan")  # json writes NaN, which json.loads reads back as a float
    rows[4]["kl"] = True
    not_a_step = [json.dumps({"reward": 9.0}), json.dumps(dict(training_record(7), step="7"))]
    broken = ["[1, 2]", *not_a_step, '{"step": 8, "rew']  # not an object, no numeric step, a torn last line
    write_metrics(tmp_path / "metrics.jsonl", rows + broken)
    assert_png_drawn(plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png"), width=1650, height=1080)

    from grpo.metrics import read_metrics

    fig = _metrics_figure(read_metrics(tmp_path / "metrics.jsonl"), window=2)
    assert [ax.get_title() for ax in fig.axes] == ALL_PANELS
    assert [list(ln.get_xdata()) for ln in panel(fig, "KL to reference").get_lines()] == [[1, 6], [1, 6]]
    assert list(panel(fig, "total reward").get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert "6 steps" in fig._suptitle.get_text()


def test_old_metric_names_and_a_run_without_kl_or_accuracy(tmp_path):
    rows = []
    for step in range(1, 4):
        row = {"step": step, "reward": 1.0, "rewards/correctness_reward_func/mean": 0.5, "reward/gsm8k": 1.0}
        row.update({"completion_length": 30.0 + step, "clip_ratio": 0.01})  # names before TRL's
        rows.append(row)
    fig = _metrics_figure(rows)
    assert [ax.get_title() for ax in fig.axes] == [
        "total reward",
        "reward functions scored up to 2 (unweighted means)",
        "reward per source",
        "completion length (tokens)",
        "clip ratio (fraction of tokens clipped)",
    ]
    assert list(panel(fig, "completion length (tokens)").get_lines()[0].get_ydata()) == [31.0, 32.0, 33.0]
    write_metrics(tmp_path / "metrics.jsonl", rows)
    assert_png_drawn(plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png"), width=1650, height=720)


def test_plot_of_an_empty_file_and_of_a_missing_one(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert [ax.get_title() for ax in _metrics_figure([]).axes] == ["no metrics logged yet"]
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        plot_metrics(tmp_path / "absent.jsonl", tmp_path / "x.png")


def test_metrics_go_to_a_wandb_like_sink_every_logging_steps(tmp_path, monkeypatch):
    """report_to wandb / trackio: init with the config, log the numbers every logging_steps, finish."""
    import sys
    import types

    from grpo.metrics import MetricsLogger, read_metrics

    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw["config"])),
        log=lambda numbers, step: calls.append(("log", step, numbers)),
        finish=lambda: calls.append(("finish",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(tmp_path, "wandb", logging_steps=2, config={"seed": 1})
    for step in (1, 2, 3, 4):
        logger.log({"step": step, "reward": float(step), "note": "not a number"})
    logger.close()
    assert calls == [
        ("init", {"seed": 1}),
        ("log", 2, {"reward": 2.0}),
        ("log", 4, {"reward": 4.0}),
        ("finish",),
    ]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]  # every step


def test_report_to_a_sink_that_is_not_installed_is_one_config_error():
    import importlib.util

    from grpo.config import ConfigError, GRPOConfig

    for sink in ("wandb", "trackio"):
        if importlib.util.find_spec(sink) is None:
            with pytest.raises(ConfigError, match=f"report_to='{sink}': {sink} is not installed"):
                GRPOConfig(report_to=sink)
