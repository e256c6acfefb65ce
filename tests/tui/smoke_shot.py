import asyncio, os, sys, tempfile, time
os.environ["SFTOP_HOME"] = tempfile.mkdtemp()
os.environ["TZ"]="UTC"; time.tzset()
sys.path.insert(0, os.path.dirname(__file__))
from conftest import fixed_gpu
from tui_fixtures import recorded_run, T0
from sftop.tui.app import SftopApp
from sftop.tui.services import Services

run = recorded_run()
recorded_run("running", steps=30, finished=False, when=T0+1000)
svc = Services(gpu_reader=fixed_gpu, clock=lambda: T0+120, gpu_interval=0.2, poll_interval=0.05, redraw_interval=0.1)

async def main():
    app = SftopApp(start=sys.argv[1], run=run, services=svc)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.5)
        for k in sys.argv[2:]:
            if k.startswith("wait:"):
                await pilot.pause(float(k[5:])); continue
            await pilot.press(k); await pilot.pause(0.3)
        await pilot.pause(float(os.environ.get("WAIT", "1")))
        app.save_screenshot("/tmp/shot.svg")
        print(app.screen, [str(w) for w in app.screen.query("#wizard-error")])
asyncio.run(main())
