"""The console progress bar names the task that runs, not always "pretrain"."""
from megavl.engine.metrics import Monitor


def test_progress_bar_says_the_task_name(tmp_path):
    monitor = Monitor(tmp_path, True, max_steps=4, start_step=0, name="vqa")
    try:
        assert monitor.bar.desc.startswith("vqa")
    finally:
        monitor.close()
