"""The task registry names modules, so the config checks task.name without importing any task."""
from __future__ import annotations

import subprocess
import sys

from megavl.tasks import TASKS, task_builder


def test_every_registered_task_has_a_build_function():
    for name in TASKS:
        assert callable(task_builder(name)), name


def test_loading_a_config_imports_no_task_module_nor_torch():
    code = ("import sys; from megavl.config import load_config; load_config('configs/tiny.yaml', []); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('megavl.tasks.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.stdout.strip() == "[]", out.stdout
