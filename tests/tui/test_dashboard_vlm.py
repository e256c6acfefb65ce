"""The dashboard shows a vision-language run as it shows a text run: its events are the same kinds,
with the VLM's extra fields (images, vision family, packing reason) where the schema allows them."""

from tui_helpers import text_of, wait_until
from tui_fixtures import T0, event, write_events

from sftop.engine.events import Checkpoint, Message, RunFinished, RunStarted, Step
from sftop.engine.presets import load_preset, save_preset
from sftop.engine.rundir import new_run_dir
from sftop.tui.app import SftopApp
from sftop.tui.screens.dashboard import DashboardScreen


def vlm_run(steps: int = 20):
    """A demo-vision run's events as the trainer writes them (fields from a real CPU run)."""
    preset, _ = load_preset("demo-vision", ["data.packing=false"])
    run = new_run_dir("demo-vision", when=T0)
    save_preset(preset, run.preset)
    started = RunStarted(
        run_dir=str(run.path),
        preset=preset.model_dump(mode="json"),
        environment={
            "device": "cpu",
            "dtype": "fp32",
            "packing": False,
            "packing_reason": "vision-language model: packing is not supported yet, rows are padded per batch",
            "model": {
                "source": "builtin:demo-vlm-tiny",
                "vision_family": "qwen2_vl",
                "params_total": 885760,
                "params_trainable": 98304,
            },
        },
        plan={
            "micro_batch": 8,
            "grad_accum": 1,
            "device": "cpu",
            "notes": ["image tokens per micro-batch of 8: p95 192, max 256 (1024 vision patches); sized for the max"],
        },
        kernels={"enabled": False, "reason": "no CUDA GPU: stock PyTorch layers", "language_model_type": "qwen2"},
        data={
            "source": "builtin:shapes",
            "rows_read": 3000,
            "rows_skipped": 119,
            "images": {
                "rows_with_images": 2881,
                "images": 3440,
                "max_images_per_row": 2,
                "image_tokens_p95_per_row": 24,
                "image_tokens_max_per_row": 32,
                "image_token_share": 0.1956,
            },
        },
        total_steps=steps,
    )
    records = [
        event(
            Message(
                level="info", text="Qwen2-VL vision-language model: 2881 rows checked with their images, 119 skipped"
            ),
            T0,
        ),
        event(started, T0),
    ]
    for step in range(1, steps + 1):
        loss = round(6.6 * 0.9**step + 0.3, 4)
        records.append(
            event(
                Step(
                    step=step,
                    epoch=step * 8 / 2881,
                    loss=loss,
                    learning_rate=1e-3,
                    grad_norm=2.0,
                    tokens_seen=700 * step,
                    tokens_per_s=350.0,
                    samples_per_s=4.0,
                    total_steps=steps,
                ),
                T0 + 2 * step,
            )
        )
    records.append(event(Checkpoint(step=steps, path=str(run.checkpoints / f"checkpoint-{steps}")), T0 + 2 * steps))
    records.append(
        event(
            RunFinished(step=steps, final_loss=loss, adapter_path=str(run.adapter), runtime_s=2.0 * steps),
            T0 + 2 * steps,
        )
    )
    write_events(run.events, records)
    run.stdout_log.write_text("sftop: Qwen2-VL vision-language model: 2881 rows checked with their images\n")
    run.write_status(status="finished", started=T0, ended=T0 + 2 * steps, exit_code=0)
    return run, loss


async def test_dashboard_shows_a_vlm_run(services):
    run, final = vlm_run()
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await wait_until(
            pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed and app.screen
        )
        await wait_until(pilot, lambda: "finished" in text_of(app, "#run-status"))
        assert screen.state.step == 20 and len(screen.state.loss) == 20
        assert text_of(app, "#stat-loss") == f"{final:.4f}"
        assert text_of(app, "#stat-tps") == "350"
        assert text_of(app, "#stat-ckpt") == "step 20"
        status = text_of(app, "#run-status")
        assert "finished" in status and "step 20/20" in status and f"final loss {final:.4f}" in status
        # The log tail is read on its own schedule, after the event history: wait for it.
        await wait_until(pilot, lambda: "vision-language" in "\n".join(screen.query_one("#log").lines))
