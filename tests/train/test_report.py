"""A training stage's own report: report.md and curves.png in its directory."""

from __future__ import annotations

import io

import pytest

from prolong.train.report import curves_png, training_figures, training_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def step_records(steps: int = 6, *, mfu: bool = False) -> list[dict]:
    return [{"step": s, "loss": 8.0 - 0.5 * s, "lr": 1e-3, "grad_norm": 1.0 / s, "tokens": 2048,
             "seconds": 0.5, "tokens_per_s": 4096.0,
             "mfu_dense": 0.4 if mfu else None, "mfu_doc_causal": 0.2 if mfu else None,
             "tokens_per_domain": {"books": 1024 * s, "code": 1024 * s}}
            for s in range(1, steps + 1)]


def test_figures_follow_their_definitions():
    fig = training_figures(step_records(6), devices=4)
    assert (fig.steps, fig.tokens, fig.step_seconds) == (6, 6 * 2048, 3.0)
    assert fig.device_hours == pytest.approx(3.0 * 4 / 3600)
    assert fig.tokens_per_s_per_device == pytest.approx(6 * 2048 / 3.0 / 4)
    assert (fig.first_loss, fig.last_loss, fig.min_loss) == (7.5, 5.0, 5.0)  # 1-step windows
    # Longer runs average a tenth of the run (at most 10 steps) at each end.
    long = training_figures(step_records(40), devices=1)
    assert long.first_loss == pytest.approx(8.0 - 0.5 * 2.5)  # steps 1-4
    assert long.last_loss == pytest.approx(8.0 - 0.5 * 38.5)  # steps 37-40
    assert fig.mfu_dense is None and fig.cost(2.0) == pytest.approx(fig.device_hours * 2.0)
    assert training_figures(step_records(3, mfu=True), 1).mfu_dense == pytest.approx(0.4)
    # Rows with a wall time: step time, device-hours and tokens/s are over it, and the data
    # wait and saves are shown on their own.
    walled = [{**r, "wall_s": 0.75, "data_s": 0.05, "save_s": 0.2 if r["step"] == 3 else 0.0}
              for r in step_records(6)]
    fig = training_figures(walled, devices=4)
    assert fig.step_seconds == pytest.approx(4.5) and fig.save_seconds == pytest.approx(0.2)
    assert fig.data_seconds == pytest.approx(0.3)
    assert fig.tokens_per_s == pytest.approx(6 * 2048 / 4.5)
    assert "| of which data wait; checkpoint saves | 0.3 s; 0.2 s |" in training_markdown(
        "p/s", fig, device="H100")


def test_markdown_and_curves_are_written_for_people():
    records = step_records(8)
    text = training_markdown("p/stage1-0123abcd", training_figures(records, 2), device="H100")
    assert "| steps | 8 |" in text and "| devices | 2 x H100 |" in text
    assert "| books | 8,192 | 50.0% |" in text
    png = curves_png(records, "p/stage1-0123abcd")
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert image.shape[0] >= 600 and image.shape[1] >= 1200  # six readable panels


def test_long_runs_draw_a_running_mean_of_the_per_step_noise():
    from prolong.train.report import running_mean, smoothing_window

    assert smoothing_window(200) == 1 and smoothing_window(28_000) == 280
    assert smoothing_window(300) == 5
    xs, ys = running_mean([1, 2, 3, 4, 5], [1.0, 3.0, 1.0, 3.0, 1.0], 2)
    assert xs == [1.5, 2.5, 3.5, 4.5] and ys == [2.0, 2.0, 2.0, 2.0]
    png = curves_png(step_records(600), "p/base-0123abcd")
    assert png.startswith(b"\x89PNG")
