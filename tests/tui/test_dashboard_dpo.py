"""A DPO run's dashboard shows the preference accuracy, reward margin and rewards next to the loss."""

from tui_helpers import text_of, wait_until
from tui_fixtures import T0, mark_alive, recorded_run, write_events

from sftop.engine.events import Step
from sftop.tui.app import SftopApp
from sftop.tui.screens.dashboard import DashboardScreen


def _dpo_step(step, acc, margin):
    return {
        **Step(
            step=step,
            epoch=step / 100,
            loss=0.69 - margin / 2,
            learning_rate=1e-3,
            grad_norm=0.5,
            tokens_seen=1000 * step,
            tokens_per_s=900.0,
            samples_per_s=2.0,
            total_steps=100,
            reward_chosen=margin / 2,
            reward_rejected=-margin / 2,
            reward_margin=margin,
            reward_accuracy=acc,
        ).to_dict(),
        "time": T0 + 10 + step,
    }


async def test_preference_stats_appear_live_for_dpo_runs_only(services):
    run = recorded_run("dpo", steps=10, total=100, finished=False)
    mark_alive(run)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await wait_until(
            pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed and app.screen
        )
        rows = list(screen.query(".preference"))
        assert len(rows) == 3 and not any(row.display for row in rows)  # an SFT history so far
        write_events(run.events, [_dpo_step(11, 0.5, 0.0), _dpo_step(12, 0.8125, 0.42)])
        await wait_until(pilot, lambda: text_of(app, "#stat-pref") == "81%")
        assert all(row.display for row in rows)
        assert text_of(app, "#stat-margin") == "0.420"
        assert text_of(app, "#stat-rewards") == "+0.21/-0.21"
        assert len(screen.state.reward_accuracy) == 2
        assert "pref acc" in screen.query_one("#loss-chart").border_subtitle


def test_dataset_step_renders_a_preference_check():
    import sys
    from io import StringIO
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))  # the data tests' tokenizers
    from data_tokenizers import make_tokenizer
    from rich.console import Console

    from sftop.engine.data.check import check_data
    from sftop.engine.presets.schema import Preset
    from sftop.tui.wizard.dataset_step import render_result

    preset = Preset(
        data={"source": "builtin:arithmetic-preferences", "max_length": 64, "max_rows": 40}, train={"task": "dpo"}
    )
    result = check_data(preset, make_tokenizer("char", "chatml"))
    out = StringIO()
    Console(file=out, width=80).print(render_result(result))
    text = out.getvalue()
    assert "preference (detected)" in text and "40 usable of 40" in text and "trained)" in text
