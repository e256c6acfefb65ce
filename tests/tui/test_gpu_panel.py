"""On a machine with an NVIDIA GPU: the home screen shows what NVML reports. Skipped elsewhere.

Run on a GPU machine with `python -m pytest tests/tui/test_gpu_panel.py -q`.
"""

import pytest
from tui_helpers import text_of, wait_until

from sftop.engine.gpu import read_gpus
from sftop.tui.app import SftopApp
from sftop.tui.screens.home import HomeScreen
from sftop.tui.services import Services

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpus():
    status = read_gpus()
    if not status.gpus:
        pytest.skip(f"no GPU: {status.reason}")
    return status


async def test_home_shows_the_real_gpus(gpus):
    app = SftopApp(services=Services(gpu_interval=0.5))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen) and "GiB" in text_of(app, "#gpus"))
        panel = text_of(app, "#gpus")
        for gpu in gpus.gpus:
            assert gpu.name[:21] in panel
            assert f"/{gpu.total_gib:.1f} GiB" in panel
